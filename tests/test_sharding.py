"""Multi-device use: the op under jit with sharded inputs, and inside shard_map.

Eight virtual CPU devices need XLA_FLAGS set before jax starts, so the checks
run in one subprocess (this file run as a script; jax starts once) and each
test reads its check's result. Each check compares values and gradients with
lax's convolution on the same sharded inputs and, where the point is that
nothing is gathered, inspects the compiled (partitioned) HLO.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

CHECKS = ("transposed_stride2", "dilated", "grouped", "explicit_mesh", "explicit_spatial",
          "mesh_2d", "batch_over_two_axes", "model_parallel_filter", "not_divisible", "gspmd",
          "shard_map", "flax_data_parallel")


@pytest.fixture(scope="module")
def results():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                        timeout=600, cwd=os.path.dirname(__file__))
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
  assert lines, f"the sharding script printed no results:\n{proc.stdout}\n{proc.stderr}"
  out = {}
  for ln in lines:
    r = json.loads(ln)
    out[r["check"]] = r
  return out


@pytest.mark.parametrize("check", CHECKS)
def test_sharding(results, check):
  assert check in results, f"check {check} did not run"
  r = results[check]
  assert r["ok"], f"{check}: {r['error']}"


# ======================================================================
# The script (runs in the subprocess, with 8 CPU devices).
# ======================================================================
DN = ("NHWC", "HWIO", "NHWC")
TOL = dict(rtol=2e-4, atol=2e-4)


def _collectives(hlo: str) -> dict[str, int]:
  ops = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
  return {op: len(re.findall(rf"\s{op}(?:-start)?\(", hlo)) for op in ops}


def _cks_calls(hlo: str) -> list[str]:
  """Result shapes of the cks kernel calls in a compiled HLO text."""
  return re.findall(r"=\s*(\S+)\s+custom-call\([^\n]*custom_call_target=\"cks_conv_cpu\"", hlo)


def _close(a, b, what):
  import numpy as np
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), err_msg=what, **TOL)


def _batch_sharded(x, axes):
  spec = tuple(x.sharding.spec) + (None,)
  assert spec[0] == axes, f"expected batch sharded over {axes}, got {x.sharding.spec}"


def _replicated(x):
  assert x.sharding.is_fully_replicated, f"expected replicated, got {x.sharding}"


def _normal(seed, shape):
  """float32 standard normals from numpy: jax.random compiles a kernel per shape."""
  import numpy as np
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _value_and_grads(conv):
  """(x, w, ct) -> (y, dx, dw): the forward and both cotangents of a conv."""
  import jax

  def f(x, w, ct):
    y, vjp = jax.vjp(conv, x, w)
    return (y,) + vjp(ct)
  return jax.jit(f)


def _data_parallel(cks_conv, lax_conv, x_shape, w_shape, mesh, batch_axes):
  """Runs both convs on a batch sharded over batch_axes; checks values, shardings, HLO."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  x, w = _normal(0, x_shape), _normal(1, w_shape)
  y_shape = jax.eval_shape(lax_conv, x, w).shape
  ct = _normal(2, y_shape)
  sh = NamedSharding(mesh, P(batch_axes))
  x, ct = jax.device_put(x, sh), jax.device_put(ct, sh)
  w = jax.device_put(w, NamedSharding(mesh, P()))
  compiled = _value_and_grads(cks_conv).lower(x, w, ct).compile()
  got = compiled(x, w, ct)
  # The reference runs unsharded, on one device.
  want = _value_and_grads(lax_conv)(*(np.asarray(a) for a in (x, w, ct)))
  for name, a, b in zip(("y", "dx", "dw"), got, want):
    _close(a, b, name)
  _batch_sharded(got[0], batch_axes)
  _batch_sharded(got[1], batch_axes)
  _replicated(got[2])
  hlo = compiled.as_text()
  coll = _collectives(hlo)
  assert coll["all-gather"] == 0 and coll["all-to-all"] == 0 and coll["collective-permute"] == 0, \
      f"activations were moved between devices: {coll}"
  assert coll["all-reduce"] >= 1, "the filter gradient was not reduced over the batch"
  # Each device runs the kernels on its own batch slice: forward and d-lhs
  # on local shapes, d-rhs producing a whole (partial) filter.
  axes = batch_axes if isinstance(batch_axes, tuple) else (batch_axes,)
  local = x_shape[0] // int(np.prod([mesh.shape[a] for a in axes]))
  shape = lambda dims: "f32[" + ",".join(map(str, dims)) + "]"
  want_calls = sorted([shape((local,) + y_shape[1:]), shape((local,) + x_shape[1:]),
                       shape(w_shape)])
  calls = _cks_calls(hlo)
  assert sorted(c.split("{")[0] for c in calls) == want_calls, calls
  assert "CustomSPMDPartitioning" not in hlo
  return {"collectives": coll, "cks_calls": calls}


