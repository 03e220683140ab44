"""``cks_jax.explain``: which algorithm and backend a convolution runs on, and what it saves."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import jax
import numpy as np

from cks_jax._src import api, backends, ffi, shapes
from cks_jax._src.primitive import cks_conv_p


@dataclass(frozen=True)
class Explanation:
  """How one ``cks_conv`` call executes.

  Attributes:
    algorithm: ``"ConvV2"`` (trimmed borders), ``"KS-deconv"`` (lhs dilation),
      ``"Sk-dilated"`` (rhs dilation) or a ``+``-joined mix.
    backend: ``"cks-cpu"`` or ``"cks-cuda"`` (a C-K-S FFI kernel), ``"portable"``
      (the decomposition in lax ops) or ``"xla"`` (XLA's own convolution).
    reason: why that backend was chosen.
    phases: residue classes of outputs (the product over spatial dimensions).
    subproblems: dense, zero-free sub-problems with work.
    zero_subproblems: sub-problems whose outputs are all zeros (no tap meets
      a real input); they are written without a multiply.
    cks_macs: multiply-adds executed (products of real elements only).
    direct_macs: multiply-adds of the direct method on the dilated, padded input.
    zeros_avoided: ``1 - cks_macs / direct_macs``.
    shapes: ``(lhs, rhs, out)`` shapes.
    channels_last_copies: bytes of the channels-last copies of lhs, rhs and
      the output that ``"auto"`` has XLA make around the CPU kernel for a
      layout that is not channels-last (``lhs`` and out ``(N, spatial..., C)``,
      ``rhs`` ``(spatial..., I, O)``: the layout the kernel runs fastest);
      0 where it runs on the operands as given. ``params`` are then those of
      the channels-last convolution; ``shapes`` stay the caller's.
    gradients: for ``explain(..., gradients=True)``, ``(name, Explanation)``
      pairs for the convolutions that the VJP runs (``"d lhs"``, ``"d rhs"``).
    scratch: on the CPU kernel (backend ``"cks-cpu"``), the extra memory of
      one call in bytes, as ``{"packed_b": ..., "per_thread": ..., "threads":
      ..., "widened": ..., "total": ..., "packed_b_page": ...}``: B packed
      once and shared by all tasks (in a buffer of 2 MB pages, the kernel's
      ``packed_b_page``, kept for the next call, rounded up to whole pages;
      ``cks_jax.release_cpu_buffers()`` frees it), the buffers of
      each thread that runs tasks (offset tables, packed A and B blocks, one
      output tile; they persist between calls), the
      number of such threads (XLA's intra-op pool plus the caller), and the
      float32 copies of 16-bit operands (and, on the dot path, of a 16-bit
      output; none on the ``"bf16 ..."`` paths), made by the kernel and
      kept for the next call (one set per call running at once;
      ``cks_jax.release_cpu_buffers()`` frees them).
      None on other backends.
      Never a padded or zero-inserted copy of any tensor.
    cpu_path: on the CPU kernel, the path it takes, named by the kernel's own
      code: ``"gemm"`` (the GEMM vectorised over output features),
      ``"gemm, phases fused"`` (the same GEMM over all phases' features at
      once, where every phase reads the same input rows: float32 forwards of
      transposed convolutions whose kernel equals their stride, with 16 or
      32 features and outputs over 2 MB, AVX-512 only),
      ``"gemm, adjacent phases fused"`` (the GEMM over the features of
      adjacent phases of the last spatial dimension that read the same input
      rows, where a feature count that is not a multiple of 16 then pads
      fewer columns: float32 (and widened 16-bit) forwards of transposed
      convolutions such as a k8 s4 head with 21 classes, features innermost,
      one group),
      ``"narrow"`` (vectorised over a contiguous batch: filter gradients of
      layers with few output channels), ``"narrow, taps as columns"`` (the
      same with the taps along the last kernel dimension multiplied as the
      columns of one tile: 1-6 features on AVX-512, 1-3 on AVX2, transposed
      or stride-1 layers with the cotangent's features innermost, 2-D and 3-D),
      ``"row-vectorised"`` (the same kernel
      in tiles of up to 8 features, 6 on AVX2: filter gradients of wider
      layers where that measured faster), ``"dot"`` (vectorised along the
      contiguous channels: forwards with few output channels),
      ``"depthwise"`` (vectorised over the groups of a depthwise
      convolution: one feature and one input channel or batch entry per
      group, at least 8 groups, contiguous: forwards and both gradients;
      and over the channels of a grouped one with 2 or 4, or on AVX-512 8,
      16 or 32 float channels in and out per group: forwards and input
      gradients; and its filter gradient with 2 or 4 per group, 8 (float32,
      or float64 on AVX-512) or 16 (float32 on AVX-512)),
      ``"bf16 depthwise"`` (the same with bfloat16 operands read as they
      are and widened in registers, on CPUs with AVX-512BW and VL; elsewhere
      ``"depthwise"`` on float32 copies, with the same bits),
      ``"interleaved taps"`` (a filter gradient of large operands whose taps
      run chunk by chunk), ``"interleaved taps, fused"`` (the same, with the
      taps that read adjacent cotangent positions multiplied as one GEMM:
      float32 filter gradients of transposed convolutions whose kernel
      equals their stride, with 32 features, or 16 and fewer than 32 input
      channels, AVX-512 only), ``"bf16 pairs"`` (bfloat16 operands on a CPU
      with AVX512_BF16, read as they are and multiplied two reduction indices
      per lane: forwards and input gradients with channels innermost, an even
      number of at least 16 per group) or ``"bf16 packed pairs"`` (the same
      instructions on pairs packed block by block: bfloat16 filter gradients
      with at least 16 features and 64 input channels per group;
      ``", interleaved taps"`` added where their operands are large); on CPUs
      with AMX-BF16 both pair paths multiply on AMX tiles, as ``reason``
      says. None on other backends.
  """
  algorithm: str
  backend: str
  reason: str
  phases: int
  subproblems: int
  zero_subproblems: int
  cks_macs: float
  direct_macs: float
  zeros_avoided: float
  shapes: tuple
  params: dict = field(repr=False, default_factory=dict)
  gradients: tuple = ()
  scratch: dict | None = None
  cpu_path: str | None = None
  channels_last_copies: int = 0

  def __str__(self) -> str:
    lhs, rhs, out = self.shapes
    lines = [
        f"{self.algorithm} on {self.backend}: lhs {lhs} * rhs {rhs} -> {out}",
        f"  {self.phases} phase(s), {self.subproblems} dense sub-problem(s)"
        + (f" + {self.zero_subproblems} all-zero" if self.zero_subproblems else ""),
        f"  {self.cks_macs:.4g} multiply-adds vs {self.direct_macs:.4g} direct: "
        f"{100 * self.zeros_avoided:.1f}% on zeros avoided",
        f"  backend: {self.reason}",
    ]
    if self.scratch is not None:
      sc, mb = self.scratch, lambda b: f"{b / 2**20:.2f} MB"
      out_bytes = int(np.prod(out)) * np.dtype(self.params.get("out_dtype", np.float32)).itemsize
      # The kernel keeps its packed B between calls in whole pages (scratch.h).
      page = sc["packed_b_page"]
      held = -(-sc["packed_b"] // page) * page
      lines.append(f"  scratch: {mb(sc['total'])} (packed B {mb(sc['packed_b'])} + "
                   f"{sc['threads']} threads x {mb(sc['per_thread'])}"
                   + (f" + float32 copies {mb(sc['widened'])}" if sc["widened"] else "")
                   + f"); output {mb(out_bytes)}"
                   + (f"; packed B held in whole {page / 2**20:g} MB pages: {mb(held)}"
                      if held else ""))
    if self.cpu_path is not None:
      lines.append(f"  CPU kernel path: {self.cpu_path}")
    if self.channels_last_copies:
      lines.append(f"  layout: run on channels-last copies of lhs, rhs and out "
                   f"({self.channels_last_copies / 2**20:.2f} MB), transposed by XLA")
    for name, g in self.gradients:
      lines.append(f"  {name}: " + str(g).replace("\n", "\n    "))
    return "\n".join(lines)


def _algorithm(params) -> str:
  parts = []
  if any(a > 1 for a in params["lhs_dilation"]):
    parts.append("KS-deconv")
  if any(d > 1 for d in params["rhs_dilation"]):
    parts.append("Sk-dilated")
  return "+".join(parts) if parts else "ConvV2"


_WIDENED = ("; 16-bit operands widened to float32 by the kernel, in parallel (float32 "
            "accumulation either way)")


def _backend(platform: str, params, lhs_shape, rhs_shape, dtype) -> tuple[str, str]:
  platform = {"gpu": "cuda"}.get(platform, platform)
  requested = params.get("backend", "auto")
  kernels = ffi.kernel_platforms()
  try:
    chosen = backends.choose(requested, platform, kernels, params, (lhs_shape, rhs_shape), dtype)
  except NotImplementedError as e:
    return "unavailable", str(e)
  if chosen == "ffi":
    why = f"cks FFI kernel registered for platform {platform!r}"
    if platform == "cpu" and backends.kernel_depthwise(params, lhs_shape, rhs_shape, dtype):
      lhs_spec, rhs_spec, _ = params["dimension_numbers"]
      fgc, bgc = params["feature_group_count"], params["batch_group_count"]
      if fgc > 1 and lhs_shape[lhs_spec[1]] // fgc >= 16:  # a group of one or two vectors
        why += (" (depthwise path: vectorised over the channels, each group's channels"
                " broadcast over its lanes in turn)")
      elif fgc > 1 and lhs_shape[lhs_spec[1]] > fgc:
        why += (" (depthwise path: vectorised over the channels, each group's as many depthwise"
                " convolutions as it has channels)")
      elif bgc > 1 and rhs_shape[rhs_spec[0]] > bgc:
        why += (" (depthwise path: vectorised over the features, each group's input channels"
                " spread over its lanes, one sum per channel)")
      else:
        why += " (depthwise path: vectorised over the groups, one feature each)"
    elif platform == "cpu" and backends.kernel_narrow(params, lhs_shape, rhs_shape, dtype):
      why += " (narrow path: vectorised over the contiguous batch, not the few features)"
    elif platform == "cpu" and backends.kernel_dot(params, lhs_shape, rhs_shape, dtype):
      why += " (dot path: vectorised along the contiguous channels, not the few features)"
    if platform == "cpu" and backends.cpu_widened(dtype):
      why += _WIDENED
    return f"cks-{platform}", why
  if requested != "auto":
    why = f"backend={requested!r} requested"
  elif platform in kernels and platform not in backends.AUTO_KERNEL_PLATFORMS:
    why = (f"the cks {platform.upper()} kernel is built, but 'auto' does not run it: it measured "
           "slower than XLA's convolution on an NVIDIA H200 (0.16x on the geometric mean; "
           "backend='ffi' runs it)")
  elif platform in kernels:
    why = (f"fewer than {backends.CPU_MIN_FEATURES} output features per group, where the "
           "CPU kernel was measured slower")
    if backends.avx2_rule(params, lhs_shape, rhs_shape, dtype):
      why += " (and, on this CPU with AVX2 but no AVX-512, XLA's convolution too)"
    elif backends.portable_16bit_rule(params, lhs_shape, rhs_shape, dtype):
      why += " (and, for this bfloat16 transposed forward, XLA's convolution too)"
    elif (chosen == "portable" and params["batch_group_count"] > 1
          and rhs_shape[params["dimension_numbers"][1][0]] > params["batch_group_count"]):
      why += (" (and, for this grouped convolution's filter gradient, XLA's convolution, which "
              "runs it group by group, too)")
  elif platform == "cuda":
    why = "the CUDA library was not built (no nvcc at install time)"
  else:
    why = f"no cks kernel for platform {platform!r}"
  if chosen == "portable":
    return "portable", (f"{why}: the C-K-S decomposition as dense, undilated lax "
                        "convolutions and dot_generals (no zero-inserted tensor)")
  how = "lowered to XLA's own convolution (same semantics, computes on zeros)"
  if any(lo < 0 or hi < 0 for lo, hi in params["padding"]):
    how += ("; its negative padding as a slice of the input (XLA:CPU's convolution reads past "
            "its input for some: openxla/xla#48713)")
  return "xla", f"{why}: {how}"


def _pool_threads() -> int:
  """Threads of XLA:CPU's intra-op pool: as the kernel last saw it, else as
  XLA sizes it (the CPUs this process may run on)."""
  seen = ffi.extension().cpu_pool_threads()
  if seen > 0:
    return seen
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# The CPU kernel's paths for bfloat16 operands on AVX512_BF16 CPUs: read in
# place (conv_cpu.cc, Bf16Pairs) or packed as pairs (Bf16PackedPairs), and
# multiplied two reduction indices per lane by vdpbf16ps; no float32 copies.
PAIRS = ("bf16 pairs", "bf16 packed pairs", "bf16 packed pairs, interleaved taps")
# The depthwise path's name for bfloat16 operands on AVX-512BW/VL CPUs: read in
# place, widened to float32 in registers; no float32 copies either.
BF16_DEPTHWISE = "bf16 depthwise"


def cpu_scratch(lhs_shape, rhs_shape, out_shape, params, dtype) -> tuple[dict, str]:
  """The CPU kernel's extra memory for one call (see ``Explanation.scratch``)
  and its path (``Explanation.cpu_path``), computed by the kernel's own code
  (``_cks.cpu_scratch``)."""
  spec = shapes.spec_of(params)
  lhs_spec, rhs_spec, out_spec = spec.dimension_numbers
  widened = backends.cpu_widened(dtype)
  in_dt, out_dt = np.dtype(dtype).name, np.dtype(params["out_dtype"]).name
  threads = _pool_threads()
  packed_b, per_thread, path = ffi.extension().cpu_scratch(
      list(lhs_shape), list(rhs_shape), list(out_shape), list(spec.window_strides),
      list(spec.lhs_dilation), list(spec.rhs_dilation), [lo for lo, _ in spec.padding],
      list(lhs_spec), list(rhs_spec), list(out_spec), params["feature_group_count"],
      params["batch_group_count"], in_dt, out_dt, threads)
  # The kernel's float32 copies (conv_cpu.cc, RunConv): the operands, and a
  # 16-bit output where its dot or depthwise path writes float32 in place;
  # none on the bfloat16 paths that read bfloat16 in place (PAIRS, BF16_DEPTHWISE).
  wide = (lhs_shape, rhs_shape) + ((out_shape,) if out_dt != "float32"
                                   and path in ("dot", "depthwise") else ())
  in_place = path in PAIRS or path == BF16_DEPTHWISE
  copies = 4 * sum(int(np.prod(s)) for s in wide) if widened and not in_place else 0
  total = packed_b + (threads + 1) * per_thread + copies
  return {"packed_b": packed_b, "per_thread": per_thread, "threads": threads + 1,
          "widened": copies, "total": total,
          "packed_b_page": int(ffi.extension().cpu_packed_b_page_bytes())}, path


default_platform = backends.default_platform


def explain_params(lhs_shape, rhs_shape, params, platform: str | None = None,
                   dtype=np.float32) -> Explanation:
  """Explains one ``cks_conv`` primitive application given its shapes, params and lhs dtype."""
  spec = shapes.spec_of(params)
  out_shape = shapes.out_shape(lhs_shape, rhs_shape, spec)
  lhs_spec, rhs_spec, out_spec = spec.dimension_numbers
  ins = [lhs_shape[d] for d in lhs_spec[2:]]
  ks = [rhs_shape[d] for d in rhs_spec[2:]]
  outs = [out_shape[d] for d in out_spec[2:]]
  if min(ins + ks + outs + [out_shape[out_spec[0]], rhs_shape[rhs_spec[0]],
                            rhs_shape[rhs_spec[1]]]) == 0:
    stats = (1, 0, 0, 0.0, 0.0)
  else:
    stats = ffi.extension().plan_stats(
        ins, ks, outs, list(spec.window_strides), list(spec.lhs_dilation),
        list(spec.rhs_dilation), [lo for lo, _ in spec.padding], out_shape[out_spec[0]],
        rhs_shape[rhs_spec[1]], rhs_shape[rhs_spec[0]])
  phases, subs, zero_subs, cks_macs, direct_macs = stats
  backend, reason = _backend(platform or default_platform(), params, lhs_shape, rhs_shape,
                             dtype)
  scratch = path = None
  if backend == "cks-cpu" and min((*lhs_shape, *rhs_shape, *out_shape)) > 0:
    scratch, path = cpu_scratch(lhs_shape, rhs_shape, out_shape, params, dtype)
    if path in PAIRS:
      how = "read as they are" if path == PAIRS[0] else "packed as pairs block by block"
      unit = ("AMX-BF16 tile instructions (16 x 32 tiles, AVX512_BF16's pair layout"
              if backends.cpu_bf16_amx() else "AVX512_BF16 dot-product instructions (no AMX")
      reason = reason.replace(_WIDENED, f"; bfloat16 operands {how}, multiplied in pairs by "
                              f"{unit}; float32 sums)")
    elif path == BF16_DEPTHWISE:
      reason = reason.replace(_WIDENED, "; bfloat16 operands read as they are and widened to "
                              "float32 in registers (float32 sums; no float32 copies)")
  return Explanation(scratch=scratch, cpu_path=path,
      algorithm=_algorithm(params), backend=backend, reason=reason, phases=int(phases),
      subproblems=int(subs), zero_subproblems=int(zero_subs), cks_macs=float(cks_macs),
      direct_macs=float(direct_macs),
      zeros_avoided=(1.0 - cks_macs / direct_macs) if direct_macs else 0.0,
      shapes=(tuple(lhs_shape), tuple(rhs_shape), tuple(out_shape)), params=dict(params))


def explain(lhs: Any, rhs: Any, window_strides: Sequence[int], padding: Any,
            lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
            dimension_numbers: Any = None, feature_group_count: int = 1,
            batch_group_count: int = 1, precision: Any = None,
            preferred_element_type: Any = None, *, dtype: Any = np.float32,
            gradients: bool = False, platform: str | None = None,
            backend: str | None = None) -> Explanation:
  """Explains how ``cks_jax.conv_general_dilated`` with these arguments runs.

  Takes the same arguments as ``conv_general_dilated``; ``lhs`` and ``rhs`` may
  be arrays, ``jax.ShapeDtypeStruct``s or plain shape tuples (then ``dtype``
  is used). Nothing is computed.

  Args:
    preferred_element_type: as ``conv_general_dilated``'s: the output type (the
      CPU kernel's path and scratch can depend on it).
    gradients: also explain the two convolutions of the VJP (d lhs, d rhs).
    platform: the platform to report for (default: :func:`default_platform`).
    backend: as ``conv_general_dilated``'s ``backend``.

  Returns:
    An :class:`Explanation`; ``print`` it for a summary.
  """
  def as_struct(x):
    if isinstance(x, (tuple, list)):
      return jax.ShapeDtypeStruct(tuple(x), dtype)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype)

  lhs_s, rhs_s = as_struct(lhs), as_struct(rhs)

  def f(l, r):
    return api.conv_general_dilated(l, r, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count,
                                    precision, preferred_element_type, backend=backend)

  with backends.target_platform(platform):  # as conv_general_dilated decides for it
    fwd = jax.make_jaxpr(f)(lhs_s, rhs_s).jaxpr
  (eqn,) = [e for e in fwd.eqns if e.primitive is cks_conv_p]
  # The shapes bound: channels-last copies' where conv_general_dilated makes them.
  bound = (tuple(eqn.invars[0].aval.shape), tuple(eqn.invars[1].aval.shape))
  main = explain_params(*bound, eqn.params, platform, lhs_s.dtype)
  if bound != (tuple(lhs_s.shape), tuple(rhs_s.shape)) or eqn.params["dimension_numbers"] != (
      shapes.canonicalize(lhs_s.shape, rhs_s.shape, window_strides, padding, lhs_dilation,
                          rhs_dilation, dimension_numbers, feature_group_count,
                          batch_group_count).dimension_numbers):
    out_aval = eqn.outvars[0].aval
    copies = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
                 for a in (eqn.invars[0].aval, eqn.invars[1].aval, out_aval))
    user_out = jax.eval_shape(f, lhs_s, rhs_s).shape
    main = Explanation(**{**main.__dict__, "channels_last_copies": copies,
                          "shapes": (tuple(lhs_s.shape), tuple(rhs_s.shape), tuple(user_out)),
                          "reason": main.reason + "; on channels-last copies of the operands "
                          "(transposed by XLA before the kernel, the result after), where the "
                          "kernel runs faster"})
  if not gradients:
    return main

  def vjp(l, r, ct):
    return jax.vjp(f, l, r)[1](ct)

  out_s = jax.eval_shape(f, lhs_s, rhs_s)
  with backends.target_platform(platform):
    jpr = jax.make_jaxpr(vjp)(lhs_s, rhs_s, out_s).jaxpr
  grads = []
  for e in [e for e in jpr.eqns if e.primitive is cks_conv_p][1:]:
    name = "d lhs" if tuple(e.outvars[0].aval.shape) == bound[0] else "d rhs"
    grads.append((name, explain_params(e.invars[0].aval.shape, e.invars[1].aval.shape,
                                       e.params, platform, e.invars[0].aval.dtype)))
  grads.sort(key=lambda t: t[0] != "d lhs")
  grads = tuple(grads)
  return Explanation(**{**main.__dict__, "gradients": grads})
