"""SPMD partitioning of the cks_conv kernel call (jit over a sharded device mesh).

XLA's partitioner cannot see inside an FFI custom call, so left alone it would
replicate (all-gather) the operands of every ``cks_conv_cpu``/``cks_conv_cuda``
call. Instead, under a multi-device jit the kernel call is wrapped in
``jax.experimental.custom_partitioning``: a Shardy sharding rule tells
propagation which dimensions may stay sharded, and ``partition`` builds the
per-device program, the same kernel on local shapes.

Dimensions, in convolution terms (the filter gradient is a convolution whose
contracted "feature" dimension is the forward batch, see ``_transpose_rhs`` in
``primitive.py``):

- ``n``: lhs batch -> output batch (only for ``batch_group_count == 1``):
  each device convolves its own batch slice.
- ``c``: lhs feature <-> rhs input feature, contracted (only for
  ``feature_group_count == 1``): each device convolves its slice and the
  partial results are summed with a ``psum`` (all-reduce) over the mesh axes
  that shard it, as XLA does for its own convolution. In data-parallel
  training this is the filter gradient's reduction over the batch.
- ``o``: rhs output feature -> output feature (only without groups).
- Everything else (spatial dimensions, whose windows need halos, and grouped
  feature/batch dimensions) must be replicated: the partitioner gathers it.

A dimension whose size the mesh axes do not divide is replicated as well, so
no padded rows ever reach the kernel or the ``psum``.

Inside ``shard_map`` (all mesh axes manual), on one device, or on a platform
without the kernel, nothing is wrapped: the kernel just runs on what it gets.

The same n/c/o rule types the output under explicit mesh axes
(``jax.sharding.AxisType.Explicit``, ``jax.make_mesh``'s default): batch and
output features keep their axes, a sharded contraction is summed to a
replicated result (the filter gradient is typed like the filter, as lax's own
transpose rules do). There the same plan is lowered as a ``shard_map``, not a
custom_partitioning: on jax 0.12 the latter's ``psum`` carries the explicit
types into the all-reduce's reducer, which XLA:CPU rejects. Under
``shard_map`` operands varying over different manual axes are cast to the
union first, as lax does, so the filter gradient of a replicated filter is
summed over the devices by AD.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import mlir
from jax.sharding import NamedSharding, PartitionSpec

# Internal: what custom_partitioning itself inspects to decide between a
# partitionable custom call and an inline lowering (sharding_impls), the
# registry of primitives lowered knowing their devices (dispatch), and the
# varying-axes cast lax applies before binding its convolution (core).
from jax._src import core, dispatch, sharding_impls


def register(primitive) -> None:
  """Lower ``primitive`` knowing the device assignment, which
  custom_partitioning needs (jit otherwise lowers device-obliviously)."""
  dispatch.prim_requires_devices_during_lowering.add(primitive)


# jax 0.10.0 calls it standard_insert_pvary, 0.10.2 auto_insert_reshard.
_insert_pvary = getattr(core, "auto_insert_reshard", None) or core.standard_insert_pvary


def match_varying(lhs, rhs):
  """Under ``shard_map``: cast both operands to the union of their varying manual axes."""
  return tuple(_insert_pvary(lhs, rhs))


def out_sharding(lhs, rhs, params: dict):
  """The output's type-level sharding (explicit mesh axes) for operand avals ``lhs``, ``rhs``."""
  mesh = lhs.sharding.mesh if not lhs.sharding.mesh.empty else rhs.sharding.mesh
  ndim = len(params["dimension_numbers"][2])
  dims = _Dims(params)
  n, _, o = _plan(dims, mesh, lhs, rhs)
  return _named(mesh, ndim, _out_placed(dims, n, o))


def needs_partitioning(ctx: mlir.LoweringRuleContext) -> bool:
  """Whether this lowering is part of a program the SPMD partitioner will split.

  Mirrors ``custom_partitioning``'s own test, so that when it would lower the
  body inline (one device, or every mesh axis manual as in ``shard_map``) the
  body's kernel call is lowered directly instead of being wrapped again.
  Not for ``jax.export`` either: its partitioning callback lives in this
  process only, so an exported module keeps the plain (replicated) kernel call.
  """
  if ctx.module_context.lowering_parameters.for_export:
    return False
  ac = ctx.module_context.axis_context
  if isinstance(ac, sharding_impls.ShardingContext):
    return ac.device_assignment is not None and len(ac.device_assignment) > 1
  if isinstance(ac, sharding_impls.SPMDAxisContext):
    return (set(ac.manual_axes) != set(ac.mesh.axis_names)
            and len(ac.mesh._flat_devices_tuple) > 1)
  return False