def check_transposed_stride2(mesh):
  import cks_jax
  from jax import lax
  args = ((2, 2), "SAME")
  return _data_parallel(lambda x, w: cks_jax.conv_transpose(x, w, *args, dimension_numbers=DN),
                        lambda x, w: lax.conv_transpose(x, w, *args, dimension_numbers=DN),
                        (16, 6, 6, 4), (4, 4, 4, 5), mesh, "data")


def check_dilated(mesh):
  import cks_jax
  from jax import lax
  kw = dict(rhs_dilation=(2, 2), dimension_numbers=DN)
  return _data_parallel(lambda x, w: cks_jax.conv_general_dilated(x, w, (1, 1), "SAME", **kw),
                        lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", **kw),
                        (16, 9, 9, 3), (3, 3, 3, 4), mesh, "data")


def check_grouped(mesh):
  import cks_jax
  from jax import lax
  kw = dict(feature_group_count=2, dimension_numbers=DN)
  return _data_parallel(lambda x, w: cks_jax.conv_general_dilated(x, w, (2, 2), "SAME", **kw),
                        lambda x, w: lax.conv_general_dilated(x, w, (2, 2), "SAME", **kw),
                        (8, 8, 8, 4), (3, 3, 2, 6), mesh, "data")


def check_explicit_mesh(mesh):
  """jax.make_mesh's default Explicit axes under jax.set_mesh: shardings are types."""
  import jax
  import cks_jax
  from jax import lax
  emesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  args = ((2, 2), "SAME")
  with jax.set_mesh(emesh):
    out = _data_parallel(
        lambda x, w: cks_jax.conv_transpose(x, w, *args, dimension_numbers=DN),
        lambda x, w: lax.conv_transpose(x, w, *args, dimension_numbers=DN),
        (8, 5, 5, 3), (3, 3, 3, 2), emesh, "data")
    x = jax.ShapeDtypeStruct((8, 5, 5, 3), "float32",
                             sharding=jax.sharding.NamedSharding(emesh, jax.P("data")))
    w = jax.ShapeDtypeStruct((3, 3, 3, 2), "float32")
    y = jax.eval_shape(lambda x, w: cks_jax.conv_transpose(x, w, *args, dimension_numbers=DN),
                       x, w)
    assert tuple(y.sharding.spec)[0] == "data", f"output type not batch-sharded: {y.sharding}"
  return out


