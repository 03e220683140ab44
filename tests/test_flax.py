"""cks_jax.flax: Flax's Conv / ConvTranspose (linen and nnx) on cks kernels.

Each cks layer must compute what Flax's own layer computes with the same
parameters (values and gradients w.r.t. params and input), accept Flax's
checkpoints unchanged, and leave no XLA convolution in a compiled training step.
"""
import inspect
import re

import numpy as np
import pytest

pytest.importorskip("flax", reason="flax is not installed (pip install 'cks-jax[flax]')")

import flax.linen as fnn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import cks_jax  # noqa: E402
from cks_jax.flax import linen as cnn  # noqa: E402
from cks_jax.flax import nnx as cnnx  # noqa: E402
from oracle import random  # noqa: E402

F64 = jnp.float64
TOL = {np.dtype("float64"): dict(rtol=1e-10, atol=1e-10),
       np.dtype("float32"): dict(rtol=1e-5, atol=1e-5)}

# (id, attributes shared by linen and nnx, input shape (with batch dims))
CONV_CASES = [
    ("1d_s2_same", dict(features=5, kernel_size=(3,), strides=2, padding="SAME"), (2, 11, 3)),
    ("1d_causal_dil2", dict(features=4, kernel_size=(3,), padding="CAUSAL", kernel_dilation=2),
     (2, 10, 3)),
    ("2d_valid_s21", dict(features=4, kernel_size=(3, 3), strides=(2, 1), padding="VALID"),
     (2, 9, 8, 3)),
    ("2d_circular", dict(features=4, kernel_size=(3, 4), padding="CIRCULAR"), (2, 7, 8, 3)),
    ("2d_reflect", dict(features=4, kernel_size=(3, 3), padding="REFLECT"), (2, 7, 8, 3)),
    ("2d_explicit_pad", dict(features=4, kernel_size=(3, 2), padding=((1, 2), (0, 1))),
     (2, 7, 6, 3)),
    ("2d_int_pad_s2", dict(features=4, kernel_size=(4, 4), strides=2, padding=1), (2, 8, 9, 3)),
    ("2d_kdil_23", dict(features=4, kernel_size=(3, 3), kernel_dilation=(2, 3)), (2, 12, 13, 3)),
    ("2d_kdil_4_valid", dict(features=4, kernel_size=(3, 3), kernel_dilation=4, padding="VALID"),
     (2, 12, 12, 3)),
    # lax refuses string padding "SAME" with input dilation; so does cks.
    ("2d_idil_2", dict(features=4, kernel_size=(3, 3), input_dilation=2,
                       padding=((1, 1), (2, 1))), (2, 6, 5, 3)),
    ("2d_idil_s2_pad0", dict(features=4, kernel_size=(4, 4), input_dilation=(2, 3),
                             strides=(1, 2), padding=0), (2, 6, 5, 3)),
    ("2d_groups", dict(features=6, kernel_size=(3, 3), feature_group_count=2), (2, 8, 8, 4)),
    ("2d_groups_s2_dil", dict(features=8, kernel_size=(3, 3), strides=2, kernel_dilation=2,
                              feature_group_count=4), (2, 11, 10, 4)),
    ("2d_no_bias", dict(features=4, kernel_size=(3, 3), use_bias=False), (2, 6, 6, 3)),
    ("2d_two_batch_dims", dict(features=4, kernel_size=(3, 3)), (2, 3, 6, 6, 3)),
    ("2d_no_batch_dim", dict(features=4, kernel_size=(3, 3), strides=2), (7, 6, 3)),
    ("3d_s2_same", dict(features=4, kernel_size=(2, 3, 3), strides=2), (2, 5, 6, 7, 3)),
    ("3d_kdil_valid", dict(features=3, kernel_size=(2, 2, 3), kernel_dilation=(1, 2, 2),
                           padding="VALID"), (1, 5, 6, 7, 2)),
]

