"""The portable backend's gradient of every transposed convolution, against XLA's.

For each KS-deconv layer of the benchmark set: the time of the jitted
gradient of sum(conv(x, w)**2) with respect to both operands (forward
included), with XLA's own convolution and with cks-jax on the portable
backend (and, for reference, on the FFI kernel), side by side in one process.
The portable path is what runs on TPUs, ROCm and GPUs without the CUDA library.

    python benchmarks/portable_grad.py [--layers REGEX] [--repeats N]
"""
from __future__ import annotations

import argparse
import json
import re
import time
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import cks_jax


def interleaved_median_ms(fns, *args, repeats: int) -> list[float]:
  """Median time of each function, the functions called in turn within each
  of ``repeats`` rounds: a change in the machine's load (a 2-core machine's
  timings drift by up to 2x within minutes) then moves every column alike
  instead of the ratios."""
  for fn in fns:
    jax.block_until_ready(fn(*args))
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, ts in zip(fns, times):
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      ts.append(time.perf_counter() - t)
  return [1e3 * float(np.median(ts)) for ts in times]


def grad_fn(conv, kw):
  return jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w, **kw) ** 2), argnums=(0, 1)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layers", default=".", help="regex on the layer name")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  shapes = json.loads(resources.files("cks_jax").joinpath("data/bench_shapes.json").read_text())
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, float32, "
        f"median of {args.repeats} interleaved rounds; gradient of sum(y^2) w.r.t. x and w")
  print(f"{'layer':24s} {'xla ms':>9s} {'portable ms':>12s} {'ratio':>7s} {'ffi ms':>9s} {'ratio':>7s}")
  ratios = []
  for layer in shapes["layers"]:
    if layer["family"] != "ks_deconv" or not re.search(args.layers, layer["name"]):
      continue
    kw = dict(window_strides=layer["window_strides"],
              padding=[tuple(p) for p in layer["padding"]],
              lhs_dilation=layer["lhs_dilation"], rhs_dilation=layer["rhs_dilation"],
              dimension_numbers=tuple(layer["dimension_numbers"]),
              feature_group_count=layer.get("feature_group_count", 1))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(layer["lhs_shape"]), jnp.float32)
    w = jnp.asarray(rng.standard_normal(layer["rhs_shape"]), jnp.float32)
    t_xla, t_por, t_ffi = interleaved_median_ms(
        [grad_fn(lax.conv_general_dilated, kw)]
        + [grad_fn(lambda *a, b=b, **k: cks_jax.conv_general_dilated(*a, backend=b, **k), kw)
           for b in ("portable", "ffi")], x, w, repeats=args.repeats)
    ratios.append(t_xla / t_por)
    print(f"{layer['name']:24s} {t_xla:9.2f} {t_por:12.2f} {t_xla / t_por:6.1f}x "
          f"{t_ffi:9.2f} {t_xla / t_ffi:6.1f}x", flush=True)
  print(f"portable vs XLA: min {min(ratios):.1f}x, geometric mean "
        f"{float(np.exp(np.mean(np.log(ratios)))):.1f}x")


if __name__ == "__main__":
  main()