def check_explicit_spatial(_):
  """Explicit axes with the input's rows sharded too: the kernel keeps spatial
  dimensions whole (gathered first), and each gradient has its primal's type."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import cks_jax
  from jax import lax
  from jax.sharding import NamedSharding, PartitionSpec as P
  emesh = jax.make_mesh((4, 2), ("data", "sp"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  args = ((2, 2), "SAME")
  f = lambda x, w: cks_jax.conv_transpose(x, w, *args, dimension_numbers=DN)
  ref = lambda x, w: lax.conv_transpose(x, w, *args, dimension_numbers=DN)
  loss = lambda conv: jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1))
  x, w = _normal(0, (8, 6, 6, 3)), _normal(1, (3, 3, 3, 2))
  with jax.set_mesh(emesh):
    xs = jax.device_put(x, NamedSharding(emesh, P("data", "sp")))
    ws = jax.device_put(w, NamedSharding(emesh, P()))
    y = jax.jit(f)(xs, ws)
    dx, dw = jax.jit(loss(f))(xs, ws)
  _close(y, ref(x, w), "y")
  for name, a, b in zip(("dx", "dw"), (dx, dw), loss(ref)(x, w)):
    _close(a, b, name)
  assert tuple(y.sharding.spec)[0] == "data", y.sharding
  assert dx.sharding.is_equivalent_to(xs.sharding, 4), (dx.sharding, xs.sharding)
  _replicated(dw)
  return {"y": str(y.sharding.spec), "dx": str(dx.sharding.spec)}


def check_mesh_2d(_):
  import jax
  import cks_jax
  from jax import lax
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  args = ((2, 2), "SAME")
  return _data_parallel(lambda x, w: cks_jax.conv_transpose(x, w, *args, dimension_numbers=DN),
                        lambda x, w: lax.conv_transpose(x, w, *args, dimension_numbers=DN),
                        (8, 6, 6, 4), (4, 4, 4, 5), mesh, "data")


def check_batch_over_two_axes(_):
  import jax
  import cks_jax
  from jax import lax
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  kw = dict(rhs_dilation=(2, 2), dimension_numbers=DN)
  return _data_parallel(lambda x, w: cks_jax.conv_general_dilated(x, w, (1, 1), "SAME", **kw),
                        lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", **kw),
                        (16, 7, 7, 3), (3, 3, 3, 4), mesh, ("data", "model"))


def check_model_parallel_filter(_):
  """Batch on 'data', filter output features on 'model': the forward output is
  sharded both ways; d-lhs contracts the sharded features (all-reduce over
  'model'), d-rhs the batch (all-reduce over 'data'); nothing is gathered."""
  import jax
  import numpy as np
  import cks_jax
  from jax import lax
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  conv = lambda f: lambda x, w: f(x, w, (2, 2), "SAME", dimension_numbers=DN)
  x, w, ct = _normal(5, (8, 6, 6, 4)), _normal(6, (4, 4, 4, 6)), _normal(7, (8, 12, 12, 6))
  put = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))
  args = put(x, "data"), put(w, None, None, None, "model"), put(ct, "data", None, None, "model")
  compiled = _value_and_grads(conv(cks_jax.conv_transpose)).lower(*args).compile()
  got = compiled(*args)
  want = _value_and_grads(conv(lax.conv_transpose))(x, w, ct)
  for name, a, b in zip(("y", "dx", "dw"), got, want):
    _close(a, b, name)
  specs = [tuple(a.sharding.spec) + (None,) * (4 - len(a.sharding.spec)) for a in got]
  assert specs == [("data", None, None, "model"), ("data", None, None, None),
                   (None, None, None, "model")], specs
  hlo = compiled.as_text()
  coll = _collectives(hlo)
  assert coll["all-gather"] == 0 and coll["all-to-all"] == 0, coll
  assert coll["all-reduce"] == 2, coll
  calls = sorted(c.split("{")[0] for c in _cks_calls(hlo))
  assert calls == ["f32[2,12,12,3]", "f32[2,6,6,4]", "f32[4,4,4,3]"], calls
  return {"collectives": coll, "cks_calls": calls}


def check_not_divisible(mesh):
  """A batch of 6 sliced from one sharded 8 ways: no padded rows reach a kernel or a psum."""
  import jax
  import numpy as np
  import cks_jax
  from jax import lax
  from jax.sharding import NamedSharding, PartitionSpec as P
  x = jax.device_put(_normal(1, (16, 6, 6, 3)), NamedSharding(mesh, P("data")))
  w = jax.device_put(_normal(2, (3, 3, 3, 4)), NamedSharding(mesh, P()))

  def loss(conv):
    def f(x, w):
      y = conv(x[:6], w, (2, 2), ((2, 1), (2, 1)), lhs_dilation=(2, 2), dimension_numbers=DN)
      return (y ** 2).sum(), y
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
  (l1, y1), g1 = loss(cks_jax.conv_general_dilated)(x, w)
  (l2, y2), g2 = loss(lax.conv_general_dilated)(x, w)
  _close(y1, y2, "y")
  _close(g1[0], g2[0], "dx")
  _close(g1[1], g2[1], "dw")
  return {"y_sharding": str(y1.sharding.spec)}


def check_gspmd(mesh):
  """The same with the older GSPMD propagation (infer_sharding_from_operands)."""
  import jax
  jax.config.update("jax_use_shardy_partitioner", False)
  try:
    return check_transposed_stride2(mesh)
  finally:
    jax.config.update("jax_use_shardy_partitioner", True)


def check_shard_map(mesh):
  """Inside shard_map the op sees local shapes; AD sums the replicated filter's gradient."""
  import jax
  import numpy as np
  import cks_jax
  from jax import lax
  from jax.sharding import NamedSharding, PartitionSpec as P
  x = jax.device_put(_normal(3, (16, 6, 6, 4)), NamedSharding(mesh, P("data")))
  w = jax.device_put(_normal(4, (4, 4, 4, 5)), NamedSharding(mesh, P()))
  out = {}
  for check_vma in (True, False):
    def step(conv):
      @jax.jit
      @jax.shard_map(mesh=mesh, in_specs=(P("data"), P()),
                     out_specs=(P("data"), P("data"), P()), check_vma=check_vma)
      def f(x, w):
        c = lambda x, w: conv(x, w, (2, 2), "SAME", dimension_numbers=DN)
        dx, dw = jax.grad(lambda x, w: (c(x, w) ** 2).sum(), argnums=(0, 1))(x, w)
        # With check_vma AD inserts the psum of the replicated filter's gradient.
        return c(x, w), dx, dw if check_vma else lax.psum(dw, "data")
      return f
    f = step(cks_jax.conv_transpose)
    got, want = f(x, w), step(lax.conv_transpose)(x, w)
    for name, a, b in zip(("y", "dx", "dw"), got, want):
      _close(a, b, f"{name} (check_vma={check_vma})")
    hlo = f.lower(x, w).compile().as_text()
    calls = _cks_calls(hlo)
    # Local shapes: forward [2,12,12,5], d-lhs [2,6,6,4], d-rhs the filter.
    assert sorted(c.split("{")[0] for c in calls) == [
        "f32[2,12,12,5]", "f32[2,6,6,4]", "f32[4,4,4,5]"], calls
    assert _collectives(hlo)["all-gather"] == 0, "shard_map gathered"
    out[f"check_vma={check_vma}"] = calls
  return out