TRANSPOSE_CASES = [
    ("2d_k4_s2_same", dict(features=5, kernel_size=(4, 4), strides=(2, 2), padding="SAME"),
     (2, 5, 6, 3)),
    ("2d_k3_s2_valid", dict(features=4, kernel_size=(3, 3), strides=(2, 2), padding="VALID"),
     (2, 5, 6, 3)),
    ("2d_k3_s2_kdil2", dict(features=4, kernel_size=(3, 3), strides=(2, 2),
                            kernel_dilation=(2, 2)), (2, 5, 6, 3)),
    ("2d_k3_s2_kdil2_valid", dict(features=4, kernel_size=(3, 3), strides=(2, 2),
                                  kernel_dilation=(2, 1), padding="VALID"), (2, 5, 6, 3)),
    ("2d_k4_s2_transpose_kernel", dict(features=4, kernel_size=(4, 4), strides=(2, 2),
                                       transpose_kernel=True), (2, 5, 6, 3)),
    ("2d_k3_s2_transpose_kernel_valid", dict(features=4, kernel_size=(3, 3), strides=(2, 2),
                                             padding="VALID", transpose_kernel=True),
     (2, 5, 6, 3)),
    ("2d_explicit_pad_s2", dict(features=4, kernel_size=(4, 3), strides=(2, 2),
                                padding=((1, 2), (2, 1))), (2, 5, 6, 3)),
    ("2d_circular_s2", dict(features=4, kernel_size=(6, 6), strides=(2, 2), padding="CIRCULAR",
                            transpose_kernel=True), (2, 5, 6, 3)),
    ("2d_stride1", dict(features=4, kernel_size=(3, 3)), (2, 5, 6, 3)),
    ("2d_no_bias_s3", dict(features=4, kernel_size=(5, 5), strides=(3, 2), use_bias=False),
     (2, 4, 5, 3)),
    ("2d_two_batch_dims", dict(features=4, kernel_size=(4, 4), strides=(2, 2)), (2, 2, 4, 5, 3)),
    ("1d_k5_s2_same", dict(features=4, kernel_size=5, strides=(2,)), (2, 9, 3)),
    ("1d_k4_s2_valid", dict(features=4, kernel_size=(4,), strides=(2,), padding="VALID"),
     (2, 9, 3)),
    ("3d_k233_s2_valid", dict(features=3, kernel_size=(2, 3, 3), strides=(2, 2, 2),
                              padding="VALID"), (1, 3, 4, 5, 2)),
    ("3d_k4_s2_same_tk", dict(features=3, kernel_size=(4, 4, 4), strides=(2, 2, 2),
                              transpose_kernel=True), (1, 3, 4, 3, 2)),
]


def _ids(cases):
  return [c[0] for c in cases]


def _assert_trees_close(a, b, dtype, what):
  assert jax.tree.structure(a) == jax.tree.structure(b), what
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype, (what, path, x.shape, y.shape)
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), err_msg=f"{what} {path}",
                               **TOL[np.dtype(dtype)])


def _shapes(tree):
  return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


