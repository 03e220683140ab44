"""Side-by-side benchmark of cks-jax, XLA's convolution and (if installed) PyTorch.

Every layer is timed for forward, d-lhs and d-rhs, each backend in the same
process, as the median of repeated runs after a warm-up. Useful GFLOP/s count
only products of real elements (zeros of padding or dilation excluded), so
the same useful work is credited to every backend.
"""
from __future__ import annotations

import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cks_jax._src import api, backends, explain

OPS = ("fwd", "dlhs", "drhs")


def load_layers(path: str | None = None) -> list[dict]:
  """The benchmark layer set (the package's copy of bench_shapes.json by default)."""
  if path is None:
    text = resources.files("cks_jax").joinpath("data/bench_shapes.json").read_text()
  else:
    with open(path) as f:
      text = f.read()
  return json.loads(text)["layers"]


def conv_kwargs(layer: dict) -> dict:
  return dict(window_strides=tuple(layer["window_strides"]),
              padding=tuple(tuple(p) for p in layer["padding"]),
              lhs_dilation=tuple(layer["lhs_dilation"]),
              rhs_dilation=tuple(layer["rhs_dilation"]),
              dimension_numbers=tuple(layer["dimension_numbers"]),
              feature_group_count=layer.get("feature_group_count", 1))


# Fast ops are repeated for at least this long (up to budget_s): a median of
# 5 millisecond runs on a busy 2-core machine moved by 2x between runs.
MIN_TIMED_S = 0.3
# Each function's share of a timing round: back-to-back calls for at least
# this long, after an untimed one; then a pause, in which the threads of the
# library just timed stop spinning (OpenMP's and XLA's pools spin after
# their work: with no pause, lax's own convolution measured 0.88-0.95x
# XLA's time when routed through cks-jax and timed right after PyTorch).
BLOCK_S = 0.02
SETTLE_S = 0.01
# A block's untimed first call is timed instead, alone, where it takes at
# least this long (XLA's slowest gradients, 0.1-1 s: a warm-up call would
# double their share of the run for a refill that is a small part of them).
# Timing first calls from BLOCK_S on, as before, timed ops of about BLOCK_S
# on their first call after the other libraries' blocks, where those ran
# slower: in a bench run of every layer up to it, atrous_32_c256_d6's filter
# gradient (cks-jax) took 19.0-28.6 ms on the first calls of its 7 blocks (a
# median of 26.1; 24.95 and 26.0 in two full runs) and 19.0 ms on the one
# call after a warm-up.
ALONE_S = 0.25
# Pipelined blocks (GPUs): at most this many calls in flight, bounding the
# outputs held at once.
MAX_PIPELINED = 64


def time_fn(fn: Callable[[], object], repeats: int, budget_s: float) -> float:
  """Median wall time in ms of ``fn`` (blocking): ``time_interleaved`` of one function."""
  return time_interleaved({"fn": fn}, repeats, budget_s)["fn"]


