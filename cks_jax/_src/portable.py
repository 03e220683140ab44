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

Derivatives do not differentiate this function: the primitive's transpose
rules emit cks_conv again (a filter gradient is a convolution with lhs or rhs
dilation), and each is lowered here, so no zero-inserted tensor ever reaches
a convolution, to any order.

These shapes of problem are emitted differently, each because it was
measured faster on XLA:CPU (``benchmarks/portable_grad.py``):

- a convolution with neither lhs nor rhs dilation has no inserted zeros, and
  XLA's own convolution computes only the strided outputs: it is emitted as is,
  one per feature group where XLA:CPU would otherwise compute the groups as a
  block-diagonal kernel (:func:`_xla_conv`), as one GEMM over the input's
  tiles where the kernel equals the stride (:func:`_space_to_depth_dot`), and
  over its windows where it has 1-4 features (:func:`_im2col_dot`: the input
  gradient of a narrow transposed convolution, sharing the windows with the
  filter gradient);
- a transposed convolution (lhs dilation only) is one GEMM over the input
  features followed by a shifted-slice sum per output phase (:func:`_tap_gemm`),
  a GEMM moved depth to space where the kernel equals the dilation
  (:func:`_tiled_tap_dot`); with few output positions (a filter gradient, the
  cotangent as kernel) it is one GEMM of the input with the kernel gathered at
  every position (:func:`_gathered_gemm`), or over the kernel's tiles where
  the positions tile it (:func:`_tiled_gathered_dot`);
- a piece with few output positions and a large, narrow kernel is one
  ``dot_general`` of the input with the kernel shifted to every output
  position, instead of a convolution that XLA runs at a few GFLOP/s;
- batch groups (the filter gradient of a grouped convolution) are rewritten as
  feature groups by moving the batch groups into the feature dimension;
- the phases of a transposed convolution with one or two output features per
  group are merged into one convolution (:func:`_merged_phases`).