def _filled(shapes, seed):
  """A tree of abstract arrays filled with numpy normals scaled by 1 / sqrt(fan in)
  (biases by 0.1, so they are non-zero and exercised): Flax's initializers
  compile a threefry kernel per parameter shape, 7-10 s per model here."""
  rng = np.random.default_rng(seed)
  scale = lambda s: 1 / np.sqrt(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 0.1
  return jax.tree.map(lambda s: jnp.asarray(scale(s) * rng.standard_normal(s.shape), s.dtype),
                      shapes)


def _init(mod, *args, seed=0):
  """A linen module's params: the tree its init makes (names, shapes, dtypes), filled."""
  return _filled(jax.eval_shape(mod.init, jax.random.PRNGKey(0), *args), seed)


def _nnx_new(make, seed=0):
  """``make()`` (an nnx module) built abstractly, its state filled."""
  graphdef, state = nnx.split(nnx.eval_shape(make))
  return nnx.merge(graphdef, _filled(state, seed))


def _value_and_grad(f, ct):
  """jit of (params, x) -> (f(params, x), gradient of sum(f * ct) w.r.t. both):
  the value and the gradient in one compiled function."""
  def g(p, x):
    y, vjp = jax.vjp(f, p, x)
    return y, vjp(ct)
  return jax.jit(g)


# ------------------------------------------------------------------ linen

def _check_linen(flax_mod, cks_mod, in_shape, dtype):
  kp = jax.random.PRNGKey(0)
  x = random(in_shape, dtype, 0)
  params = _init(flax_mod, x, seed=1)
  # A Flax checkpoint has exactly the structure (names, shapes, dtypes) the cks layer expects.
  assert _shapes(params) == _shapes(jax.eval_shape(cks_mod.init, kp, x))
  ct = random(jax.eval_shape(flax_mod.apply, params, x).shape, dtype, 2)
  y_ref, g_ref = _value_and_grad(flax_mod.apply, ct)(params, x)
  y, g = _value_and_grad(cks_mod.apply, ct)(params, x)
  _assert_trees_close(y, y_ref, dtype, "output")
  _assert_trees_close(g, g_ref, dtype, "gradient")
  with cks_jax.use_backend("ffi"):  # "auto" may route narrow layers to XLA (test_hlo)
    hlo = jax.jit(lambda p, x: cks_mod.apply(p, x)).lower(params, x).as_text()
  assert "convolution" not in hlo, "the cks layer lowered an XLA convolution"


@pytest.mark.parametrize("name,attrs,in_shape", CONV_CASES, ids=_ids(CONV_CASES))
def test_linen_conv_matches_flax(name, attrs, in_shape):
  attrs = dict(attrs, param_dtype=F64)
  _check_linen(fnn.Conv(**attrs), cnn.Conv(**attrs), in_shape, F64)


@pytest.mark.parametrize("name,attrs,in_shape", TRANSPOSE_CASES, ids=_ids(TRANSPOSE_CASES))
def test_linen_conv_transpose_matches_flax(name, attrs, in_shape):
  attrs = dict(attrs, param_dtype=F64)
  _check_linen(fnn.ConvTranspose(**attrs), cnn.ConvTranspose(**attrs), in_shape, F64)


def test_linen_float32_default_dtypes():
  attrs = dict(features=8, kernel_size=(4, 4), strides=(2, 2))
  _check_linen(fnn.ConvTranspose(**attrs), cnn.ConvTranspose(**attrs), (2, 6, 6, 4),
               jnp.float32)
  attrs = dict(features=8, kernel_size=(3, 3), kernel_dilation=2)
  _check_linen(fnn.Conv(**attrs), cnn.Conv(**attrs), (2, 9, 9, 4), jnp.float32)


def test_linen_mixed_input_and_param_dtypes_are_promoted():
  # float32 input into float64 params: Flax's promote_dtype casts both, no mixed-dtype error.
  x = jnp.ones((1, 6, 6, 2), jnp.float32)
  for cls in (cnn.Conv, cnn.ConvTranspose):
    mod = cls(3, (3, 3), strides=(2, 2), param_dtype=F64)
    params = mod.init(jax.random.PRNGKey(0), x)
    assert mod.apply(params, x).dtype == F64
    mod = cls(3, (3, 3), strides=(2, 2), dtype=jnp.bfloat16)
    params = mod.init(jax.random.PRNGKey(0), x)
    assert mod.apply(params, x).dtype == jnp.bfloat16


def test_linen_same_fields_and_defaults_as_flax():
  for ours, theirs in ((cnn.Conv, fnn.Conv), (cnn.ConvTranspose, fnn.ConvTranspose)):
    assert issubclass(ours, theirs) and ours.__name__ == theirs.__name__
    f_ours, f_theirs = ours.__dataclass_fields__, theirs.__dataclass_fields__
    assert list(f_ours) == list(f_theirs)
    for k, f in f_theirs.items():
      if k != "conv_general_dilated":
        assert f_ours[k].default is f.default, k
  assert cnn.Conv.__dataclass_fields__["conv_general_dilated"].default is \
      cks_jax.conv_general_dilated
  # Flax's own layer is left untouched.
  x = jnp.ones((1, 5, 5, 2))
  p = fnn.ConvTranspose(3, (3, 3), strides=(2, 2)).init(jax.random.PRNGKey(0), x)
  hlo = jax.jit(fnn.ConvTranspose(3, (3, 3), strides=(2, 2)).apply).lower(p, x).as_text()
  assert "convolution" in hlo


def test_linen_user_hook_still_wins():
  calls = []

  def spy(*args, **kwargs):
    calls.append(1)
    return jax.lax.conv_general_dilated(*args, **kwargs)

  mod = cnn.Conv(3, (3, 3), conv_general_dilated=spy)
  x = jnp.ones((1, 5, 5, 2))
  mod.apply(mod.init(jax.random.PRNGKey(0), x), x)
  assert calls


class Generator(fnn.Module):
  """DCGAN-style generator; the conv classes are attributes so Flax and cks share code."""
  conv_t: type = fnn.ConvTranspose
  conv: type = fnn.Conv

  @fnn.compact
  def __call__(self, z):
    h = fnn.relu(fnn.Dense(4 * 4 * 16)(z)).reshape(z.shape[0], 4, 4, 16)
    h = fnn.relu(self.conv_t(16, (4, 4), strides=(2, 2))(h))           # 4 -> 8
    h = fnn.relu(self.conv_t(8, (4, 4), strides=(2, 2))(h))            # 8 -> 16
    h = self.conv_t(4, (3, 3), strides=(2, 2), transpose_kernel=True)(h)  # 16 -> 32
    return jnp.tanh(self.conv(1, (3, 3))(h))


class DilatedNet(fnn.Module):
  conv: type = fnn.Conv

  @fnn.compact
  def __call__(self, x):
    h = fnn.relu(self.conv(8, (3, 3))(x))
    h = fnn.relu(self.conv(8, (3, 3), kernel_dilation=2)(h))
    h = fnn.relu(self.conv(8, (3, 3), kernel_dilation=4)(h))
    h = fnn.relu(self.conv(8, (3, 3), strides=2, feature_group_count=2)(h))
    return fnn.Dense(10)(h.mean(axis=(1, 2)))


def _linen_models():
  z = jnp.ones((2, 8), jnp.float32)
  x = jnp.ones((2, 16, 16, 1), jnp.float32)
  return [(Generator(), Generator(cnn.ConvTranspose, cnn.Conv), z, (2, 32, 32, 1)),
          (DilatedNet(), DilatedNet(cnn.Conv), x, (2, 10))]


def test_linen_model_checkpoint_loads_unchanged():
  for flax_model, cks_model, inp, out_shape in _linen_models():
    params = _init(flax_model, inp)
    # Auto-names (Conv_0, ConvTranspose_1, ...) and shapes agree, so the Flax
    # params tree is directly a cks checkpoint, and vice versa.
    assert _shapes(params) == _shapes(jax.eval_shape(cks_model.init, jax.random.PRNGKey(1), inp))
    y = jax.jit(cks_model.apply)(params, inp)
    assert y.shape == out_shape
    _assert_trees_close(y, jax.jit(flax_model.apply)(params, inp), jnp.float32,
                        type(flax_model).__name__)


def _train_step(model):
  def loss(params, inp):
    return jnp.mean(model.apply(params, inp) ** 2)

  def step(params, inp):
    l, g = jax.value_and_grad(loss)(params, inp)
    return jax.tree.map(lambda w, d: w - 0.1 * d, params, g), l
  return step


# The CPU kernel's HLO, also where the default device is a GPU (whose "auto" runs no kernel).
runs_on_cpu = pytest.mark.usefixtures("on_cpu")


@runs_on_cpu
def test_linen_training_step_hlo_has_no_xla_convolution():
  for flax_model, cks_model, inp, _ in _linen_models():
    params = _init(flax_model, inp)
    with cks_jax.use_backend("ffi"):  # "auto" may route narrow layers to XLA (test_hlo)
      hlo = jax.jit(_train_step(cks_model)).lower(params, inp).compile().as_text()
    assert not re.search(r"\bconvolution\(", hlo), "an XLA convolution survived"
    assert "cks_conv_cpu" in hlo
    # Flax's own model does use XLA's convolution (the test can see a difference).
    ref = jax.jit(_train_step(flax_model)).lower(params, inp).compile().as_text()
    assert re.search(r"\bconvolution\(", ref) and "cks_conv_cpu" not in ref


def test_linen_training_step_matches_flax():
  for flax_model, cks_model, inp, _ in _linen_models():
    params = _init(flax_model, inp)
    (p1, l1), (p2, l2) = (jax.jit(_train_step(m))(params, inp) for m in (cks_model, flax_model))
    _assert_trees_close((p1, l1), (p2, l2), jnp.float32, type(flax_model).__name__)


class _ResBlock(fnn.Module):
  conv: type = fnn.Conv

  @fnn.compact
  def __call__(self, h, _):
    return h + jnp.tanh(self.conv(8, (3, 3), kernel_dilation=2)(h)), None


class ScannedNet(fnn.Module):
  """WaveNet-style stack: one remat'd dilated block, nn.scan'd over 3 layers."""
  conv: type = fnn.Conv

  @fnn.compact
  def __call__(self, x):
    stack = fnn.scan(fnn.remat(_ResBlock), variable_axes={"params": 0},
                     split_rngs={"params": True}, length=3)
    return stack(conv=self.conv)(x, None)[0]


@runs_on_cpu
def test_linen_scan_and_remat_match_flax_on_the_kernel():
  # nn.scan over nn.remat'd cks layers: Flax's params load unchanged, the training
  # step matches Flax's own layers, and the loop body (recomputed forward included)
  # has no XLA convolution.
  flax_model, cks_model = ScannedNet(), ScannedNet(cnn.Conv)
  x = random((2, 12, 12, 8), jnp.float32, 3)
  params = _init(flax_model, x)
  assert _shapes(params) == _shapes(jax.eval_shape(cks_model.init, jax.random.PRNGKey(1), x))
  (p1, l1), (p2, l2) = (jax.jit(_train_step(m))(params, x) for m in (cks_model, flax_model))
  _assert_trees_close((p1, l1), (p2, l2), jnp.float32, "scanned, remat'd step")
  with cks_jax.use_backend("ffi"):
    hlo = jax.jit(_train_step(cks_model)).lower(params, x).compile().as_text()
  assert not re.search(r"\bconvolution\(", hlo), "an XLA convolution survived"
  assert "cks_conv_cpu" in hlo


# ------------------------------------------------------------------ nnx

_NNX_RENAME = {"features": "out_features"}


def _nnx_kwargs(attrs, in_features):
  kw = {_NNX_RENAME.get(k, k): v for k, v in attrs.items()}
  return dict(kw, in_features=in_features)


def _nnx_fn(model):
  graphdef, state = nnx.split(model)
  return (lambda st, x: nnx.merge(graphdef, st)(x)), state


def _check_nnx(make_flax, make_cks, in_shape, dtype):
  flax_layer, cks_layer = _nnx_new(make_flax), _nnx_new(make_cks, seed=2)
  x = random(in_shape, dtype, 0)
  state = nnx.state(flax_layer)
  # Load the Flax layer's state (a checkpoint) into the cks layer unchanged.
  assert _shapes(nnx.to_pure_dict(state)) == _shapes(nnx.to_pure_dict(nnx.state(cks_layer)))
  nnx.update(flax_layer, state)
  nnx.update(cks_layer, state)
  f_ref, s_ref = _nnx_fn(flax_layer)
  f_cks, s_cks = _nnx_fn(cks_layer)
  ct = random(jax.eval_shape(f_ref, s_ref, x).shape, dtype, 2)
  y_ref, g_ref = _value_and_grad(f_ref, ct)(s_ref, x)
  y, g = _value_and_grad(f_cks, ct)(s_cks, x)
  _assert_trees_close(y, y_ref, dtype, "output")
  _assert_trees_close(g, g_ref, dtype, "gradient")
  with cks_jax.use_backend("ffi"):  # "auto" may route narrow layers to XLA (test_hlo)
    hlo = jax.jit(lambda s, x: f_cks(s, x)).lower(s_cks, x).as_text()  # a fresh trace
  assert "convolution" not in hlo, "the cks layer lowered an XLA convolution"


@pytest.mark.parametrize("name,attrs,in_shape", CONV_CASES, ids=_ids(CONV_CASES))
def test_nnx_conv_matches_flax(name, attrs, in_shape):
  kw = dict(_nnx_kwargs(attrs, in_shape[-1]), param_dtype=F64)
  _check_nnx(lambda: nnx.Conv(**kw, rngs=nnx.Rngs(0)), lambda: cnnx.Conv(**kw, rngs=nnx.Rngs(1)),
             in_shape, F64)


@pytest.mark.parametrize("name,attrs,in_shape", TRANSPOSE_CASES, ids=_ids(TRANSPOSE_CASES))
def test_nnx_conv_transpose_matches_flax(name, attrs, in_shape):
  kw = dict(_nnx_kwargs(attrs, in_shape[-1]), param_dtype=F64)
  _check_nnx(lambda: nnx.ConvTranspose(**kw, rngs=nnx.Rngs(0)),
             lambda: cnnx.ConvTranspose(**kw, rngs=nnx.Rngs(1)), in_shape, F64)


def test_nnx_float32_default_dtypes():
  kw = dict(in_features=4, out_features=8, kernel_size=(4, 4), strides=(2, 2))
  _check_nnx(lambda: nnx.ConvTranspose(**kw, rngs=nnx.Rngs(0)),
             lambda: cnnx.ConvTranspose(**kw, rngs=nnx.Rngs(0)), (2, 6, 6, 4), jnp.float32)
  kw = dict(in_features=4, out_features=8, kernel_size=(3, 3), kernel_dilation=2)
  _check_nnx(lambda: nnx.Conv(**kw, rngs=nnx.Rngs(0)), lambda: cnnx.Conv(**kw, rngs=nnx.Rngs(0)),
             (2, 9, 9, 4), jnp.float32)


def test_nnx_same_signature_and_init_as_flax():
  for ours, theirs in ((cnnx.Conv, nnx.Conv), (cnnx.ConvTranspose, nnx.ConvTranspose)):
    assert issubclass(ours, theirs) and ours.__name__ == theirs.__name__
    p_ours = inspect.signature(ours.__init__).parameters
    p_theirs = inspect.signature(theirs.__init__).parameters
    assert list(p_ours) == list(p_theirs)
    for k, p in p_theirs.items():
      if k != "conv_general_dilated":
        assert p_ours[k].default is p.default and p_ours[k].kind == p.kind, k
  # Same rngs -> same initial parameters as Flax's layers.
  for ours, theirs in ((cnnx.Conv, nnx.Conv), (cnnx.ConvTranspose, nnx.ConvTranspose)):
    a = nnx.to_pure_dict(nnx.state(ours(3, 4, (3, 3), rngs=nnx.Rngs(7))))
    b = nnx.to_pure_dict(nnx.state(theirs(3, 4, (3, 3), rngs=nnx.Rngs(7))))
    _assert_trees_close(a, b, jnp.float32, ours.__name__)
  layer = cnnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))
  assert layer.conv_general_dilated is cks_jax.conv_general_dilated
  layer = cnnx.Conv(3, 4, (3, 3), conv_general_dilated=jax.lax.conv_general_dilated,
                    rngs=nnx.Rngs(0))
  assert layer.conv_general_dilated is jax.lax.conv_general_dilated


