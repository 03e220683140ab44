"""The portable C-K-S backend: the decomposition written in plain jax.lax ops.

Runs on any XLA backend (TPU, ROCm, ...). Per spatial dimension the outputs
split into phases (:mod:`geometry`: K split by lhs dilation, S split by rhs
dilation). Each phase reads the input with a period ``ustride`` and its
sub-kernel ``k0::kstep``; a phase whose window stride inside the polyphase
sub-image is ``s2 > 1`` is split once more by tap residue ``tau = t mod s2``.
Every piece is then a dense convolution with window stride 1, lhs dilation 1
and rhs dilation 1 of a strided slice of the original input, with at most a
few zeros of explicit padding at its borders (the trimmed border), and the
phase outputs are interleaved with stack + reshape.

Because no piece has a stride or a dilation, plain JAX autodiff of this
function is again made of stride-1, undilated convolutions (the transposes of
slices and interleaves are pads and slices), to any order: it needs no
custom rule and no zero-inserted tensor ever reaches a convolution.
"""
from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
from jax import lax

from cks_jax._src import geometry, shapes


def _ceil_div(x: int, y: int) -> int:
  return -(-x // y)


def conv_portable(lhs, rhs, *, window_strides, padding, lhs_dilation, rhs_dilation,
                  dimension_numbers, feature_group_count, batch_group_count, precision,
                  out_dtype):
  """``lax.conv_general_dilated`` semantics (``preferred_element_type=out_dtype``),
  computed as zero-free dense sub-problems."""
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  nd = len(lhs_spec) - 2
  out_dtype = np.dtype(out_dtype)
  spec = shapes.ConvSpec(tuple(window_strides), tuple(padding), tuple(lhs_dilation),
                         tuple(rhs_dilation), dimension_numbers, feature_group_count,
                         batch_group_count)
  out_shape = shapes.out_shape(lhs.shape, rhs.shape, spec)
  # Partial sums over tap residues are added outside the conv: keep them in
  # float32 for 16-bit types, as lax's own accumulation is.
  acc_dtype = np.dtype(np.float32) if out_dtype.itemsize < 4 else out_dtype
  if 0 in out_shape:
    return jnp.zeros(out_shape, out_dtype)

  dims = [geometry.Dim(lhs.shape[lhs_spec[2 + i]], rhs.shape[rhs_spec[2 + i]],
                       out_shape[out_spec[2 + i]], window_strides[i], lhs_dilation[i],
                       rhs_dilation[i], padding[i][0]) for i in range(nd)]
  # Phases are residues o0 of o mod L: sorted by o0 they interleave in order.
  phase_lists = [sorted(geometry.phases(dm), key=lambda p: p.o0) for dm in dims]

  def zeros(sizes):
    shape = list(out_shape)
    for i, n in enumerate(sizes):
      shape[out_spec[2 + i]] = n
    return jnp.zeros(shape, acc_dtype)

  def piece(dm, p, tau):
    """Slices and padding of the dense sub-problem for taps t = tau (mod s2),
    or None if it reads no real input."""
    s2 = p.ustride // p.tstride
    T = _ceil_div(p.T - tau, s2)  # taps of this residue: t = tau + s2*t'
    if T <= 0:
      return None
    # Output u, tap t' read input i = e + D*(u + t'): a dense stride-1 conv of
    # the polyphase sub-image x[c::D] starting at its element j0.
    D, e = p.ustride, p.base + p.tstride * tau
    c, j0 = e % D, e // D
    real = _ceil_div(dm.in_size - c, D) if dm.in_size > c else 0
    need = j0 + p.U + T - 1
    start, stop = max(j0, 0), min(need, real)
    if stop <= start:
      return None
    lhs_slice = (c + D * start, c + D * (stop - 1) + 1, D)
    sub_kernel = (p.k0 + p.kstep * tau, p.k0 + p.kstep * (tau + s2 * (T - 1)) + 1,
                  p.kstep * s2)
    return lhs_slice, sub_kernel, (start - j0, need - stop)

  def phase_output(chosen):
    """Output of one combination of phases (one per dimension)."""
    sizes = [p.U for p in chosen]
    total = None
    for taus in itertools.product(*[range(p.ustride // p.tstride) for p in chosen]):
      pieces = [piece(dm, p, t) for dm, p, t in zip(dims, chosen, taus)]
      if any(pc is None for pc in pieces):
        continue
      x, w = lhs, rhs
      for i, (ls, ks, _) in enumerate(pieces):
        x = lax.slice_in_dim(x, *ls, axis=lhs_spec[2 + i])
        w = lax.slice_in_dim(w, *ks, axis=rhs_spec[2 + i])
      y = lax.conv_general_dilated(
          x, w, (1,) * nd, [pc[2] for pc in pieces], None, None, dimension_numbers,
          feature_group_count, batch_group_count, precision=precision,
          preferred_element_type=acc_dtype)
      total = y if total is None else total + y
    return zeros(sizes) if total is None else total

  def build(chosen):
    """Dimensions before len(chosen) restricted to the chosen phases, the
    rest complete: interleave the phases of dimension len(chosen)."""
    i = len(chosen)
    if i == nd:
      return phase_output(chosen)
    parts = {p.o0: build(chosen + [p]) for p in phase_lists[i]}
    O, ax = dims[i].out_size, out_spec[2 + i]
    L = phase_lists[i][0].L
    if L == 1:
      return parts[0]
    umax = _ceil_div(O, L)
    rows = []
    for r in range(L):  # a residue >= O has no phase: a placeholder, sliced away
      part = parts.get(r)
      if part is None:
        sizes = [p.U for p in chosen] + [umax] + [d.out_size for d in dims[i + 1:]]
        part = zeros(sizes)
      elif part.shape[ax] < umax:
        part = lax.pad(part, jnp.zeros((), part.dtype),
                       [(0, umax - part.shape[ax] if k == ax else 0, 0)
                        for k in range(part.ndim)])
      rows.append(part)
    y = jnp.stack(rows, axis=ax + 1)
    y = y.reshape(y.shape[:ax] + (umax * L,) + y.shape[ax + 2:])
    return lax.slice_in_dim(y, 0, O, axis=ax)

  out = build([])
  return out if out.dtype == out_dtype else out.astype(out_dtype)