def lower(ctx: mlir.LoweringRuleContext, lhs, rhs, *, bind: Callable, params: dict):
  """Lowers ``bind(lhs, rhs, **params)`` (a cks_conv on the kernel) as a
  partitionable custom call; ``bind`` must lower to the kernel itself when
  ``needs_partitioning`` is false."""
  mesh = _explicit_mesh(*ctx.avals_in)
  if mesh is not None:
    fn = _shard_mapped(bind, params, mesh, *ctx.avals_in)
  else:
    fn = _partitionable(bind, tuple(sorted(params.items())))
  return mlir.lower_fun(fn, multiple_results=False)(ctx, lhs, rhs)


def retype(x, aval):
  """``x`` resharded to ``aval``'s type under explicit mesh axes: a cotangent
  must have its primal's type, and the plan keeps spatial dimensions whole."""
  mesh = _explicit_mesh(aval)
  if mesh is None or jax.typeof(x).sharding.spec == aval.sharding.spec:
    return x
  return jax.sharding.reshard(x, aval.sharding.spec)


def _explicit_mesh(*avals):
  """The avals' mesh where sharding is in their types (Explicit axes), else None."""
  for aval in avals:
    sharding = getattr(aval, "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is not None and not mesh.empty and any(
        t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
      return mesh
  return None


def _shard_mapped(bind: Callable, params: dict, mesh, lhs, rhs) -> Callable:
  """The op under explicit mesh axes: the same n/c/o plan as the
  partitioner's, written as a shard_map (custom_partitioning's reducer would
  carry the explicit types into the all-reduce, which XLA rejects)."""
  dims = _Dims(params)
  n, c, o = _plan(dims, mesh, lhs, rhs)
  (ls, rs), os_ = _shardings(dims, mesh, lhs.ndim, n, c, o)

  def local(lhs, rhs):
    out = bind(lhs, rhs, **params)
    return lax.psum(out, c) if c else out
  mapped = jax.shard_map(local, mesh=mesh, in_specs=(ls.spec, rs.spec), out_specs=os_.spec)
  # Dimensions the plan keeps whole (spatial, grouped) are gathered first, as
  # the partitioner does for custom_partitioning.
  return lambda lhs, rhs: mapped(jax.sharding.reshard(lhs, ls.spec),
                                 jax.sharding.reshard(rhs, rs.spec))


# ------------------------------------------------------------------ the plan
class _Dims:
  """Where the factors ``n``, ``c``, ``o`` sit in each operand, or None where
  grouping forbids splitting that dimension."""

  def __init__(self, params: dict):
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    G, B = params["feature_group_count"], params["batch_group_count"]
    self.specs = (lhs_spec, rhs_spec, out_spec)
    self.n = (lhs_spec[0], out_spec[0]) if B == 1 else None
    self.c = (lhs_spec[1], rhs_spec[1]) if G == 1 else None
    self.o = (rhs_spec[0], out_spec[1]) if G == 1 and B == 1 else None

  def rule(self) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """Shardy rule string, reduction factors, need-replication factors."""
    lhs_spec, rhs_spec, out_spec = self.specs
    names = [[None] * len(lhs_spec) for _ in range(3)]
    if self.n:
      names[0][self.n[0]] = names[2][self.n[1]] = "n"
    if self.c:
      names[0][self.c[0]] = names[1][self.c[1]] = "c"
    if self.o:
      names[1][self.o[0]] = names[2][self.o[1]] = "o"
    replicated = []
    for which, dims in zip("lro", names):
      for d, name in enumerate(dims):
        if name is None:
          dims[d] = f"{which}{d}"
          replicated.append(dims[d])
    text = f"{' '.join(names[0])}, {' '.join(names[1])} -> {' '.join(names[2])}"
    return text, (("c",) if self.c else ()), tuple(replicated)


def _axes(sharding, ndim: int, dim: int) -> tuple[str, ...]:
  if not isinstance(sharding, NamedSharding):
    return ()
  spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
  entry = spec[dim]
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _plan(dims: _Dims, mesh, lhs, rhs):
  """Mesh axes for the factors n, c, o (disjoint; each divides its dimensions)."""
  sizes = dict(mesh.shape)
  used: set[str] = set()

  def take(axes, *extents):
    if not axes or used & set(axes) or len(set(axes)) != len(axes):
      return ()
    k = math.prod(sizes.get(a, 0) for a in axes)
    if k <= 1 or any(e % k for e in extents):
      return ()
    used.update(axes)
    return axes

  # Activations decide: lhs batch, lhs feature (whose rhs partner is the
  # cotangent's batch in a filter gradient), then the filter's outputs.
  n = c = o = ()
  if dims.n:
    n = take(_axes(lhs.sharding, lhs.ndim, dims.n[0]), lhs.shape[dims.n[0]])
  if dims.c:
    c = take(_axes(lhs.sharding, lhs.ndim, dims.c[0]), lhs.shape[dims.c[0]],
             rhs.shape[dims.c[1]])
    if not c:
      c = take(_axes(rhs.sharding, rhs.ndim, dims.c[1]), lhs.shape[dims.c[0]],
               rhs.shape[dims.c[1]])
  if dims.o:
    o = take(_axes(rhs.sharding, rhs.ndim, dims.o[0]), rhs.shape[dims.o[0]])
  return n, c, o


def _named(mesh, ndim: int, placed: dict[int, tuple[str, ...]]) -> NamedSharding:
  entries = [None] * ndim
  for d, axes in placed.items():
    if axes:
      entries[d] = axes[0] if len(axes) == 1 else axes
  return NamedSharding(mesh, PartitionSpec(*entries))


def _at(dims, which: int, axes):
  return (dims[which], axes) if dims and axes else None


def _placed(*pairs) -> dict[int, tuple[str, ...]]:
  return dict(p for p in pairs if p)


def _out_placed(dims: _Dims, n, o):
  # The contraction axes c are summed away: the output is replicated over them.
  return _placed(_at(dims.n, 1, n), _at(dims.o, 1, o))


def _shardings(dims: _Dims, mesh, ndim: int, n, c, o):
  lhs = _placed(_at(dims.n, 0, n), _at(dims.c, 0, c))
  rhs = _placed(_at(dims.c, 1, c), _at(dims.o, 0, o))
  return ((_named(mesh, ndim, lhs), _named(mesh, ndim, rhs)),
          _named(mesh, ndim, _out_placed(dims, n, o)))


@functools.lru_cache(maxsize=512)
def _partitionable(bind: Callable, params_items: tuple) -> custom_partitioning:
  params = dict(params_items)
  dims = _Dims(params)

  def conv(lhs, rhs):
    return bind(lhs, rhs, **params)

  def partition(mesh, arg_shapes, result_shape):
    lhs, rhs = arg_shapes
    if not isinstance(lhs.sharding, NamedSharding):
      # No mesh to name axes by (e.g. GSPMDSharding inputs): replicate.
      rep = lhs.sharding.get_replicated(lhs.sharding._device_assignment)
      return mesh, conv, rep, (rep, rep)
    n, c, o = _plan(dims, mesh, lhs, rhs)
    arg_shardings, out_sharding = _shardings(dims, mesh, lhs.ndim, n, c, o)

    def local(lhs, rhs):
      out = conv(lhs, rhs)
      return lax.psum(out, c) if c else out
    return mesh, local, out_sharding, arg_shardings

  def infer_sharding_from_operands(mesh, arg_shapes, result_shape):
    # GSPMD (jax_use_shardy_partitioner=False) propagation.
    lhs, rhs = arg_shapes
    if not isinstance(lhs.sharding, NamedSharding):
      return lhs.sharding.get_replicated(lhs.sharding._device_assignment)
    n, c, o = _plan(dims, mesh, lhs, rhs)
    return _shardings(dims, mesh, lhs.ndim, n, c, o)[1]

  wrapped = custom_partitioning(conv)
  rule, reduction, replicated = dims.rule()
  wrapped.def_partition(partition, infer_sharding_from_operands=infer_sharding_from_operands,
                        sharding_rule=rule, reduction_factors=reduction,
                        need_replication_factors=replicated)
  return wrapped