class NnxGenerator(nnx.Module):
  def __init__(self, mod, rngs):
    self.dense = nnx.Linear(8, 4 * 4 * 16, rngs=rngs)
    self.up1 = mod.ConvTranspose(16, 16, (4, 4), strides=(2, 2), rngs=rngs)
    self.up2 = mod.ConvTranspose(16, 8, (4, 4), strides=(2, 2), rngs=rngs)
    self.up3 = mod.ConvTranspose(8, 4, (3, 3), strides=(2, 2), transpose_kernel=True, rngs=rngs)
    self.out = mod.Conv(4, 1, (3, 3), rngs=rngs)

  def __call__(self, z):
    h = nnx.relu(self.dense(z)).reshape(z.shape[0], 4, 4, 16)
    h = nnx.relu(self.up1(h))
    h = nnx.relu(self.up2(h))
    return jnp.tanh(self.out(self.up3(h)))


class NnxDilatedNet(nnx.Module):
  def __init__(self, mod, rngs):
    self.c1 = mod.Conv(1, 8, (3, 3), rngs=rngs)
    self.c2 = mod.Conv(8, 8, (3, 3), kernel_dilation=2, rngs=rngs)
    self.c3 = mod.Conv(8, 8, (3, 3), kernel_dilation=4, rngs=rngs)
    self.c4 = mod.Conv(8, 8, (3, 3), strides=2, feature_group_count=2, rngs=rngs)
    self.head = nnx.Linear(8, 10, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.c1(x))
    h = nnx.relu(self.c2(h))
    h = nnx.relu(self.c3(h))
    h = nnx.relu(self.c4(h))
    return self.head(h.mean(axis=(1, 2)))


