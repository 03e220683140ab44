"""The ``cks-jax`` command line: ``bench``, ``explain``, ``train`` and ``demo``."""
from __future__ import annotations

import argparse
import json
import re
import sys
import time

import numpy as np

QUICK_LAYERS = ("dcgan_g_16to32", "unet_up_32to64", "grouped_deconv_16to32",
                "audio_up1d_2048to4096", "atrous_64_c64_d2", "wavenet_1d_d8", "resnet_3x3_56",
                "vnet_up3d_8to16")


class Progress:
  """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

  def __init__(self, total: int, width: int = 28):
    self.total, self.n, self.width, self.t0 = total, 0, width, time.perf_counter()
    self.tty = sys.stderr.isatty()

  def __call__(self, label: str) -> None:
    self.n += 1
    done = int(self.width * (self.n - 1) / max(1, self.total))
    bar = "#" * done + "." * (self.width - done)
    msg = f"[{bar}] {self.n}/{self.total} {time.perf_counter() - self.t0:5.0f}s {label}"
    if self.tty:
      sys.stderr.write("\r" + msg[:110].ljust(110))
    else:
      sys.stderr.write(msg + "\n")
    sys.stderr.flush()

  def close(self) -> None:
    if self.tty:
      sys.stderr.write("\r" + " " * 110 + "\r")
      sys.stderr.flush()


def _select(layers, pattern: str | None, quick: bool):
  if quick and not pattern:
    layers = [l for l in layers if l["name"] in QUICK_LAYERS]
  if pattern:
    rx = re.compile(pattern)
    layers = [l for l in layers if rx.search(l["name"]) or rx.search(l["family"])]
  return layers


def cmd_bench(args) -> int:
  from cks_jax._src import bench
  if getattr(args, "load", None):
    # A saved run's table, summary and plot, without timing anything.
    if args.json:
      print("--load prints a saved run; --json would only copy it", file=sys.stderr)
      return 2
    try:
      with open(args.load) as f:
        report = bench.report_from_json(json.load(f))
    except (OSError, ValueError, KeyError, TypeError) as e:
      print(f"--load {args.load}: not a results file of cks-jax bench --json ({e})",
            file=sys.stderr)
      return 2
    gemm = report.machine.get("xla_gemm_gflops")
  else:
    min_time = getattr(args, "min_time", None)
    if min_time is not None and not min_time >= 0:
      print(f"--min-time must be >= 0 seconds, got {min_time}", file=sys.stderr)
      return 2
    layers = _select(bench.load_layers(args.shapes), args.layers, args.quick)
    if not layers:
      print("no layer matches --layers", file=sys.stderr)
      return 2
    repeats = args.repeats or (3 if args.quick else 7)
    budget = 1.5 if args.quick else 5.0
    # The GEMM rate is the reference of the 75% target: measured before and after the layers
    # and the higher kept, so one disturbed measurement does not lower the bar.
    gemm_before = bench.gemm_gflops()
    progress = Progress(3 * len(layers))

    def checkpoint(report):  # a run cut short still leaves the layers it timed
      if args.json:
        with open(args.json, "w") as f:
          json.dump(report.to_json(), f, indent=1)

    report = bench.run(layers, repeats=repeats, budget_s=budget, with_torch=not args.no_torch,
                       with_portable=not getattr(args, "no_portable", False), progress=progress,
                       dtype=getattr(args, "dtype", "float32"),
                       min_time_s=bench.MIN_TIMED_S if min_time is None else min_time,
                       checkpoint=checkpoint)
    progress.close()
    gemms = [gemm_before, bench.gemm_gflops()]
    gemm = max(gemms)
    report.machine["xla_gemm_gflops"] = gemm
    report.machine["xla_gemm_gflops_measured"] = gemms
  print(bench.format_table(report, gemm))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report.to_json(), f, indent=1)
    print(f"wrote {args.json}")
  if args.plot:
    try:
      bench.plot(report, args.plot)
      print(f"wrote {args.plot}")
    except ImportError:
      print("--plot needs matplotlib: pip install 'cks-jax[bench]'", file=sys.stderr)
      return 1
  return 0


def _ints(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a list of integers (e.g. 16,16,16,128 or 16x16x16x128)") from None


def _padding(text: str):
  if text.upper() in ("SAME", "VALID", "SAME_LOWER"):
    return text.upper()
  vals = _ints(text)
  if len(vals) % 2:
    raise argparse.ArgumentTypeError(
        f"explicit padding is lo,hi pairs per spatial dimension, e.g. 1,1,2,2 (got {text!r})")
  return tuple(zip(vals[::2], vals[1::2]))


def _dimension_numbers(text: str) -> tuple[str, str, str]:
  specs = tuple(v.strip() for v in text.split(","))
  if len(specs) != 3:
    raise argparse.ArgumentTypeError(
        f"dimension numbers are three specs, lhs,rhs,out, e.g. NHWC,HWIO,NHWC (got {text!r})")
  return specs


def cmd_explain(args) -> int:
  import cks_jax
  try:
    e = cks_jax.explain(args.lhs, args.rhs, args.strides or (1,) * (len(args.lhs) - 2),
                        args.padding, args.lhs_dilation, args.rhs_dilation,
                        args.dimension_numbers, args.groups, gradients=True)
  except (ValueError, TypeError) as err:
    # The layer's own error (as lax would raise it), without a traceback.
    hint = ("" if args.dimension_numbers else
            "\n(no --dimension-numbers given: lax's default NCHW,OIHW,NCHW applies; channels-last "
            "layers need e.g. --dimension-numbers NHWC,HWIO,NHWC)")
    args.parser.error((str(err) or type(err).__name__) + hint)
  print(e)
  return 0


def cmd_train(args) -> int:
  from cks_jax._src import train
  try:
    import sklearn  # noqa: F401
  except ImportError:
    print("train needs scikit-learn (for its bundled digits): pip install 'cks-jax[demo]'",
          file=sys.stderr)
    return 1
  progress = Progress(2 * 2 * ((args.steps + 9) // 10))
  results = train.train_both(steps=args.steps, batch=args.batch, seed=args.seed,
                             progress=progress)
  progress.close()
  cks, ref = results["cks"], results["lax"]
  print(f"{'model':22s} {'cks ms/step':>12s} {'lax ms/step':>12s} {'speed-up':>9s} "
        f"{'final loss cks':>15s} {'final loss lax':>15s}")
  for model, keys in (("DCGAN (D + G step)", ("gan", "gan_d")),
                      ("dilated classifier", ("dilated", "dilated"))):
    t, k = keys
    fc, fr = np.mean(cks.losses[k][-20:]), np.mean(ref.losses[k][-20:])
    print(f"{model:22s} {cks.step_ms[t]:12.2f} {ref.step_ms[t]:12.2f} "
          f"{ref.step_ms[t] / cks.step_ms[t]:8.2f}x {fc:15.4f} {fr:15.4f}")
  print(f"dilated classifier held-out accuracy: cks {cks.accuracy:.3f}, lax {ref.accuracy:.3f}")
  out = {name: {"losses": r.losses, "step_ms": r.step_ms, "accuracy": r.accuracy}
         for name, r in results.items()}
  with open(args.json, "w") as f:
    json.dump(out, f)
  print(f"wrote {args.json}")
  try:
    train.plot(results, args.plot)
    print(f"wrote {args.plot}")
  except ImportError:
    print("the plot needs matplotlib: pip install 'cks-jax[demo]'", file=sys.stderr)
  return 0


def cmd_demo(args) -> int:
  """A quick tour: explain one layer, the quick benchmark, a short training run."""
  import cks_jax
  print("cks-jax demo: C-K-S convolutions vs XLA on this machine\n")
  print("A DCGAN generator layer (stride-2 4x4 transposed conv, 16x16x128 -> 32x32x64):")
  print(cks_jax.explain((16, 16, 16, 128), (4, 4, 128, 64), (1, 1), ((2, 2), (2, 2)), (2, 2),
                        dimension_numbers=("NHWC", "HWIO", "NHWC"), gradients=True))
  print()
  try:
    import matplotlib  # noqa: F401
    bench_plot = args.bench_plot
  except ImportError:
    print("(no matplotlib: skipping plots; pip install 'cks-jax[demo]')", file=sys.stderr)
    bench_plot = None
  ns = argparse.Namespace(shapes=None, layers=None, quick=True, repeats=None,
                          no_torch=args.no_torch, json=args.bench_json, plot=bench_plot)
  rc = cmd_bench(ns)
  if rc:
    return rc
  print("\nTraining on scikit-learn's digits, once on cks-jax and once on jax.lax:")
  return cmd_train(argparse.Namespace(steps=args.steps, batch=64, seed=0, json=args.train_json,
                                      plot=args.train_plot))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="cks-jax", description=__doc__)
  sub = p.add_subparsers(dest="cmd", required=True)

  b = sub.add_parser("bench", help="benchmark fwd / d-lhs / d-rhs against XLA (and PyTorch)")
  b.add_argument("--layers", help="regex on layer name or family (e.g. 'dcgan|atrous')")
  b.add_argument("--quick", action="store_true", help="a representative subset, ~1 minute")
  b.add_argument("--repeats", type=int, help="timed runs per op (median is reported)")
  b.add_argument("--min-time", type=float, default=None, metavar="SECONDS",
                 help="timed seconds per op and backend, at least (default 0.3; GPU kernels "
                      "of microseconds need less)")
  b.add_argument("--shapes", help="a bench_shapes.json of your own")
  b.add_argument("--no-torch", action="store_true", help="skip PyTorch even if installed")
  b.add_argument("--no-portable", action="store_true",
                 help="skip the portable (lax ops) C-K-S column")
  b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                 help="operand dtype of every backend (default float32)")
  b.add_argument("--json", help="write the results as JSON")
  b.add_argument("--load", metavar="JSON",
                 help="print (and --plot) a saved --json run instead of timing")
  b.add_argument("--plot", help="write a PNG bar chart of the speed-ups (needs matplotlib)")
  b.set_defaults(fn=cmd_bench)

  e = sub.add_parser("explain", help="which C-K-S algorithm a layer runs, and zeros avoided")
  e.add_argument("--lhs", required=True, type=_ints, help="lhs shape, e.g. 16,16,16,128")
  e.add_argument("--rhs", required=True, type=_ints, help="rhs shape, e.g. 4,4,128,64")
  e.add_argument("--strides", type=_ints, help="window strides, e.g. 1,1 (default all 1)")
  e.add_argument("--padding", default="VALID", type=_padding,
                 help="SAME, VALID, SAME_LOWER or lo,hi,lo,hi")
  e.add_argument("--lhs-dilation", type=_ints, help="e.g. 2,2 (transposed convolution)")
  e.add_argument("--rhs-dilation", type=_ints, help="e.g. 2,2 (atrous convolution)")
  e.add_argument("--dimension-numbers", type=_dimension_numbers,
                 help="e.g. NHWC,HWIO,NHWC (default lax's: NCHW,OIHW,NCHW)")
  e.add_argument("--groups", type=int, default=1, help="feature_group_count")
  e.set_defaults(fn=cmd_explain, parser=e)

  t = sub.add_parser("train", help="train a DCGAN and a dilated net on cks-jax and on lax")
  t.add_argument("--steps", type=int, default=400, help="training steps per model and backend")
  t.add_argument("--batch", type=int, default=64)
  t.add_argument("--seed", type=int, default=0)
  t.add_argument("--json", default="cks_train.json", help="losses and step times")
  t.add_argument("--plot", default="cks_train.png", help="loss curves and samples (PNG)")
  t.set_defaults(fn=cmd_train)

  d = sub.add_parser("demo", help="explain a layer, quick benchmark, short training run")
  d.add_argument("--no-torch", action="store_true")
  d.add_argument("--steps", type=int, default=300)
  d.add_argument("--bench-json", default="cks_bench.json")
  d.add_argument("--bench-plot", default="cks_bench.png")
  d.add_argument("--train-json", default="cks_train.json")
  d.add_argument("--train-plot", default="cks_train.png")
  d.set_defaults(fn=cmd_demo)

  args = p.parse_args(argv)
  return args.fn(args)


if __name__ == "__main__":
  sys.exit(main())
