"""Random medium-sized convolutions on the CPU kernel against the direct oracle.

test_fuzz.py draws every parameter but keeps outputs under 20,000 elements,
below the sizes at which the kernel changes path (streamed tiles over 2 MB,
shared packed B, interleaved taps, rows split among threads, ...). This draws
problems of 2e4-6e6 output elements, at most 4 GFLOP: 1-3 spatial
dimensions, transposed (lhs dilation 2-4), dilated (2-8), strided (2-3) or
plain, 1-4 feature groups, 3-256 channels, odd sizes, padding from -1 to past
the window (negative included), NHWC or NCHW, float32 or bfloat16. Each is run
with ``backend="ffi"`` (value and both VJPs, one jit) and compared with
:func:`oracle.direct_conv` (pad, slice, einsum: no convolution op, so no
XLA:CPU convolution bug, openxla/xla#48713, in the reference) in float32 on
the same rounded operands.

  python tests/fuzz_medium.py --seed 3 --seconds 1200

``test_fuzz.py::test_medium_problems`` runs a few fixed seeds in CI.
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import cks_jax
from oracle import direct_conv, relative_error, value_and_vjp

# oracle.relative_error (as oracle.assert_close's): reductions of up
# to 4,096 terms (float32), bfloat16 operands rounded the same on both sides
# but a bfloat16 output rounded once more.
TOL = {"float32": 1e-4, "bfloat16": 3e-2}
MIN_OUT, MAX_OUT, MAX_FLOP = 20_000, 6_000_000, 4e9


def draw_problem(rng: np.random.Generator) -> dict:
  """One problem's parameters (not necessarily valid: see :func:`arguments`)."""
  nd = int(rng.choice([1, 2, 2, 2, 3]))
  family = str(rng.choice(["transposed", "dilated", "strided", "plain"]))
  groups = int(rng.choice([1, 1, 1, 2, 4]))
  cin = max(groups, int(rng.choice([3, 8, 16, 24, 32, 48, 64, 96, 128, 256])) // groups * groups)
  cout = max(groups,
             int(rng.choice([1, 3, 8, 16, 17, 32, 33, 64, 100, 128, 256])) // groups * groups)
  k = [int(rng.choice([1, 2, 3, 4, 5])) for _ in range(nd)]
  strides, lhs_dil, rhs_dil = [1] * nd, [1] * nd, [1] * nd
  if family == "transposed":
    lhs_dil = [int(rng.choice([2, 2, 3, 4])) for _ in range(nd)]
  elif family == "dilated":
    rhs_dil = [int(rng.choice([2, 3, 4, 6, 8])) for _ in range(nd)]
  elif family == "strided":
    strides = [int(rng.choice([2, 2, 3])) for _ in range(nd)]
  base = {1: [256, 512, 1024, 2048], 2: [8, 12, 16, 24, 32, 48, 64], 3: [4, 6, 8, 12, 16]}[nd]
  spatial = [int(rng.choice(base)) + int(rng.integers(0, 3)) for _ in range(nd)]
  padding = []
  for d in range(nd):
    reach = (k[d] - 1) * rhs_dil[d]
    padding.append((int(rng.integers(-1, reach + 2)), int(rng.integers(-1, reach + 2))))
  return dict(nd=nd, family=family, groups=groups, cin=cin, cout=cout, k=k,
              strides=strides, lhs_dilation=lhs_dil, rhs_dilation=rhs_dil, spatial=spatial,
              batch=int(rng.choice([1, 2, 4, 8])), padding=padding,
              layout=str(rng.choice(["NHWC", "NHWC", "NCHW"])),
              dtype=str(rng.choice(["float32", "float32", "bfloat16"])))


def arguments(p: dict):
  """(lhs shape, rhs shape, conv keyword arguments), or None where lax rejects
  the problem or its size is out of range."""
  nd, sp = p["nd"], "DHW"[3 - p["nd"]:]
  dn = ("N" + sp + "C", sp + "IO", "N" + sp + "C") if p["layout"] == "NHWC" else (
      "NC" + sp, "OI" + sp, "NC" + sp)
  lhs_sizes = {"N": p["batch"], "C": p["cin"], **dict(zip(sp, p["spatial"]))}
  rhs_sizes = {"O": p["cout"], "I": p["cin"] // p["groups"], **dict(zip(sp, p["k"]))}
  lhs_shape = tuple(lhs_sizes[c] for c in dn[0])
  rhs_shape = tuple(rhs_sizes[c] for c in dn[1])
  kw = dict(window_strides=tuple(p["strides"]), padding=p["padding"],
            lhs_dilation=tuple(p["lhs_dilation"]), rhs_dilation=tuple(p["rhs_dilation"]),
            dimension_numbers=dn, feature_group_count=p["groups"])
  try:
    out = jax.eval_shape(lambda l, r: lax.conv_general_dilated(l, r, **kw),
                         jax.ShapeDtypeStruct(lhs_shape, jnp.float32),
                         jax.ShapeDtypeStruct(rhs_shape, jnp.float32))
  except (ValueError, TypeError):
    return None
  size = int(np.prod(out.shape))
  flop = 2 * size * int(np.prod(p["k"])) * p["cin"] // p["groups"]
  if not MIN_OUT <= size <= MAX_OUT or flop > MAX_FLOP:
    return None
  return lhs_shape, rhs_shape, kw


def check(p: dict, seed: int) -> list[str]:
  """Runs one problem (from :func:`arguments`-valid ``p``); returns its
  mismatches (empty when value and both VJPs are within tolerance)."""
  lhs_shape, rhs_shape, kw = arguments(p)
  rng = np.random.default_rng(seed)
  dtype = jnp.dtype(p["dtype"])
  fan_in = int(np.prod(p["k"])) * p["cin"] // p["groups"]
  lhs = jnp.asarray(rng.standard_normal(lhs_shape), dtype)
  rhs = jnp.asarray(rng.standard_normal(rhs_shape) / np.sqrt(fan_in), dtype)

  cks = lambda l, r: cks_jax.conv_general_dilated(l, r, **kw, backend="ffi")
  ref = lambda l, r: direct_conv(l, r, **kw)
  out_shape = jax.eval_shape(cks, lhs, rhs).shape
  ct = jnp.asarray(rng.standard_normal(out_shape), dtype)
  got = jax.jit(value_and_vjp(cks))(lhs, rhs, ct)
  want = jax.jit(value_and_vjp(ref))(*(x.astype(jnp.float32) for x in (lhs, rhs, ct)))
  bad = []
  for name, g, w in zip(("value", "d lhs", "d rhs"), got, want):
    if g.shape != w.shape:
      bad.append(f"{name}: shape {g.shape} != {w.shape}")
      continue
    err = relative_error(g, w)
    if not err <= TOL[p["dtype"]]:
      bad.append(f"{name}: relative error {err:.3g}")
  return bad


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--seconds", type=float, default=600)
  args = parser.parse_args(argv)
  rng = np.random.default_rng(args.seed)
  start, done, failed = time.time(), 0, 0
  while time.time() - start < args.seconds:
    p = draw_problem(rng)
    if arguments(p) is None:
      continue
    bad = check(p, seed=done)
    done += 1
    if bad:
      failed += 1
      print(f"MISMATCH {bad} in {p}", flush=True)
    if done % 20 == 0:
      print(f"{done} problems, {failed} with mismatches, {time.time() - start:.0f} s", flush=True)
  print(f"{done} problems, {failed} with mismatches")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