def _nnx_models():
  z = jnp.ones((2, 8), jnp.float32)
  x = jnp.ones((2, 16, 16, 1), jnp.float32)
  return [(NnxGenerator, z, (2, 32, 32, 1)), (NnxDilatedNet, x, (2, 10))]


def _nnx_train_step(graphdef):
  def loss(state, inp):
    return jnp.mean(nnx.merge(graphdef, state)(inp) ** 2)

  def step(state, inp):
    l, g = jax.value_and_grad(loss)(state, inp)
    return jax.tree.map(lambda w, d: w - 0.1 * d, state, g), l
  return step


def test_nnx_model_checkpoint_loads_unchanged():
  for cls, inp, out_shape in _nnx_models():
    flax_model = _nnx_new(lambda: cls(nnx, nnx.Rngs(0)))
    cks_model = _nnx_new(lambda: cls(cnnx, nnx.Rngs(1)), seed=1)
    state = nnx.state(flax_model)
    assert _shapes(nnx.to_pure_dict(state)) == _shapes(nnx.to_pure_dict(nnx.state(cks_model)))
    nnx.update(cks_model, state)
    (f_cks, s_cks), (f_ref, s_ref) = _nnx_fn(cks_model), _nnx_fn(flax_model)
    y = jax.jit(f_cks)(s_cks, inp)
    assert y.shape == out_shape
    _assert_trees_close(y, jax.jit(f_ref)(s_ref, inp), jnp.float32, cls.__name__)