def check_flax_data_parallel(mesh):
  """A data-parallel SGD step of a small Flax generator: cks layers vs Flax's own."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  import cks_jax.flax.linen as cnn

  def model(conv, conv_t):
    class Net(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = nn.relu(conv(8, (3, 3), strides=(2, 2))(x))
        x = nn.relu(conv(8, (3, 3), kernel_dilation=(2, 2), feature_group_count=2)(x))
        return conv_t(3, (4, 4), strides=(2, 2))(x)
    return Net()

  cks_net, ref_net = model(cnn.Conv, cnn.ConvTranspose), model(nn.Conv, nn.ConvTranspose)
  x = _normal(3, (16, 12, 12, 3))
  # Flax's init compiles a threefry kernel per parameter: numpy values instead.
  shapes = jax.eval_shape(ref_net.init, jax.random.PRNGKey(4), x)
  scale = lambda s: 1 / np.sqrt(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 0.1
  params = jax.tree.map(lambda s: _normal(s.size, s.shape) * np.float32(scale(s)), shapes)

  def train_step(net):
    def loss(p, x):
      return jnp.mean((net.apply(p, x) - x) ** 2)

    @jax.jit
    def step(p, x):
      l, g = jax.value_and_grad(loss)(p, x)
      return jax.tree.map(lambda w, d: w - 0.1 * d, p, g), l
    return step

  # cks: batch sharded over the 8 devices, parameters replicated. The
  # reference: Flax's own layers, unsharded on one device.
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  p1 = jax.device_put(params, NamedSharding(mesh, P()))
  cks_step = train_step(cks_net).lower(p1, xs).compile()
  ref_step = train_step(ref_net)
  p2 = params
  losses = []
  for _ in range(3):
    p1, l1 = cks_step(p1, xs)
    p2, l2 = ref_step(p2, x)
    losses.append((float(l1), float(l2)))
    _close(l1, l2, "loss")
  jax.tree.map(lambda a, b: _close(a, b, "params"), p1, p2)
  assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(p1))
  hlo = cks_step.as_text()
  coll = _collectives(hlo)
  assert coll["all-gather"] == 0, f"the data-parallel step gathered: {coll}"
  assert coll["all-reduce"] >= 1, "the gradients were not reduced over the batch"
  calls = _cks_calls(hlo)
  # 3 forward, 2 d-lhs (not the first layer's), 3 d-rhs; all on the local batch of 2.
  assert len(calls) == 8, calls
  return {"losses": losses, "collectives": coll, "cks_calls": calls}


def _main():
  import traceback
  import jax
  assert jax.device_count() == 8, jax.devices()
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  for name in sys.argv[1:] or CHECKS:
    t0 = time.perf_counter()
    try:
      info = globals()[f"check_{name}"](mesh)
      print(json.dumps({"check": name, "ok": True, "seconds": time.perf_counter() - t0,
                        "info": info}, default=str), flush=True)
    except Exception as e:  # report every check, not only the first failure
      print(json.dumps({"check": name, "ok": False,
                        "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}),
            flush=True)


if __name__ == "__main__":
  _main()