def _minor_faults() -> int | None:
  """Minor page faults of this process so far (all threads), where the OS reports them."""
  try:
    import resource
  except ImportError:  # pragma: no cover - not on Windows
    return None
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int,
                     budget_s: float, faults: dict[str, float] | None = None,
                     min_time_s: float = MIN_TIMED_S, pipelined: bool = False,
                     sync: Callable[[], object] | None = None,
                     rounds: dict[str, list[float]] | None = None) -> dict[str, float]:
  """Median wall time in ms of each of ``fns`` (blocking), timed in rounds:
  within a round each function runs a block of back-to-back calls, an
  untimed one and then timed ones for at least ``BLOCK_S`` seconds (a call
  of at least ``ALONE_S`` is timed on its own), then a pause of ``SETTLE_S``. At
  least ``repeats`` timed calls and ``min_time_s`` seconds of rounds per function,
  stopping early once ``budget_s`` per function is spent.

  Every function is thus timed with its own operands in the caches, as a
  layer runs inside a training step, and with any other library's threads
  settled (PyTorch's OpenMP threads spin after each call); and a change in
  the machine's load moves every column of a row alike, not the ratios.
  Calling the functions one call each in turn instead left each one's
  operands evicted by the others': the grouped transposed forward took
  2.7-3.1 ms after XLA's or the portable path's call against 1.6-1.9 ms
  back to back.

  ``faults``, if given, receives each function's minor page faults per timed
  call (only one function runs at a time, so the process's count is its own):
  fresh pages of outputs or scratch that the allocator had returned to the OS.

  ``rounds``, if given, receives each function's block medians in ms, round by
  round (every function has a block in every round): the i-th of two
  functions' lists were timed side by side, so their ratio round by round
  shows how much of a small difference between their medians is noise.

  ``pipelined`` (for GPUs): a block's timed calls, as many as the untimed
  call's time fits in ``BLOCK_S`` (at most ``MAX_PIPELINED``), are issued back
  to back and waited for once, at the end, and the block adds its mean time
  per call. A device runs them in order while the host issues the next, as in
  a training loop, so a kernel shorter than the host's dispatch of a call is
  timed as the longer of the two, not as their sum. Each wait also calls
  ``sync`` (e.g. ``torch.cuda.synchronize``), if given."""
  def wait(x):
    jax.block_until_ready(x)
    if sync is not None:
      sync()

  for fn in fns.values():
    wait(fn())
  times: dict[str, list[float]] = {k: [] for k in fns}
  blocks: dict[str, list[float]] = {k: [] for k in fns}
  calls: dict[str, int] = {k: 0 for k in fns}
  flt: dict[str, int] = {k: 0 for k in fns}
  budget = budget_s * len(fns)
  start = time.perf_counter()
  while (min(len(t) for t in times.values()) < repeats
         or time.perf_counter() - start < min(min_time_s * len(fns), budget)):
    for k, fn in fns.items():
      f0 = _minor_faults()
      n_before = len(times[k])
      t_block = time.perf_counter()
      wait(fn())
      first = time.perf_counter() - t_block
      if first >= ALONE_S:
        times[k].append(first)
        calls[k] += 1
      elif pipelined:
        f0 = _minor_faults()  # the untimed call's faults are not counted
        n = int(min(MAX_PIPELINED, max(1.0, BLOCK_S / max(first, 1e-9))))
        t0 = time.perf_counter()
        out = None
        for _ in range(n):
          out = fn()
        wait(out)
        times[k].append((time.perf_counter() - t0) / n)
        calls[k] += n
      else:
        f0 = _minor_faults()  # the untimed call's faults are not counted
        while True:
          t0 = time.perf_counter()
          wait(fn())
          t1 = time.perf_counter()
          times[k].append(t1 - t0)
          calls[k] += 1
          if t1 - t_block >= BLOCK_S:
            break
      if f0 is not None:
        flt[k] += _minor_faults() - f0
      blocks[k].append(1e3 * statistics.median(times[k][n_before:]))
      time.sleep(SETTLE_S)
    if time.perf_counter() - start > budget:
      break
  if faults is not None and _minor_faults() is not None:
    faults.update({k: flt[k] / calls[k] for k in times})
  if rounds is not None:
    rounds.update(blocks)
  return {k: 1e3 * statistics.median(t) for k, t in times.items()}


def _jax_ops(conv: Callable, lhs, rhs) -> dict[str, Callable[[], object]]:
  fwd = jax.jit(conv)
  out = jax.eval_shape(conv, lhs, rhs)
  ct = jnp.ones(out.shape, out.dtype)
  dlhs = jax.jit(lambda l, r, c: jax.vjp(lambda x: conv(x, r), l)[1](c)[0])
  drhs = jax.jit(lambda l, r, c: jax.vjp(lambda w: conv(l, w), r)[1](c)[0])
  return {"fwd": lambda: fwd(lhs, rhs), "dlhs": lambda: dlhs(lhs, rhs, ct),
          "drhs": lambda: drhs(lhs, rhs, ct)}


# ---------------------------------------------------------------- PyTorch
def _torch():
  try:
    import torch  # noqa: F401
    return torch
  except Exception:  # noqa: BLE001 - torch is optional
    return None


