"""Random medium-sized convolutions on the CPU kernel against the direct oracle.

test_fuzz.py draws every parameter but keeps outputs under 20,000 elements,
below the sizes at which the kernel changes path (streamed tiles over 2 MB,
shared packed B, interleaved taps, rows split among threads, ...). This draws
problems of 2e4-6e6 output elements, at most 4 GFLOP: 1-3 spatial
dimensions, transposed (lhs dilation 2-4), dilated (2-8), strided (2-3) or
plain; one group, 2-4 feature groups, groups of 4-32 channels (the depthwise
kernel's grouped paths), depthwise (channel multiplier 1-2) or batch groups
(filter gradients' form); 3-256 channels, odd sizes, padding from -1 to past
the window (negative included); NHWC, NCHW or random dimension permutations;
float32, bfloat16, float16 or float64, 16-bit ones sometimes with a float32
``preferred_element_type``; three in eight under ``vmap`` (over lhs, rhs or
both). Each is run with ``backend="ffi"`` (or, one in five, ``"auto"``),
value and both VJPs in one jit, and compared with
:func:`oracle.direct_conv` (pad, slice, einsum: no convolution op, so no
XLA:CPU convolution bug, openxla/xla#48713, in the reference) in float32
(float64 for float64) on the same rounded operands.

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

# oracle.relative_error (as oracle.assert_close's), by the dtype of each
# output: reductions of up to 4,096 terms (float32), 16-bit operands rounded
# the same on both sides but a 16-bit output rounded once more.
TOL = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 3e-2, "float16": 4e-3}
MIN_OUT, MAX_OUT, MAX_FLOP = 20_000, 6_000_000, 4e9


def draw_problem(rng: np.random.Generator) -> dict:
  """One problem's parameters (not necessarily valid: see :func:`arguments`)."""
  nd = int(rng.choice([1, 2, 2, 2, 3]))
  family = str(rng.choice(["transposed", "dilated", "strided", "plain"]))
  grouping = str(rng.choice(["one", "one", "one", "few", "channels", "depthwise", "batch"]))
  cin = int(rng.choice([3, 8, 16, 24, 32, 48, 64, 96, 128, 256]))
  cout = int(rng.choice([1, 3, 8, 16, 17, 32, 33, 64, 100, 128, 256]))
  batch = int(rng.choice([1, 2, 4, 8]))
  groups = batch_groups = 1
  if grouping == "few":
    groups = int(rng.choice([2, 4]))
  elif grouping == "channels":  # g in and g out per group (ResNeXt's)
    g = int(rng.choice([4, 8, 16, 32]))
    groups = int(rng.choice([2, 4, 8, 16, 32]))
    cin = cout = g * groups
  elif grouping == "depthwise":
    groups = cin
    cout = cin * int(rng.choice([1, 1, 2]))
  elif grouping == "batch":  # a filter gradient's form: batch = the input's channels
    batch = int(rng.choice([4, 8, 16, 32, 64]))
    batch_groups = int(rng.choice([2, 4, batch]))
    cout = max(batch_groups, cout // batch_groups * batch_groups)
  cin = max(groups, cin // groups * groups)
  cout = max(groups, cout // groups * groups)
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
  dtype = str(rng.choice(["float32", "float32", "float32", "bfloat16", "float16", "float64"]))
  wide = dtype in ("bfloat16", "float16") and rng.random() < 0.3
  return dict(nd=nd, family=family, groups=groups, batch_groups=batch_groups, cin=cin,
              cout=cout, k=k, strides=strides, lhs_dilation=lhs_dil, rhs_dilation=rhs_dil,
              spatial=spatial, batch=batch, padding=padding,
              layout=str(rng.choice(["NHWC", "NHWC", "NCHW", "perm"])),
              perms=[[int(i) for i in rng.permutation(nd + 2)] for _ in range(3)],
              dtype=dtype, preferred="float32" if wide else None,
              backend=str(rng.choice(["ffi", "ffi", "ffi", "ffi", "auto"])),
              vmap=str(rng.choice(["none"] * 5 + ["lhs", "rhs", "both"])),
              vmap_size=int(rng.choice([2, 3])))


def arguments(p: dict):
  """(lhs shape, rhs shape, conv keyword arguments), or None where lax rejects
  the problem or its size is out of range."""
  nd, sp = p["nd"], "DHW"[3 - p["nd"]:]
  lhs_sizes = {"N": p["batch"], "C": p["cin"], **dict(zip(sp, p["spatial"]))}
  rhs_sizes = {"O": p["cout"], "I": p["cin"] // p["groups"], **dict(zip(sp, p["k"]))}
  if p["layout"] == "perm":  # lax.ConvDimensionNumbers: where N, C (O, I) and each spatial are
    lhs_perm, rhs_perm, out_perm = (tuple(q) for q in p["perms"])
    dn = lax.ConvDimensionNumbers(lhs_perm, rhs_perm, out_perm)
    lhs_shape = [0] * (nd + 2)
    for axis, letter in zip(lhs_perm, "NC" + sp):
      lhs_shape[axis] = lhs_sizes[letter]
    rhs_shape = [0] * (nd + 2)
    for axis, letter in zip(rhs_perm, "OI" + sp):
      rhs_shape[axis] = rhs_sizes[letter]
    lhs_shape, rhs_shape = tuple(lhs_shape), tuple(rhs_shape)
  else:
    dn = ("N" + sp + "C", sp + "IO", "N" + sp + "C") if p["layout"] == "NHWC" else (
        "NC" + sp, "OI" + sp, "NC" + sp)
    lhs_shape = tuple(lhs_sizes[c] for c in dn[0])
    rhs_shape = tuple(rhs_sizes[c] for c in dn[1])
  kw = dict(window_strides=tuple(p["strides"]), padding=p["padding"],
            lhs_dilation=tuple(p["lhs_dilation"]), rhs_dilation=tuple(p["rhs_dilation"]),
            dimension_numbers=dn, feature_group_count=p["groups"],
            batch_group_count=p["batch_groups"])
  try:
    out = jax.eval_shape(lambda l, r: lax.conv_general_dilated(l, r, **kw),
                         jax.ShapeDtypeStruct(lhs_shape, jnp.float32),
                         jax.ShapeDtypeStruct(rhs_shape, jnp.float32))
  except (ValueError, TypeError):
    return None
  size = int(np.prod(out.shape)) * (p["vmap_size"] if p.get("vmap", "none") != "none" else 1)
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
  out_dtype = jnp.dtype(p.get("preferred") or dtype)
  ref_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
  fan_in = int(np.prod(p["k"])) * p["cin"] // p["groups"]
  # vmap over a leading axis of lhs, rhs or both (the batching rule's
  # reshapes into groups and batch entries), oracle vmapped alike.
  mapped = {"none": (False, False), "lhs": (True, False), "rhs": (False, True),
            "both": (True, True)}[p.get("vmap", "none")]
  lead = lambda shape, m: ((p["vmap_size"],) if m else ()) + tuple(shape)
  lhs = jnp.asarray(rng.standard_normal(lead(lhs_shape, mapped[0])), dtype)
  rhs = jnp.asarray(rng.standard_normal(lead(rhs_shape, mapped[1])) / np.sqrt(fan_in), dtype)

  def batched(f):
    return jax.vmap(f, in_axes=tuple(0 if m else None for m in mapped)) if any(mapped) else f

  cks = batched(lambda l, r: cks_jax.conv_general_dilated(
      l, r, **kw, preferred_element_type=p.get("preferred"), backend=p.get("backend", "ffi")))
  ref = batched(lambda l, r: direct_conv(l, r, **kw))
  out_shape = jax.eval_shape(cks, lhs, rhs).shape
  ct = jnp.asarray(rng.standard_normal(out_shape), out_dtype)
  got = jax.jit(value_and_vjp(cks))(lhs, rhs, ct)
  want = jax.jit(value_and_vjp(ref))(*(x.astype(ref_dtype) for x in (lhs, rhs, ct)))
  bad = []
  for name, g, w, dt in zip(("value", "d lhs", "d rhs"), got, want, (out_dtype, dtype, dtype)):
    if g.shape != w.shape or g.dtype != dt:
      bad.append(f"{name}: {g.dtype}{g.shape}, want {dt}{w.shape}")
      continue
    err = relative_error(g, w)
    if not err <= TOL[dt.name]:
      bad.append(f"{name}: relative error {err:.3g}")
  return bad


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--seconds", type=float, default=600)
  args = parser.parse_args(argv)
  jax.config.update("jax_enable_x64", True)  # float64 problems (as the tests' conftest)
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