"""
from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
from jax import lax

from cks_jax._src import geometry, shapes


def _ceil_div(x: int, y: int) -> int:
  return -(-x // y)


def _read_window(in_size: int, D: int, c: int, j0: int, length: int):
  """Elements j0 .. j0 + length - 1 of the polyphase sub-image x[c::D] of a
  dimension of size ``in_size``: the strided slice (start, stop, step) of the
  real ones and the zero padding (lo, hi) around it, or None if none is real."""
  real = _ceil_div(in_size - c, D) if in_size > c else 0
  need = j0 + length
  start, stop = max(j0, 0), min(need, real)
  if stop <= start:
    return None
  return (c + D * start, c + D * (stop - 1) + 1, D), (start - j0, need - stop)


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
  if batch_group_count > 1:
    lhs, dimension_numbers = _batch_groups_to_features(lhs, dimension_numbers,
                                                       batch_group_count)
    return conv_portable(lhs, rhs, window_strides=window_strides, padding=padding,
                         lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                         dimension_numbers=dimension_numbers,
                         feature_group_count=batch_group_count, batch_group_count=1,
                         precision=precision, out_dtype=out_dtype)
  if all(a == 1 for a in lhs_dilation) and all(d == 1 for d in rhs_dilation):
    out = _xla_conv(lhs, rhs, window_strides, padding, dimension_numbers, feature_group_count,
                    precision, acc_dtype)
    return out.astype(out_dtype)

  if _is_transposed(window_strides, lhs_dilation, rhs_dilation):
    outs = [out_shape[d] for d in out_spec[2:]]
    tiled = outs == list(lhs_dilation)
    gathered = np.prod(outs) <= _GATHER_MAX_POSITIONS and len(lhs_dilation) > 1
    # The waste (an ins x outs count per dimension) only where a gate reads it:
    # a forward's outs can be thousands.
    waste = (_gathered_waste(lhs.shape, rhs.shape, out_shape, dimension_numbers, padding,
                             lhs_dilation) if tiled or gathered else np.inf)
    form = None
    if tiled and waste <= _TILED_MAX_WASTE:
      form = _tiled_gathered_dot
    elif gathered and waste <= _GATHER_MAX_WASTE:
      form = _gathered_gemm
    elif (_tap_gemm_size(lhs.shape, rhs.shape, dimension_numbers)
          <= _TAP_GEMM_MAX_GROWTH * np.prod(out_shape)):
      form = _tap_gemm
    if form is not None:
      return form(lhs, rhs, padding=padding, lhs_dilation=lhs_dilation, out_shape=out_shape,
                  dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                  precision=precision, acc_dtype=acc_dtype).astype(out_dtype)

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
    window = _read_window(dm.in_size, D, e % D, e // D, p.U + T - 1)
    if window is None:
      return None
    lhs_slice, pads = window
    sub_kernel = (p.k0 + p.kstep * tau, p.k0 + p.kstep * (tau + s2 * (T - 1)) + 1,
                  p.kstep * s2)
    return lhs_slice, sub_kernel, pads

  merged = _merged_phases(lhs, rhs, dims, phase_lists, dimension_numbers,
                          feature_group_count, precision, acc_dtype)

  def phase_output(chosen):
    """Output of one combination of phases (one per dimension)."""
    if merged is not None:
      return merged(chosen)
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
      y = _dense_conv(x, w, [pc[2] for pc in pieces], dimension_numbers,
                      feature_group_count, precision, acc_dtype)
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


def _is_transposed(window_strides, lhs_dilation, rhs_dilation) -> bool:
  """A transposed convolution: lhs dilation only (KS-deconv's whole class)."""
  return (all(s == 1 for s in window_strides) and all(d == 1 for d in rhs_dilation)
          and any(a > 1 for a in lhs_dilation))


# The gathered form runs where its output positions are at most this many (its
# stacked kernel is prod(out) / prod(s) times the kernel operand) and it
# multiplies at most this many times the useful products. Measured on XLA:CPU
# (filter gradients against the phase-by-phase form, same process, 2026-12-01):
# DCGAN's last layer 5.6-6.6 -> 2.9-3.6 ms, U-Net k2 s2 64->128 20-26 -> 15-16,
# head_x4 15-18 -> 12-14, grouped 25-35 -> 12-19, fsrcnn and V-Net within noise;
# earlier: DCGAN 4->8 (4x4 inputs, 1.31x border waste) 40 -> 60, and a 1D one
# (N8 L2048 C64 k4 s2) faster phase by phase (7.4 vs 11 ms).
_GATHER_MAX_POSITIONS = 256
_GATHER_MAX_WASTE = 1.2
# The tiled form (:func:`_tiled_gathered_dot`) multiplies the same products as
# the gathered one, in one GEMM with no copy. The bound only keeps a far
# smaller kernel operand than s * input (a huge negative padding) from
# multiplying the work; the layers measured have no waste.
_TILED_MAX_WASTE = 2.0


def _gathered_waste(lhs_shape, rhs_shape, out_shape, dimension_numbers, padding,
                    lhs_dilation) -> float:
  """GEMM products of :func:`_gathered_gemm` per useful product: the kernel
  strided past its ends reads border zeros."""
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  waste = 1.0
  for i, (s, (lo, _)) in enumerate(zip(lhs_dilation, padding)):
    ins, taps, outs = (lhs_shape[lhs_spec[2 + i]], rhs_shape[rhs_spec[2 + i]],
                       out_shape[out_spec[2 + i]])
    t = s * np.arange(ins)[:, None] + lo - np.arange(outs)[None, :]
    useful = np.count_nonzero((t >= 0) & (t < taps))
    if useful == 0:
      return np.inf
    waste *= ins * outs / useful
  return waste


def _gathered_gemm(lhs, rhs, *, padding, lhs_dilation, out_shape, dimension_numbers,
                   feature_group_count, precision, acc_dtype):
  """A transposed convolution with few output positions (the filter gradient
  of a KS-deconv, whose kernel is the cotangent) as a GEMM over input
  features and input positions: one stacked GEMM, or one per position
  (:func:`_per_position_dot`).

  out[b, f, u] = sum_{c, i} x[b, c, i] w[f, c, s*i + lo - u]: for each output
  position u the kernel, strided by s from lo - u, is one dense operand as
  large as the input; stacked next to the output features they make a GEMM
  with K = C * prod(input) and no zero inserted. The stacked kernel is
  prod(out) / prod(s) times the kernel operand.
  """
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  ins = [lhs.shape[d] for d in lhs_spec[2:]]
  outs = [out_shape[d] for d in out_spec[2:]]
  fg = rhs.shape[rhs_spec[0]] // feature_group_count
  per_position = np.prod(outs) <= _PER_POSITION_MAX and fg >= _PER_POSITION_MIN_FEATURES
  if feature_group_count == 1 and fg <= _IM2COL_MAX_FEATURES and not per_position:
    return _window_matrix_dot(lhs, rhs, [lo for lo, _ in padding], lhs_dilation, outs,
                              dimension_numbers, precision, acc_dtype)
  kernels = _strided_windows(rhs, rhs_spec[2:], lhs_dilation, [lo for lo, _ in padding], outs,
                             ins)
  if per_position:
    return _per_position_dot(lhs, kernels, outs, dimension_numbers, feature_group_count,
                             precision, acc_dtype)
  return _stacked_kernel_dot(lhs, kernels, outs, dimension_numbers, feature_group_count,
                             precision, acc_dtype)


def _window_matrix_dot(x, w, los, strides, outs, dimension_numbers, precision, acc_dtype):
  """:func:`_gathered_gemm`'s GEMM (one feature group) over the kernel's
  :func:`_window_matrix`: out[b, f, u] = sum_{c, i} x[b, c, i] w[f, c, s*i + lo - u],
  i.e. the window column t = outs - 1 - u read from lo - outs + 1."""
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  nd = len(lhs_spec) - 2
  ins = [x.shape[d] for d in lhs_spec[2:]]
  mat, rows, cols = _window_matrix(w, rhs_spec[0], rhs_spec[2:], strides,
                                   [lo - o + 1 for lo, o in zip(los, outs)], outs, ins)
  # x with its (c, i...) axes in the order of the matrix's rows, as [M, B].
  to_x = {rhs_spec[1]: lhs_spec[1], **dict(zip(rhs_spec[2:], lhs_spec[2:]))}
  xm = jnp.transpose(x, [to_x[k] for k in rows] + [lhs_spec[0]]).reshape(mat.shape[0], -1)
  # The matrix first, contracting its rows: XLA:CPU runs this transposed-LHS
  # GEMM in place, 2x faster than on a [F * P, M] copy (measured).
  y = lax.dot_general(mat, xm, (([0], [0]), ([], [])), precision=precision,
                      preferred_element_type=acc_dtype)
  size = {rhs_spec[0]: w.shape[rhs_spec[0]], **dict(zip(rhs_spec[2:], outs))}
  y = y.reshape([size[k] for k in cols] + [-1])
  y = lax.rev(y, [cols.index(k) for k in rhs_spec[2:]])  # t -> u, on the small result
  want = {out_spec[0]: ["B"], out_spec[1]: [rhs_spec[0]]}
  want.update({out_spec[2 + i]: [rhs_spec[2 + i]] for i in range(nd)})
  return _transpose_to(y, cols + ["B"], [want[k] for k in range(nd + 2)])


def _strided_windows(a, axes, strides, los, counts, lengths):
  """For every u < counts (row-major), ``a`` read along ``axes`` at
  s*i + lo - u for i < lengths, zero outside ``a``: padded once, then one
  strided slice per u (the gathered kernels of :func:`_gathered_gemm`)."""
  cfg = [(0, 0, 0)] * a.ndim
  pad_lo = []
  for ax, s, lo, count, length in zip(axes, strides, los, counts, lengths):
    pad_lo.append(max(0, count - 1 - lo))
    cfg[ax] = (pad_lo[-1], max(0, s * (length - 1) + lo - (a.shape[ax] - 1)), 0)
  a = lax.pad(a, jnp.zeros((), a.dtype), cfg)
  windows = []
  for u in itertools.product(*[range(c) for c in counts]):
    k = a
    for i, (ax, s, lo, length) in enumerate(zip(axes, strides, los, lengths)):
      start = lo - u[i] + pad_lo[i]
      k = lax.slice_in_dim(k, start, start + s * (length - 1) + 1, s, axis=ax)
    windows.append(k)
  return windows


def _padded_once(a, cfg, axis):
  """``lax.pad(a, 0, cfg)`` with a few more columns along ``axis`` that no
  window reads, written so that XLA:CPU computes the padded ``a`` once before
  the gather that reads it.

  XLA:CPU fuses any cheap producer into a gather, recomputing it for every
  window that reads an element (DCGAN's last layer's cotangent, a col2im sum:
  3.9 ms instead of 0.5 + 0.2), but it does not fuse a concatenation along a
  minor dimension of at least 128 elements: the extra columns (copies of the
  first; zeros would be simplified into the pad) are appended as one, with
  the axes after ``axis`` merged into it."""
  a = lax.pad(a, jnp.zeros((), a.dtype), cfg)
  shape = a.shape
  inner = int(np.prod(shape[axis + 1:]))
  extra = min(shape[axis], max(1, _ceil_div(_UNFUSED_CONCAT_MINOR, inner) - shape[axis]))
  a = a.reshape(shape[:axis] + (-1,))
  a = jnp.concatenate([a, a[..., :extra * inner]], axis=-1)
  return a.reshape(shape[:axis] + (shape[axis] + extra,) + shape[axis + 1:])


# XLA:CPU (cpu_instruction_fusion.cc) leaves a concatenation along a minor
# dimension of at least this many elements unfused.
_UNFUSED_CONCAT_MINOR = 128


def _window_matrix(a, feature, axes, strides, starts, counts, lengths):
  """``a``'s windows as ONE row-major matrix [M, K], and the axes of ``a``
  its rows and its columns run over: row (..., i, ...) holds a[..., s*i + start + t, ...]
  (zero outside ``a``) for t < counts along ``axes``, i < lengths; rows are
  the axes of ``a`` other than ``feature``, columns ``axes`` and ``feature``,
  each in memory order.

  One gather of contiguous runs: measured on XLA:CPU, 0.23 ms for DCGAN's last
  layer's 16 windows of its cotangent, where stacking strided slices took 3
  and a concatenation of the contiguous ones 1.3. The layout is one that both
  gradients of a narrow transposed convolution read in place (the filter
  gradient's GEMM contracts the rows, the input gradient's the columns), so
  XLA builds it once for both."""
  cfg = [(0, 0, 0)] * a.ndim
  for ax, s, b0, c, n in zip(axes, strides, starts, counts, lengths):
    cfg[ax] = (-b0, b0 + s * (n - 1) + c - a.shape[ax], 0)
  a = _padded_once(a, cfg, max(axes))
  rows = [k for k in range(a.ndim) if k != feature]
  step = {ax: s for ax, s in zip(axes, strides)}
  size = {**{k: a.shape[k] for k in rows}, **dict(zip(axes, lengths))}
  shape = tuple(size[k] for k in rows) + (1,)
  index = jnp.concatenate([step.get(k, 1) * lax.broadcasted_iota(np.int32, shape, i)
                           for i, k in enumerate(rows)], axis=-1)
  width = {**dict(zip(axes, counts)), feature: a.shape[feature]}
  slice_sizes = tuple(width.get(k, 1) for k in range(a.ndim))
  cols = [k for k in range(a.ndim) if k in width]
  dnums = lax.GatherDimensionNumbers(
      offset_dims=tuple(range(len(rows), len(rows) + len(cols))),
      collapsed_slice_dims=tuple(k for k in rows if k not in step),
      start_index_map=tuple(rows))
  mat = lax.gather(a, index, dnums, slice_sizes, mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)
  return mat.reshape(int(np.prod(shape)), -1), rows, cols


def _stacked(kernels, spec):
  """The kernels, each transposed to ``spec`` [O, I, spatial...], stacked as
  [O, P, I, spatial...] (:func:`_stacked_kernel_dot`'s GEMM operand)."""
  return jnp.stack([jnp.transpose(k, spec) for k in kernels], axis=1)


def _tiled_gathered_dot(x, w, *, padding, lhs_dilation, out_shape, dimension_numbers,
                        feature_group_count, precision, acc_dtype):
  """:func:`_gathered_gemm` where the output positions equal the dilation in
  every dimension (the filter gradient of a kernel-equals-stride transposed
  convolution, U-Net's k2 s2): the positions tile the kernel operand.

  out[b, f, u] = sum_{c, i} x[b, c, i] w[f, c, s*i + lo - u]: with w cropped
  or zero-extended to [lo - s + 1, lo - s + 1 + s * ins), each spatial
  dimension splits in place into (ins, s) with r = s - 1 - u, so ONE GEMM over
  (c, i) computes every position and nothing is gathered or stacked.
  """
  del out_shape  # the positions are the dilation
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  nd = len(lhs_spec) - 2
  g = feature_group_count
  strides = list(lhs_dilation)
  ins = [x.shape[d] for d in lhs_spec[2:]]
  cfg = [(0, 0, 0)] * w.ndim
  for i, (s, (lo, _)) in enumerate(zip(strides, padding)):
    a, base = rhs_spec[2 + i], lo - s + 1
    cfg[a] = (-base, base + s * ins[i] - w.shape[a], 0)
  if any(c != (0, 0, 0) for c in cfg):
    w = lax.pad(w, jnp.zeros((), w.dtype), cfg)
  # x: features -> (G, C/G); w: output features -> (G, F/G), spatial -> (i, r).
  x, xl = _split_axes(x, {lhs_spec[1]: (("G", g), ("c", None))},
                      {lhs_spec[0]: "B", **{lhs_spec[2 + i]: ("i", i) for i in range(nd)}})
  splits = {rhs_spec[0]: (("G", g), ("F", None))}
  splits.update({rhs_spec[2 + i]: ((("i", i), ins[i]), (("r", i), strides[i]))
                 for i in range(nd)})
  w, wl = _split_axes(w, splits, {rhs_spec[1]: "c"})
  y, yl = _labelled_dot(x, xl, w, wl, ["c"] + [("i", i) for i in range(nd)], ["G"], precision,
                        acc_dtype)
  y = lax.rev(y, [yl.index(("r", i)) for i in range(nd)])  # r = s - 1 - u
  want = {out_spec[0]: ["B"], out_spec[1]: ["G", "F"]}
  want.update({out_spec[2 + i]: [("r", i)] for i in range(nd)})
  return _transpose_to(y, yl, [want[k] for k in range(nd + 2)])


def _windows_tile(rhs_shape, rhs_spec, window_strides) -> bool:
  """A strided convolution whose kernel equals its stride: its windows tile
  the input (the input gradient of U-Net's k2 s2 transposed convolution)."""
  return (any(s > 1 for s in window_strides)
          and all(rhs_shape[rhs_spec[2 + i]] == s for i, s in enumerate(window_strides)))


def _space_to_depth_dot(x, w, window_strides, padding, dimension_numbers, precision,
                        acc_dtype):
  """A convolution whose windows tile the input (:func:`_windows_tile`) as ONE
  GEMM: out[v] = sum_t x[s*v + t - lo] w[t] with t < s, so the input cropped
  or zero-extended to [-lo, s * out - lo) splits in place into (v, t), and t
  joins the features in the contraction. Measured on XLA:CPU: the input
  gradient of U-Net's k2 s2 64->128 layer 14 -> 8 ms; with the two other tiled
  forms its whole gradient 67-71 -> 20-23 ms (same process, 2026-12-01), as
  the cotangent's tiles feed both gradients' GEMMs from one copy."""
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  nd = len(lhs_spec) - 2
  cfg = [(0, 0, 0)] * x.ndim
  outs = []
  for i, (s, (lo, hi)) in enumerate(zip(window_strides, padding)):
    a = lhs_spec[2 + i]
    outs.append((x.shape[a] + lo + hi) // s)
    cfg[a] = (lo, s * outs[i] - lo - x.shape[a], 0)
  if any(c != (0, 0, 0) for c in cfg):
    x = lax.pad(x, jnp.zeros((), x.dtype), cfg)
  x, xl = _split_axes(x, {lhs_spec[2 + i]: ((("v", i), outs[i]), (("t", i), s))
                          for i, s in enumerate(window_strides)},
                      {lhs_spec[0]: "N", lhs_spec[1]: "c"})
  wl = [None] * w.ndim
  wl[rhs_spec[0]], wl[rhs_spec[1]] = "F", "c"
  for i in range(nd):
    wl[rhs_spec[2 + i]] = ("t", i)
  y, yl = _labelled_dot(x, xl, w, wl, ["c"] + [("t", i) for i in range(nd)], [], precision,
                        acc_dtype)
  want = {out_spec[0]: ["N"], out_spec[1]: ["F"]}
  want.update({out_spec[2 + i]: [("v", i)] for i in range(nd)})
  return _transpose_to(y, yl, [want[k] for k in range(nd + 2)])


# A strided convolution with at most this many input features runs as one GEMM
# over its windows (:func:`_im2col_dot`), not as XLA's convolution, where the
# GEMM's depth (features x taps) is at least _IM2COL_MIN_DEPTH and its windows
# at most _IM2COL_MAX_ELEMENTS. Measured on XLA:CPU (same process): the input
# gradients of DCGAN's last layer (3 features, k4 s2) and fsrcnn's (1, k9 s3),
# 2.8 -> 2.1 and 2.1 -> 1.7 ms alone, and the whole gradient 7.6 -> 6.2 and
# 5 -> 4.6, as the windows are also the filter gradient's; slower: 1 feature
# k3 s2 (depth 9: 0.42 -> 0.84 ms), 4 features k3 s2 (depth 36: 1.0 -> 1.4),
# 3 features k4 s2 with N64 (12 MB of windows: 12 -> 16 ms), 3 features k7 s2
# (38 MB: 18 -> 90 ms).
_IM2COL_MAX_FEATURES = 4
_IM2COL_MIN_DEPTH = 48
_IM2COL_MAX_ELEMENTS = 1 << 20


def _im2col_pays(lhs_shape, rhs_shape, window_strides, padding, dimension_numbers) -> bool:
  """Whether :func:`_im2col_dot` runs for this strided convolution (the gates above)."""
  lhs_spec, rhs_spec, _ = dimension_numbers
  feats = rhs_shape[rhs_spec[1]]
  taps = int(np.prod([rhs_shape[d] for d in rhs_spec[2:]]))
  outs = [shapes.stride_dim(lhs_shape[a] + lo + hi, rhs_shape[k], s)
          for a, k, s, (lo, hi) in zip(lhs_spec[2:], rhs_spec[2:], window_strides, padding)]
  return (any(s > 1 for s in window_strides) and feats <= _IM2COL_MAX_FEATURES
          and feats * taps >= _IM2COL_MIN_DEPTH
          and feats * taps * lhs_shape[lhs_spec[0]] * np.prod(outs) <= _IM2COL_MAX_ELEMENTS)


def _im2col_dot(x, w, window_strides, padding, dimension_numbers, precision, acc_dtype):
  """A strided convolution with few input features as ONE GEMM over its
  windows: out[n, o, v] = sum_{c, t} x[n, c, s*v + t - lo] w[o, c, t], the
  columns of :func:`_window_matrix`. As the input gradient of a transposed
  convolution (x the cotangent) this is the very matrix of its filter
  gradient's gathered kernels, which XLA then builds once for both."""
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  nd = len(lhs_spec) - 2
  ks = [w.shape[d] for d in rhs_spec[2:]]
  outs = [shapes.stride_dim(x.shape[a] + lo + hi, k, s)
          for a, k, s, (lo, hi) in zip(lhs_spec[2:], ks, window_strides, padding)]
  mat, rows, cols = _window_matrix(x, lhs_spec[1], lhs_spec[2:], window_strides,
                                   [-lo for lo, _ in padding], ks, outs)
  # The kernel as [K, O], its (C, T...) axes in the order of the matrix's columns.
  to_w = {lhs_spec[1]: rhs_spec[1], **dict(zip(lhs_spec[2:], rhs_spec[2:]))}
  w = jnp.transpose(w, [to_w[k] for k in cols] + [rhs_spec[0]])
  y = lax.dot_general(mat, w.reshape(mat.shape[1], -1), (([1], [0]), ([], [])),
                      precision=precision, preferred_element_type=acc_dtype)
  # The rows' spatial sizes are now the outputs'.
  sizes = {lhs_spec[0]: x.shape[lhs_spec[0]], **dict(zip(lhs_spec[2:], outs))}
  y = y.reshape([sizes[k] for k in rows] + [w.shape[-1]])
  want = {out_spec[0]: [lhs_spec[0]], out_spec[1]: ["O"]}
  want.update({out_spec[2 + i]: [lhs_spec[2 + i]] for i in range(nd)})
  return _transpose_to(y, rows + ["O"], [want[k] for k in range(nd + 2)])


def _labelled_dot(a, al, b, bl, reduce, batch, precision, acc_dtype):
  """dot_general of ``a`` and ``b`` with axes labelled ``al`` and ``bl``,
  contracting the labels ``reduce`` (in ``a``'s memory order, so that XLA
  reads ``a`` in place where it can) over ``batch``. Returns the result and
  its labels: batch, then ``a``'s free axes, then ``b``'s."""
  reduce = sorted(reduce, key=al.index)
  batch = [k for k in batch if k in al]
  free = lambda labels: [k for k in labels if k not in reduce and k not in batch]
  # Both operands explicitly as row-major matrices, [batch, M, K] and
  # [batch, K, N]: equal regroupings of one tensor (the cotangent, by the
  # input and the filter gradient) are then one op that XLA computes once.
  a = jnp.transpose(a, [al.index(k) for k in list(batch) + free(al) + reduce])
  b = jnp.transpose(b, [bl.index(k) for k in list(batch) + reduce + free(bl)])
  nb, nr = len(batch), len(reduce)
  y = lax.dot_general(a, b, ((list(range(a.ndim - nr, a.ndim)), list(range(nb, nb + nr))),
                             (list(range(nb)), list(range(nb)))),
                      precision=precision, preferred_element_type=acc_dtype)
  return y, list(batch) + free(al) + free(bl)


def _split_axes(a, splits, names):
  """Reshapes axis k of ``a`` into the (label, size) pairs ``splits[k]`` (one
  size may be None: the rest; a "G" of size 1 gets no axis) and labels the
  others by ``names[k]``. Returns the array and its axis labels."""
  shape, labels = [], []
  for k, n in enumerate(a.shape):
    if k not in splits:
      shape.append(n)
      labels.append(names[k])
      continue
    parts = splits[k]
    known = int(np.prod([size for _, size in parts if size is not None]))
    for label, size in parts:
      if label == "G" and size == 1:  # a single group gets no axis
        continue
      shape.append(n // known if size is None else size)
      labels.append(label)
  return a.reshape(shape), labels


def _transpose_to(y, labels, want):
  """Transposes ``y`` (axes labelled ``labels``) so that output axis k holds
  those of the labels ``want[k]`` it has, merged in that order."""
  want = [[k for k in ks if k in labels] for ks in want]  # e.g. no "G" axis
  perm = [labels.index(k) for ks in want for k in ks]
  y = jnp.transpose(y, perm)
  sizes, at = [], 0
  for ks in want:
    sizes.append(int(np.prod(y.shape[at:at + len(ks)])))
    at += len(ks)
  return y.reshape(sizes)


# Up to this many positions, each with at least this many output features per
# group, the gathered GEMM runs as one GEMM per position: the stacked operand is
# a transposing copy that XLA:CPU makes at ~1 GB/s. Measured (filter gradients,
# same process): grouped 15 -> 7 ms, dcgan_g_16to32 40 -> 16, unet3d 1.0 -> 0.7,
# U-Net k2 s2 unchanged; with 1-3 features (fsrcnn, DCGAN's last layer) or 64-81
# positions (head_x4, V-Net) the many narrow GEMMs were 1.3-2x slower.
_PER_POSITION_MAX = 16
_PER_POSITION_MIN_FEATURES = 16


def _per_position_dot(x, kernels, outs, dimension_numbers, feature_group_count, precision,
                      acc_dtype):
  """out[b, f, u] = sum_{c, i} x[b, c, i] kernels[u][f, c, i]: one GEMM per
  position u against the input transposed once, so no stacked copy of the
  kernels is made."""
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  nd = len(lhs_spec) - 2
  g = feature_group_count
  xt = jnp.transpose(x, (lhs_spec[1], lhs_spec[0]) + tuple(lhs_spec[2:]))  # [C, B, S...]
  xt = jnp.swapaxes(_split_dim(xt, 0, g), 1, 2)  # [G, B, Cg, S...]
  o = rhs_spec[0]
  wmap = lambda a: a if a < o else a + 1  # rhs axis -> axis after splitting O into (G, Fg)
  w_red = [wmap(a) for a in rhs_spec[1:]]
  ys = []
  for k in kernels:
    k = _split_dim(k, o, g)
    ys.append(lax.dot_general(xt, k, ((list(range(2, 3 + nd)), w_red), ([0], [o])),
                              precision=precision, preferred_element_type=acc_dtype))
  y = jnp.stack(ys, axis=-1)  # [G, B, Fg, P]
  y = jnp.swapaxes(y, 0, 1)
  y = y.reshape([y.shape[0], g * y.shape[2]] + list(outs))  # [B, F, spatial...]
  return jnp.transpose(y, np.argsort(out_spec))


# The col2im form's GEMM result may be at most this many times the output: a
# k9 s3 layer's is 9x (prod(k) / prod(s)); a filter gradient's (the cotangent
# as kernel) would be thousands of times.
_TAP_GEMM_MAX_GROWTH = 9


def _tap_gemm_size(lhs_shape, rhs_shape, dimension_numbers) -> int:
  """Elements of :func:`_tap_gemm`'s GEMM result."""
  lhs_spec, rhs_spec, _ = dimension_numbers
  return int(np.prod([lhs_shape[d] for d in lhs_spec if d != lhs_spec[1]])
             * np.prod([rhs_shape[d] for d in rhs_spec if d != rhs_spec[1]]))


def _tap_gemm(lhs, rhs, *, padding, lhs_dilation, out_shape, dimension_numbers,
              feature_group_count, precision, acc_dtype):
  """A transposed convolution as ONE GEMM over input features, then a sum of
  shifted tap slices per output phase (the col2im form of KS-deconv).

  With lax's correlation, out[u] = sum_t x[(u + t - lo) / s] w[t] over the
  t that make the index whole; for the phase u = s*v + r those are the taps
  t = lo - r (mod s), each reading x[v + (r + t - lo) / s]. So
  Z[n, i, t, o] = sum_c x[n, c, i] w[o, c, t] holds every useful product once,
  and phase r is the sum of its taps' slices of Z shifted by (r + t - lo) / s.
  Unlike one convolution per phase, the GEMM is as wide as all taps times the
  output features: the narrow layers (3 or 1 output features, a grouped
  layer's 16) run at GEMM speed. Z is prod(k) / prod(s) times the output.
  """
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  nd = len(lhs_spec) - 2
  g = feature_group_count
  if all(rhs.shape[rhs_spec[2 + i]] == s and lo % s == s - 1
         for i, (s, (lo, _)) in enumerate(zip(lhs_dilation, padding))):
    return _tiled_tap_dot(lhs, rhs, padding=padding, lhs_dilation=lhs_dilation,
                          out_shape=out_shape, dimension_numbers=dimension_numbers,
                          feature_group_count=feature_group_count, precision=precision,
                          acc_dtype=acc_dtype)
  w = jnp.transpose(rhs, rhs_spec)
  w = _split_dim(w, 0, g)  # [G, O/G, C/G, K...]
  if g == 1 and list(lhs_spec[2:]) == sorted(lhs_spec[2:]) and lhs_spec[0] < lhs_spec[2]:
    # The input as it lies (its other axes already in [N, S...] order): a
    # transpose to canonical and back is a copy XLA:CPU does not remove
    # (1.1 of DCGAN's last layer's 3.2 ms forward).
    z = lax.dot_general(lhs, w[0], (([lhs_spec[1]], [1]), ([], [])), precision=precision,
                        preferred_element_type=acc_dtype)[None]
  else:  # canonical, [G, N, C/G, S...]
    x = jnp.transpose(lhs, lhs_spec)
    x = jnp.swapaxes(_split_dim(x, 1, g), 0, 1)
    z = lax.dot_general(x, w, (([2], [2]), ([0], [0])), precision=precision,
                        preferred_element_type=acc_dtype)
  # z: [G, N, S..., O/G, K...]
  sizes = z.shape[2:2 + nd]
  ks = z.shape[3 + nd:]
  outs = [out_shape[out_spec[2 + i]] for i in range(nd)]
  vmax = [_ceil_div(o, s) for o, s in zip(outs, lhs_dilation)]

  def phase(rs):
    total = None
    taps = [[t for t in range(k) if (r + t - lo) % s == 0]
            for r, k, s, (lo, _) in zip(rs, ks, lhs_dilation, padding)]
    for ts in itertools.product(*taps):
      part = z
      for i in reversed(range(nd)):  # index K axes from the back: positions hold
        part = lax.index_in_dim(part, ts[i], axis=3 + nd + i, keepdims=False)
      cfg = [(0, 0, 0)] * part.ndim
      for i, (t, r, s, (lo, _)) in enumerate(zip(ts, rs, lhs_dilation, padding)):
        shift = (r + t - lo) // s
        cfg[2 + i] = (-shift, shift + vmax[i] - sizes[i], 0)
      part = lax.pad(part, jnp.zeros((), part.dtype), cfg)
      total = part if total is None else total + part
    if total is None:
      total = jnp.zeros(z.shape[:2] + tuple(vmax) + z.shape[2 + nd:3 + nd], z.dtype)
    return total  # [G, N, V..., O/G]

  combos = list(itertools.product(*[range(s) for s in lhs_dilation]))
  y = jnp.stack([phase(rs) for rs in combos])  # [R, G, N, V..., O/G]
  y = y.reshape(tuple(lhs_dilation) + y.shape[1:])  # [s..., G, N, V..., O/G]
  # -> [N, O/G... as (G, O/G), V1, s1, V2, s2, ...] then merge each (V, s).
  perm = [nd + 1, nd, 2 * nd + 2] + [a for i in range(nd) for a in (nd + 2 + i, i)]
  y = jnp.transpose(y, perm)
  y = y.reshape((y.shape[0], g * y.shape[2]) + tuple(v * s for v, s in zip(vmax,
                                                                          lhs_dilation)))
  y = y[(slice(None), slice(None)) + tuple(slice(0, o) for o in outs)]
  return jnp.transpose(y, np.argsort(out_spec))


def _tiled_tap_dot(lhs, rhs, *, padding, lhs_dilation, out_shape, dimension_numbers,
                   feature_group_count, precision, acc_dtype):
  """:func:`_tap_gemm` where the kernel equals the dilation and lo = s - 1
  (mod s) in every dimension (U-Net's k2 s2): each output reads exactly one
  tap, out[s*v + r] = sum_c x[v - m] w[s - 1 - r] with lo = s - 1 + m*s, so the
  GEMM result, its taps moved next to the positions (depth to space), is the
  output: no per-phase sum, no stack.
  """
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  nd = len(lhs_spec) - 2
  g = feature_group_count
  x, xl = _split_axes(lhs, {lhs_spec[1]: (("G", g), ("c", None))},
                      {lhs_spec[0]: "N", **{lhs_spec[2 + i]: ("v", i) for i in range(nd)}})
  # The kernel reversed (r = s - 1 - t) on the small operand, not the result.
  w, wl = _split_axes(lax.rev(rhs, rhs_spec[2:]), {rhs_spec[0]: (("G", g), ("F", None))},
                      {rhs_spec[1]: "c", **{rhs_spec[2 + i]: ("r", i) for i in range(nd)}})
  y, yl = _labelled_dot(x, xl, w, wl, ["c"], ["G"], precision, acc_dtype)
  want = {out_spec[0]: ["N"], out_spec[1]: ["G", "F"]}
  want.update({out_spec[2 + i]: [("v", i), ("r", i)] for i in range(nd)})
  y = _transpose_to(y, yl, [want[k] for k in range(nd + 2)])
  cfg = [(0, 0, 0)] * y.ndim
  for i, (s, (lo, _)) in enumerate(zip(lhs_dilation, padding)):
    a, shift = out_spec[2 + i], (lo - s + 1) // s * s
    cfg[a] = (shift, out_shape[a] - y.shape[a] - shift, 0)
  if any(c != (0, 0, 0) for c in cfg):
    y = lax.pad(y, jnp.zeros((), y.dtype), cfg)
  return y


# A piece with at most this many output positions, each reading a window of at
# least as many taps (the shape of a filter gradient, whose kernel is the
# cotangent), runs as one GEMM: XLA:CPU runs such convolutions at a few GFLOP/s.
_MAX_SHIFTS = 64


def _dense_conv(x, w, pads, dimension_numbers, feature_group_count, precision, acc_dtype):
  """A stride-1, undilated convolution with zero ``pads`` (feature groups only)."""
  lhs_spec, rhs_spec, _ = dimension_numbers
  nd = len(lhs_spec) - 2
  taps = [w.shape[rhs_spec[2 + i]] for i in range(nd)]
  sizes = [x.shape[lhs_spec[2 + i]] + lo + hi for i, (lo, hi) in enumerate(pads)]
  shifts = int(np.prod([s - t + 1 for s, t in zip(sizes, taps)]))
  # The stacked shifted kernel must stay near the input's size: measured,
  # fsrcnn's filter gradient (1.6x) gains 5x, a grouped one (9x) loses 2x.
  batch, features = x.shape[lhs_spec[0]], w.shape[rhs_spec[0]]
  if (shifts <= min(_MAX_SHIFTS, int(np.prod(taps)))
      and features * shifts * np.prod(sizes) <= 2 * batch * np.prod(taps)):
    return _shifted_kernel_dot(x, w, pads, dimension_numbers, feature_group_count, precision,
                               acc_dtype)
  return _xla_conv(x, w, (1,) * nd, pads, dimension_numbers, feature_group_count, precision,
                   acc_dtype)


# Up to this many feature groups, a grouped convolution runs as one XLA
# convolution per group: XLA:CPU expands the groups into a block-diagonal
# kernel (groups times the work). Measured (XLA:CPU, fp32, same process):
# N16 32x32 64->128 k4 s2, 2/4/8/16/32 groups: 24 -> 17, 14 -> 6.9, 12 -> 3.9,
# 14 -> 7.7, 18 -> 13 ms; N8 64x64 64->64 k3, 4/16 groups: 104 -> 12, 114 -> 39;
# depthwise (128 groups of 1) 118 -> 141, so it stays grouped.
_SPLIT_MAX_GROUPS = 32


def crop_negative_padding(lhs, padding, lhs_dilation, lhs_spec):
  """``(lhs, padding)`` for XLA's convolution with negative padding done as a
  slice of ``lhs`` (:func:`shapes.cropped_window`), or None where nothing of
  ``lhs`` is left (the output is zeros).

  XLA:CPU's convolution reads past its input for some negative low paddings
  (openxla/xla#48713: rows of other data or of uninitialised memory where the
  padding's zeros belong, in jax 0.10), so every convolution this package
  hands to XLA gets non-negative padding.
  """
  if all(lo >= 0 and hi >= 0 for lo, hi in padding):
    return lhs, tuple(padding)
  pads = []
  for i, (lo, hi) in enumerate(padding):
    axis = lhs_spec[2 + i]
    window = shapes.cropped_window(lhs.shape[axis], lhs_dilation[i], lo, hi)
    if window is None:
      return None
    start, stop, lo2, hi2 = window
    if (start, stop) != (0, lhs.shape[axis]):
      lhs = lax.slice_in_dim(lhs, start, stop, axis=axis)
    pads.append((lo2, hi2))
  return lhs, tuple(pads)


def _xla_conv(x, w, window_strides, padding, dimension_numbers, feature_group_count,
              precision, acc_dtype):
  """XLA's own convolution (no dilation), one per feature group where that
  is faster (:data:`_SPLIT_MAX_GROUPS`); negative padding as a slice
  (:func:`crop_negative_padding`)."""
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  nd = len(lhs_spec) - 2
  cropped = crop_negative_padding(x, padding, (1,) * nd, lhs_spec)
  if cropped is None:
    spec = shapes.ConvSpec(tuple(window_strides), tuple(padding), (1,) * nd, (1,) * nd,
                           dimension_numbers, feature_group_count, 1)
    return jnp.zeros(shapes.out_shape(x.shape, w.shape, spec), acc_dtype)
  x, padding = cropped

  def conv(a, b, g):
    if g == 1 and _windows_tile(b.shape, rhs_spec, window_strides):
      return _space_to_depth_dot(a, b, window_strides, padding, dimension_numbers, precision,
                                 acc_dtype)
    if g == 1 and _im2col_pays(a.shape, b.shape, window_strides, padding, dimension_numbers):
      return _im2col_dot(a, b, window_strides, padding, dimension_numbers, precision, acc_dtype)
    return lax.conv_general_dilated(a, b, window_strides, padding, None, None,
                                    dimension_numbers, g, precision=precision,
                                    preferred_element_type=acc_dtype)
  g = feature_group_count
  if not 1 < g <= _SPLIT_MAX_GROUPS:
    return conv(x, w, g)
  xs = jnp.split(x, g, axis=lhs_spec[1])
  ws = jnp.split(w, g, axis=rhs_spec[0])
  return jnp.concatenate([conv(a, b, 1) for a, b in zip(xs, ws)], axis=out_spec[1])


def _shifted_kernel_dot(x, w, pads, dimension_numbers, feature_group_count, precision,
                        acc_dtype):
  """The convolution of :func:`_dense_conv` as one GEMM that reads x once.

  out[b, f, u] = sum_{c, i} x[b, c, i] w[f, c, i - u]: the kernel, shifted by
  each of the P output positions u and zero-extended to the input's extent
  (border zeros only), is stacked next to its output features, and the
  padded input is contracted with it over (features, spatial).
  """
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  nd = len(lhs_spec) - 2
  pad_cfg = [(0, 0, 0)] * x.ndim
  for i, (lo, hi) in enumerate(pads):
    pad_cfg[lhs_spec[2 + i]] = (lo, hi, 0)
  x = lax.pad(x, jnp.zeros((), x.dtype), pad_cfg)
  sizes = [x.shape[lhs_spec[2 + i]] for i in range(nd)]
  taps = [w.shape[rhs_spec[2 + i]] for i in range(nd)]
  outs = [s - t + 1 for s, t in zip(sizes, taps)]
  shifted = []
  for u in itertools.product(*[range(o) for o in outs]):
    cfg = [(0, 0, 0)] * w.ndim
    for i in range(nd):
      cfg[rhs_spec[2 + i]] = (u[i], outs[i] - 1 - u[i], 0)
    shifted.append(lax.pad(w, jnp.zeros((), w.dtype), cfg))
  return _stacked_kernel_dot(x, shifted, outs, dimension_numbers, feature_group_count,
                             precision, acc_dtype)


def _stacked_kernel_dot(x, kernels, outs, dimension_numbers, feature_group_count, precision,
                        acc_dtype):
  """out[b, f, u] = sum_{c, i} x[b, c, i] kernels[u][f, c, i] for the output
  positions u (row-major over ``outs``): one GEMM over (features, spatial)."""
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  # Stacked as [G, F/G, P, C/G, spatial...]: the stack is a copy anyway, and
  # in this layout it is the GEMM's row-major [M, K] operand.
  g = feature_group_count
  ws = _stacked(kernels, rhs_spec)
  ws = ws.reshape((g, ws.shape[0] // g) + ws.shape[1:])
  nd = len(lhs_spec) - 2
  xg = _split_dim(x, lhs_spec[1], g)   # [.., G, Cg, ..]
  xmap = lambda d: d + (d > lhs_spec[1])                        # x dim -> xg axis
  x_red = [xmap(lhs_spec[1]) + 1] + [xmap(d) for d in lhs_spec[2:]]
  # The kernel operand first: with the input as the right-hand [K, B] operand,
  # XLA:CPU reads it in place instead of transposing it (measured 2x).
  y = lax.dot_general(ws, xg, ((list(range(3, 4 + nd)), x_red), ([0], [xmap(lhs_spec[1])])),
                      precision=precision, preferred_element_type=acc_dtype)
  # y: [G, Fg, P, B] (the dot's order: batch, kernel free, input free)
  fg, b = y.shape[1], y.shape[3]
  y = jnp.moveaxis(y.reshape((g * fg, -1, b)), 2, 0)  # [B, F, P]
  y = y.reshape([b, g * fg] + outs)  # [B, F, spatial...]
  return jnp.transpose(y, np.argsort(out_spec))


def _split_dim(a, axis: int, groups: int):
  """Reshapes dimension ``axis`` of size G*k into adjacent (G, k)."""
  return a.reshape(a.shape[:axis] + (groups, a.shape[axis] // groups) + a.shape[axis + 1:])


# Phases are merged into one convolution when each phase's GEMM is this narrow
# (output features per group) and the union of the windows multiplies at most
# this many times the useful products. Measured on XLA:CPU: fsrcnn (1 feature)
# 4.5 -> 2.8 ms; DCGAN's last layer (3 features) 2.5 -> 4.5 ms, U-Net k2 s2
# (no waste) unchanged.
_MERGE_MAX_FEATURES = 2
_MERGE_MAX_WASTE = 2.5


def _merged_phases(lhs, rhs, dims, phase_lists, dimension_numbers, feature_group_count,
                   precision, acc_dtype):
  """All phases as ONE dense convolution, or None where that does not pay.

  When every phase of a dimension reads the same polyphase sub-image with
  unit steps (transposed convolutions: the K split alone), phase p reads
  sub-image index j_p + u + t. Each sub-kernel, shifted by j_p - min(j) inside
  the union of the windows, becomes its own block of output features: the
  sub-pixel form of the deconvolution. It multiplies border zeros of the
  shifted sub-kernels (at most ``_MERGE_MAX_WASTE`` times the useful work)
  but turns many very narrow GEMMs (e.g. one output channel) into one wider.
  Returns a function: the phase combination -> its output (as ``phase_output``).
  """
  lhs_spec, rhs_spec, _ = dimension_numbers
  if np.prod([len(pl) for pl in phase_lists]) == 1:
    return None
  plan = []
  for dm, pl in zip(dims, phase_lists):
    D = pl[0].ustride
    if any(p.ustride != D or p.tstride != D or p.T <= 0 for p in pl):
      return None
    if len({p.base % D for p in pl}) != 1:
      return None
    c = pl[0].base % D
    j = [p.base // D for p in pl]
    jmin = min(j)
    Tu = max(jj - jmin + p.T for jj, p in zip(j, pl))
    Umax = max(p.U for p in pl)
    window = _read_window(dm.in_size, D, c, jmin, Umax + Tu - 1)
    if window is None:
      return None
    plan.append((Tu, Umax, [jj - jmin for jj in j], window))
  useful = sum(np.prod([p.U * p.T for p in combo]) for combo in itertools.product(*phase_lists))
  done = np.prod([len(pl) * Umax * Tu for pl, (Tu, Umax, _, _) in zip(phase_lists, plan)])
  fg = rhs.shape[rhs_spec[0]] // feature_group_count
  if fg > _MERGE_MAX_FEATURES or done > _MERGE_MAX_WASTE * useful:
    return None

  x = lhs
  for i, (_, _, _, (lhs_slice, _)) in enumerate(plan):
    x = lax.slice_in_dim(x, *lhs_slice, axis=lhs_spec[2 + i])
  pads = [pads for (_, _, _, (_, pads)) in plan]
  kernels = []
  combos = list(itertools.product(*[range(len(pl)) for pl in phase_lists]))
  for combo in combos:
    w = rhs
    for i, q in enumerate(combo):
      p, (Tu, _, offs, _) = phase_lists[i][q], plan[i]
      ax = rhs_spec[2 + i]
      w = lax.slice_in_dim(w, p.k0, p.k0 + p.kstep * (p.T - 1) + 1, p.kstep, axis=ax)
      cfg = [(0, 0, 0)] * w.ndim
      cfg[ax] = (offs[q], Tu - offs[q] - p.T, 0)
      w = lax.pad(w, jnp.zeros((), w.dtype), cfg)
    kernels.append(w)
  # Output features ordered (group, phase combination, feature in group).
  o = rhs_spec[0]
  g, ncomb = feature_group_count, len(combos)
  w = jnp.stack([_split_dim(k, o, g) for k in kernels], axis=o + 1)
  w = w.reshape(w.shape[:o] + (g * ncomb * fg,) + w.shape[o + 3:])
  y = _dense_conv(x, w, pads, dimension_numbers, feature_group_count, precision, acc_dtype)
  ofeat = dimension_numbers[2][1]
  y = y.reshape(y.shape[:ofeat] + (g, ncomb, fg) + y.shape[ofeat + 1:])
  index = {combo: n for n, combo in enumerate(combos)}
  positions = [{p.o0: q for q, p in enumerate(pl)} for pl in phase_lists]

  def output(chosen):
    q = index[tuple(pos[p.o0] for pos, p in zip(positions, chosen))]
    part = lax.index_in_dim(y, q, axis=ofeat + 1, keepdims=False)
    part = part.reshape(part.shape[:ofeat] + (g * fg,) + part.shape[ofeat + 2:])
    for i, p in enumerate(chosen):
      ax = dimension_numbers[2][2 + i]
      part = lax.slice_in_dim(part, 0, p.U, axis=ax)
    return part

  return output


def _batch_groups_to_features(lhs, dimension_numbers, groups):
  """lhs with batch groups -> the same lhs with those groups as feature groups.

  The lhs batch splits group-major, (G, N/G); output feature group g reads
  batch group g. Moved next to the features, (N/G, G*C), group g reads feature
  group g: the same products.
  """
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  x = jnp.transpose(lhs, lhs_spec)  # [N, C, spatial...]
  n, c = x.shape[:2]
  x = x.reshape((groups, n // groups, c) + x.shape[2:])
  x = jnp.swapaxes(x, 0, 1).reshape((n // groups, groups * c) + x.shape[3:])
  canonical = tuple(range(len(lhs_spec)))
  return x, lax.ConvDimensionNumbers(canonical, rhs_spec, out_spec)