def _torch_ops(layer: dict, lhs: np.ndarray, rhs: np.ndarray, dtype: str = "float32"):
  """PyTorch equivalents (channels-last) of a layer, or None where none is simple:
  ``(ops, forward output as float32 on the CPU, on_cuda)``, ``ops`` mapping
  "fwd"/"dlhs"/"drhs" to calls that return without waiting for a GPU.

  ``lhs`` and ``rhs`` are float32; the operands are cast to ``dtype``.

  An lhs-dilated layer is a conv_transpose with stride = lhs_dilation and the
  kernel flipped (output_padding for hi > lo); other layers are plain convs
  with explicit padding.
  """
  torch = _torch()
  if torch is None:
    return None
  import torch.nn.functional as F
  nd = lhs.ndim - 2
  lhs_spec, rhs_spec, _ = layer["dimension_numbers"]
  if lhs_spec[0] != "N" or lhs_spec[-1] != "C" or rhs_spec[-2:] != "IO":
    return None
  kw = conv_kwargs(layer)
  groups = kw["feature_group_count"]
  # Same device as jax: a GPU when jax runs on one and torch sees CUDA.
  dev = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
  tdtype = getattr(torch, dtype)
  x = torch.from_numpy(np.moveaxis(lhs, -1, 1).copy()).to(dev, tdtype)
  w = np.moveaxis(np.moveaxis(rhs, -1, 0), -1, 1)  # O, I, spatial
  fmt = {1: None, 2: torch.channels_last, 3: torch.channels_last_3d}[nd]
  if fmt is not None:
    x = x.contiguous(memory_format=fmt)
  a, d, s, pads = kw["lhs_dilation"], kw["rhs_dilation"], kw["window_strides"], kw["padding"]
  ks = w.shape[2:]
  if any(v > 1 for v in a):
    # torch pads both ends by k - 1 - lo and then the high end by output_padding.
    out_pad = [hi - lo for lo, hi in pads]
    if any(v > 1 for v in s) or any(v > 1 for v in d) or any(
        not 0 <= op < st for op, st in zip(out_pad, a)):
      return None
    # conv_transpose: weight [I, O/groups, k], flipped relative to lax.
    wt = np.flip(w, axis=tuple(range(2, 2 + nd)))
    o = wt.shape[0]
    wt = wt.reshape(groups, o // groups, *wt.shape[1:]).swapaxes(1, 2)
    wt = wt.reshape(groups * wt.shape[1], o // groups, *ks)
    pad = [k - 1 - lo for k, (lo, _) in zip(ks, pads)]
    if any(p < 0 for p in pad):
      return None
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nd]
    weight = torch.from_numpy(np.ascontiguousarray(wt)).to(dev, tdtype)
    conv = lambda x, w: fn(x, w, stride=a, padding=pad, output_padding=out_pad, groups=groups)
  else:
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    weight = torch.from_numpy(np.ascontiguousarray(w)).to(dev, tdtype)
    flat = [p for lo_hi in reversed(pads) for p in lo_hi]
    if all(lo == hi for lo, hi in pads):
      conv = lambda x, w: fn(x, w, stride=s, padding=[lo for lo, _ in pads], dilation=d,
                             groups=groups)
    else:
      conv = lambda x, w: fn(F.pad(x, flat), w, stride=s, dilation=d, groups=groups)
  if fmt is not None:
    weight = weight.contiguous(memory_format=fmt)
  with torch.no_grad():
    out = conv(x, weight)
  ct = torch.ones_like(out)
  xg, wg = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
  # The graph of one forward, kept: a gradient's time is its backward alone (the
  # convolution_backward of the one operand asked for), as jax's jitted VJP of one operand
  # computes no forward.
  y = conv(xg, wg)

  def fwd():
    with torch.no_grad():
      return conv(x, weight)

  def grad(wrt):
    return torch.autograd.grad(y, wrt, ct, retain_graph=True)[0]

  ops = {"fwd": fwd, "dlhs": lambda: grad(xg), "drhs": lambda: grad(wg)}
  # On CUDA the caller waits for the kernels (time_interleaved's sync).
  return ops, out.cpu().float(), dev == "cuda"


# ---------------------------------------------------------------- driver
@dataclass
class Row:
  layer: str
  family: str
  op: str
  gflop: float  # useful work
  cks_ms: float
  xla_ms: float
  torch_ms: float | None = None
  portable_ms: float | None = None
  scratch_mb: float | None = None  # the CPU kernel's extra memory (explain's scratch)
  out_mb: float | None = None  # the op's output, for scale
  cks_faults: float | None = None  # minor page faults per cks-jax call
  xla_faults: float | None = None
  # Block medians in ms, round by round (time_interleaved's rounds).
  cks_rounds: list[float] | None = None
  xla_rounds: list[float] | None = None
  torch_rounds: list[float] | None = None

  @property
  def speedup_vs_xla(self) -> float:
    return self.xla_ms / self.cks_ms

  @property
  def portable_vs_xla(self) -> float | None:
    return None if self.portable_ms is None else self.xla_ms / self.portable_ms

  @property
  def speedup_vs_torch(self) -> float | None:
    return None if self.torch_ms is None else self.torch_ms / self.cks_ms


@dataclass
class Report:
  machine: dict
  rows: list[Row] = field(default_factory=list)

  def to_json(self) -> dict:
    return {"machine": self.machine,
            "rows": [dict(asdict(r), speedup_vs_xla=r.speedup_vs_xla,
                          speedup_vs_torch=r.speedup_vs_torch,
                          portable_vs_xla=r.portable_vs_xla) for r in self.rows]}


def machine_info() -> dict:
  info = {"platform": platform.platform(), "python": sys.version.split()[0],
          "jax": jax.__version__, "device": str(jax.devices()[0].device_kind),
          "backend": jax.default_backend(), "cpu_count": _cpu_count()}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          info["cpu"] = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  torch = _torch()
  if torch is not None:
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    if info["backend"] == "gpu":  # float32 convolutions on TF32 tensor cores or not
      info["torch_cudnn_allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)
  if info["backend"] == "gpu":
    info["jax_default_matmul_precision"] = str(jax.config.jax_default_matmul_precision)
  return info


def _cpu_count() -> int:
  import os
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # pragma: no cover
    return os.cpu_count() or 1


def gemm_gflops(n: int = 1024) -> float:
  """The same-run fp32 GEMM rate of XLA (the practical peak of this machine)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  ms = time_fn(lambda: f(a), 5, 5.0)
  return 2 * n**3 / (ms * 1e-3) / 1e9


def run(layers: Iterable[dict], *, repeats: int = 5, budget_s: float = 3.0,
        with_torch: bool = True, with_portable: bool = True,
        progress: Callable[[str], None] | None = None, dtype: str = "float32",
        min_time_s: float = MIN_TIMED_S,
        checkpoint: Callable[[Report], None] | None = None) -> Report:
  """Benchmarks each layer's fwd, d-lhs and d-rhs on cks-jax (FFI kernel and
  portable lax decomposition), XLA and PyTorch, with operands of ``dtype``
  (``"float32"`` or ``"bfloat16"``). Each op is timed for at least
  ``min_time_s`` seconds per backend (:func:`time_interleaved`).
  ``checkpoint``, if given, is called with the report after each layer."""
  report = Report(machine=machine_info())
  # On a GPU, calls are timed in pipelined blocks (time_interleaved): a
  # blocking wait after every call would time the host's dispatch.
  pipelined = report.machine["backend"] != "cpu"
  report.machine["timing"] = "pipelined blocks" if pipelined else "a wait after each call"
  report.machine["dtype"] = dtype
  report.machine["cks_backend"] = backends.current()  # what the cks column runs
  if with_torch and _torch() is not None:
    _torch().set_num_threads(report.machine["cpu_count"])
  rng = np.random.default_rng(0)
  for layer in layers:
    kw = conv_kwargs(layer)
    lhs_np = rng.standard_normal(layer["lhs_shape"]).astype(np.float32)
    rhs_np = rng.standard_normal(layer["rhs_shape"]).astype(np.float32)
    lhs, rhs = jnp.asarray(lhs_np, dtype), jnp.asarray(rhs_np, dtype)
    ex = explain.explain(lhs, rhs, gradients=True, **kw)
    gflop = 2 * ex.cks_macs / 1e9
    per_op = {"fwd": ex, **{"d" + n[2:]: g for n, g in ex.gradients}}  # "d lhs" -> "dlhs"
    ops_cks = _jax_ops(lambda l, r: api.conv_general_dilated(l, r, **kw), lhs, rhs)
    ops_port = _jax_ops(lambda l, r: api.conv_general_dilated(l, r, backend="portable", **kw),
                        lhs, rhs) if with_portable else None
    ops_xla = _jax_ops(lambda l, r: lax.conv_general_dilated(l, r, **kw), lhs, rhs)
    torch_ops = _torch_ops(layer, lhs_np, rhs_np, dtype) if with_torch else None
    if torch_ops is not None:
      ref = np.asarray(ops_xla["fwd"](), np.float32)
      got = np.moveaxis(torch_ops[1].numpy(), 1, -1)
      scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
      rtol, atol = (1e-3, 1e-2) if dtype == "float32" else (3e-2, 3e-2 * scale)
      if got.shape != ref.shape or not np.allclose(got, ref, rtol=rtol, atol=atol):
        torch_ops = None  # never time a mismatched equivalent
    # Only a timed PyTorch on the GPU needs waiting for (once per block).
    torch_sync = _torch().cuda.synchronize if torch_ops is not None and torch_ops[2] else None
    for op in OPS:
      if progress:
        progress(f"{layer['name']} {op}")
      fns = {"cks": ops_cks[op], "xla": ops_xla[op]}
      if ops_port is not None:
        fns["portable"] = ops_port[op]
      if torch_ops is not None:  # in the same rounds (time_interleaved's blocks)
        fns["torch"] = (lambda f: lambda: (f(), None)[1])(torch_ops[0][op])
      flt: dict[str, float] = {}
      rnd: dict[str, list[float]] = {}
      ms = time_interleaved(fns, repeats, budget_s, flt, min_time_s, pipelined, torch_sync, rnd)
      kept = {k: [float(f"{t:.4g}") for t in v] for k, v in rnd.items()}
      row = Row(layer["name"], layer["family"], op, gflop, cks_ms=ms["cks"], xla_ms=ms["xla"],
                portable_ms=ms.get("portable"), torch_ms=ms.get("torch"),
                cks_faults=flt.get("cks"), xla_faults=flt.get("xla"),
                cks_rounds=kept["cks"], xla_rounds=kept["xla"], torch_rounds=kept.get("torch"))
      e = per_op[op]
      row.out_mb = math.prod(e.shapes[2]) * np.dtype(dtype).itemsize / 2**20
      if e.scratch is not None:
        row.scratch_mb = e.scratch["total"] / 2**20
      report.rows.append(row)
    if checkpoint:
      checkpoint(report)
  return report


def format_table(report: Report, gemm: float | None = None) -> str:
  has_torch = any(r.torch_ms is not None for r in report.rows)
  has_port = any(r.portable_ms is not None for r in report.rows)
  head = f"{'layer':24s} {'op':5s} {'GFLOP':>6s} {'cks ms':>8s} {'GF/s':>6s} {'xla ms':>8s} {'vs xla':>7s}"
  if has_port:
    head += f" {'port ms':>8s} {'port/xla':>8s}"
  if has_torch:
    head += f" {'torch ms':>9s} {'vs torch':>8s}"
  lines = [head, "-" * len(head)]
  for r in report.rows:
    line = (f"{r.layer:24s} {r.op:5s} {r.gflop:6.3f} {r.cks_ms:8.2f} "
            f"{r.gflop / r.cks_ms * 1e3:6.1f} {r.xla_ms:8.2f} {r.speedup_vs_xla:6.2f}x")
    if has_port:
      line += (f" {r.portable_ms:8.2f} {r.portable_vs_xla:7.2f}x" if r.portable_ms is not None
               else f" {'-':>8s} {'-':>8s}")
    if has_torch:
      line += (f" {r.torch_ms:9.2f} {r.speedup_vs_torch:7.2f}x" if r.torch_ms is not None
               else f" {'-':>9s} {'-':>8s}")
    lines.append(line)
  ratios = [r.speedup_vs_xla for r in report.rows]
  lines.append("-" * len(head))
  lines.append(f"geometric mean speed-up vs XLA: {_gmean(ratios):.2f}x over {len(ratios)} ops"
               + (f"; same-run XLA fp32 GEMM rate {gemm:.0f} GFLOP/s" if gemm else "")
               + (" (the higher of {:.0f} before and {:.0f} after the layers)".format(
                   *report.machine["xla_gemm_gflops_measured"])
                  if gemm and len(report.machine.get("xla_gemm_gflops_measured", ())) == 2
                  else ""))
  scr = [r for r in report.rows if r.scratch_mb is not None]
  if scr:
    worst = max(scr, key=lambda r: r.scratch_mb / r.out_mb)
    lines.append(f"CPU kernel scratch (explain): at most {max(r.scratch_mb for r in scr):.1f} MB;"
                 f" largest relative to the output: {worst.scratch_mb:.2f} MB for "
                 f"{worst.out_mb:.2f} MB ({worst.layer} {worst.op})")
  big = [r for r in report.rows if r.family in ("ks_deconv", "sk_dilated") and r.gflop >= 0.5]
  if gemm and big:
    ok = sum(r.gflop / r.cks_ms * 1e3 >= 0.75 * gemm for r in big)
    lines.append(f"KS-deconv/Sk-dilated ops of >= 0.5 GFLOP at >= 75% of the GEMM rate "
                 f"({0.75 * gemm:.0f} GFLOP/s): {ok} of {len(big)}")
  lines += summarize(report)
  m = report.machine
  gpu = (f"GPU {m['device']} (jax precision {m.get('jax_default_matmul_precision')}, "
         f"torch cudnn allow_tf32 {m.get('torch_cudnn_allow_tf32')}; "
         f"timed in {m.get('timing', 'a wait after each call')}) with "
         if m.get("backend") == "gpu" else "")
  lines.append(f"{m.get('dtype', 'float32')} operands; "
               f"machine: {gpu}{m.get('cpu', m['platform'])}, {m['cpu_count']} cores, "
               f"jax {m['jax']}" + (f", torch {m['torch']}" if "torch" in m else ""))
  return "\n".join(lines)


FAMILIES = (("ks_deconv", "KS-deconv, transposed convs"),
            ("sk_dilated", "Sk-dilated, atrous convs"),
            ("convv2", "ConvV2, padded convs"))


FAULTS_SHOWN = 256  # 1 MB of 4 KB pages


def _gmean(xs: list[float]) -> float:
  return math.exp(sum(map(math.log, xs)) / len(xs))


def _spread(xs: list[float]) -> str:
  """Geometric mean (min-max) of speed-ups, as the README's tables give them."""
  return f"{_gmean(xs):.2f}x ({min(xs):.2f}-{max(xs):.2f}x)" if xs else "-"


def summarize(report: Report) -> list[str]:
  """The lines under the table: speed-ups per family and op (geometric mean, min-max), and
  the operations slower than the faster of XLA and PyTorch, each with its ratio."""
  rows = report.rows
  has_torch = any(r.torch_ms is not None for r in rows)
  lines = []
  fams = [(f, name) for f, name in FAMILIES if any(r.family == f for r in rows)]
  fams += [(f, f) for f in dict.fromkeys(r.family for r in rows) if f not in dict(FAMILIES)]
  if fams:
    lines.append(f"{'family (layers)':32s} {'op':5s} {'vs XLA':>22s}"
                 + (f" {'vs PyTorch':>22s}" if has_torch else ""))
  for fam, name in fams:
    n = len({r.layer for r in rows if r.family == fam})
    for op in ("fwd", "dlhs", "drhs"):
      sel = [r for r in rows if r.family == fam and r.op == op]
      if not sel:
        continue
      line = f"{name + f' ({n})':32s} {op:5s} {_spread([r.speedup_vs_xla for r in sel]):>22s}"
      if has_torch:
        line += f" {_spread([r.speedup_vs_torch for r in sel if r.torch_ms is not None]):>22s}"
      lines.append(line)
  if has_torch:
    torch_ratios = [r.speedup_vs_torch for r in rows if r.torch_ms is not None]
    lines.append(f"geometric mean speed-up vs PyTorch: {_gmean(torch_ratios):.2f}x over "
                 f"{len(torch_ratios)} ops")
  # A fresh page costs a fault (a few us on these VMs) inside the timed call: a single op's
  # output is a new buffer at every call (a layer's inside a jitted step is not), and how
  # often the allocator hands back unmapped memory depends on what the process ran before.
  faulty = [r for r in rows if (r.cks_faults or 0) >= FAULTS_SHOWN]
  if faulty:
    lines.append(f"cks-jax calls with >= {FAULTS_SHOWN} minor page faults each (fresh pages of "
                 f"outputs or scratch; XLA's in brackets): "
                 + ", ".join(f"{r.layer} {r.op} {r.cks_faults:.0f} ({r.xla_faults or 0:.0f})"
                             for r in faulty))
  slower = [(min(r.xla_ms, r.torch_ms or math.inf) / r.cks_ms, r) for r in rows]
  slower = sorted((x for x in slower if x[0] < 1.0), key=lambda x: x[0])
  which = "the faster of XLA and PyTorch" if has_torch else "XLA"
  lines.append(f"ops slower than {which}: {len(slower)} of {len(rows)}"
               + "".join(f"{',' if i else ':'} {r.layer} {r.op} {x:.2f}x{_rounds_ahead(r)}"
                         for i, (x, r) in enumerate(slower)))
  return lines


def _rounds_ahead(r: Row) -> str:
  """In how many rounds cks-jax's block was at least as fast as the same round's
  block of the faster of XLA and PyTorch (by their medians), as " (ahead in k
  of n rounds)"; "" for a run saved without its rounds."""
  other = r.torch_rounds if r.torch_ms is not None and r.torch_ms < r.xla_ms else r.xla_rounds
  if not r.cks_rounds or not other or len(other) != len(r.cks_rounds):
    return ""
  ahead = sum(c <= o for c, o in zip(r.cks_rounds, other))
  return f" (ahead in {ahead} of {len(other)} rounds)"


def report_from_json(data: dict) -> Report:
  """A Report back from ``--json``'s file (the derived ratios are recomputed)."""
  names = {f.name for f in fields(Row)}
  if not data["rows"]:
    raise ValueError("it has no rows")
  return Report(machine=data["machine"],
                rows=[Row(**{k: v for k, v in r.items() if k in names}) for r in data["rows"]])


def plot(report: Report, path: str) -> None:
  """Bar chart of the speed-up over XLA (and PyTorch) per layer and op (log scale)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = report.rows
  m = report.machine
  gpu = m.get("backend") == "gpu"
  # The cks column runs "auto": the kernel, except on a GPU (portable or XLA there).
  cks = ("cks-jax auto (portable or XLA)"
         if gpu and str(m.get("cks_backend", "auto")).startswith("auto") else "cks kernel")
  labels = [f"{r.layer} {r.op}" for r in rows]
  y = np.arange(len(rows))
  fig, ax = plt.subplots(figsize=(9, 0.22 * len(rows) + 1.5))
  ax.barh(y - 0.27, [r.speedup_vs_xla for r in rows], height=0.27, label=f"{cks} vs XLA")
  if any(r.portable_ms for r in rows):
    ax.barh(y, [r.portable_vs_xla or 0 for r in rows], height=0.27,
            label="portable (lax ops) vs XLA")
  if any(r.torch_ms for r in rows):
    ax.barh(y + 0.27, [r.speedup_vs_torch or 0 for r in rows], height=0.27,
            label=f"{cks} vs PyTorch")
  ax.axvline(1.0, color="k", lw=0.8)
  ax.set_xscale("log")
  ax.set_yticks(y, labels, fontsize=7)
  ax.invert_yaxis()
  ax.set_xlabel("speed-up (time of the baseline / time of cks-jax); > 1 is faster")
  where = (f"{m['device']} (GPU)" if gpu else f"{m.get('cpu', '')} ({m['cpu_count']} cores)")
  ax.set_title(f"cks-jax vs XLA{' and PyTorch' if 'torch' in m else ''}, "
               f"{m.get('dtype', 'float32')}: {where}", fontsize=9)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