@runs_on_cpu
def test_nnx_training_step_hlo_has_no_xla_convolution():
  for cls, inp, _ in _nnx_models():
    graphdef, state = nnx.split(_nnx_new(lambda: cls(cnnx, nnx.Rngs(0))))
    with cks_jax.use_backend("ffi"):  # "auto" may route narrow layers to XLA (test_hlo)
      hlo = jax.jit(_nnx_train_step(graphdef)).lower(state, inp).compile().as_text()
    assert not re.search(r"\bconvolution\(", hlo), "an XLA convolution survived"
    assert "cks_conv_cpu" in hlo
    graphdef, state = nnx.split(_nnx_new(lambda: cls(nnx, nnx.Rngs(0))))
    ref = jax.jit(_nnx_train_step(graphdef)).lower(state, inp).compile().as_text()
    assert re.search(r"\bconvolution\(", ref) and "cks_conv_cpu" not in ref


def test_nnx_training_step_matches_flax():
  for cls, inp, _ in _nnx_models():
    flax_model = _nnx_new(lambda: cls(nnx, nnx.Rngs(0)))
    cks_model = _nnx_new(lambda: cls(cnnx, nnx.Rngs(0)))
    g_ref, state = nnx.split(flax_model)
    g_cks, _ = nnx.split(cks_model)
    a = jax.jit(_nnx_train_step(g_cks))(state, inp)
    b = jax.jit(_nnx_train_step(g_ref))(state, inp)
    _assert_trees_close(a, b, jnp.float32, cls.__name__)
