"""Backend choice: the cks FFI kernel, the portable lax decomposition, or XLA."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import cks_jax
from oracle import assert_close, random

DN = ("NHWC", "HWIO", "NHWC")
CASES = [
    dict(window_strides=(1, 1), padding=[(2, 2), (2, 2)], lhs_dilation=(2, 2)),   # KS-deconv
    dict(window_strides=(1, 1), padding="SAME", rhs_dilation=(2, 3)),             # Sk-dilated
    dict(window_strides=(2, 1), padding=[(1, 2), (0, 1)], lhs_dilation=(3, 1),
         rhs_dilation=(1, 2)),                                                    # mixed
    dict(window_strides=(2, 2), padding="SAME"),                                  # ConvV2
]


@pytest.mark.parametrize("backend", ["ffi", "portable", "xla", "auto"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_every_backend_matches_lax(backend, case):
  kw = dict(CASES[case], dimension_numbers=DN)
  l, r = random((2, 9, 8, 4), np.float64, 0), random((4, 3, 4, 6), np.float64, 1)
  f = lambda l, r: cks_jax.conv_general_dilated(l, r, backend=backend, **kw)
  g = lambda l, r: lax.conv_general_dilated(l, r, **kw)
  assert_close(jax.jit(f)(l, r), g(l, r), np.float64, "value")
  ct = random(g(l, r).shape, np.float64, 2)
  for a, b in zip(jax.vjp(f, l, r)[1](ct), jax.vjp(g, l, r)[1](ct)):
    assert_close(a, b, np.float64, "vjp")


def _dilated_convolutions(text):
  """stablehlo.convolution ops that still carry an lhs or rhs dilation."""
  bad = []
  for line in text.splitlines():
    if "stablehlo.convolution" not in line:
      continue
    for key in ("lhs_dilate", "rhs_dilate"):
      m = re.search(key + r"\s*=\s*\[([^\]]*)\]", line)
      if m and any(int(v) != 1 for v in m.group(1).split(",")):
        bad.append(line.strip()[:160])
  return bad


@pytest.mark.parametrize("platform", ["tpu", "rocm"])
@pytest.mark.parametrize("backend", ["portable", "auto"])
def test_platforms_without_kernel_leave_no_dilated_convolution(platform, backend):
  l, r = jnp.ones((2, 8, 8, 4)), jnp.ones((4, 4, 4, 6))
  up = lambda l, r: cks_jax.conv_transpose(l, r, (2, 2), "SAME", dimension_numbers=DN,
                                           backend=backend)
  atrous = lambda l, r: cks_jax.conv_general_dilated(l, r, (1, 1), "SAME", rhs_dilation=(2, 2),
                                                     dimension_numbers=DN, backend=backend)
  # "auto" sends atrous convolutions to XLA (measured faster there), so it
  # is checked on the transposed convolution alone.
  loss = ((lambda l, r: jnp.sum(up(l, r) ** 2) + jnp.sum(atrous(l, r) ** 2))
          if backend == "portable" else (lambda l, r: jnp.sum(up(l, r) ** 2)))
  step = jax.grad(loss, (0, 1))
  text = jax.jit(step).trace(l, r).lower(lowering_platforms=(platform,)).as_text()
  assert "cks_conv_cpu" not in text and "cks_conv_cuda" not in text
  assert not _dilated_convolutions(text), _dilated_convolutions(text)
  # lax itself would have dilated convolutions here: the check can fail.
  ref = jax.grad(lambda l, r: jnp.sum(lax.conv_transpose(l, r, (2, 2), "SAME",
                                                         dimension_numbers=DN) ** 2), (0, 1))
  assert _dilated_convolutions(jax.jit(ref).trace(l, r).lower(
      lowering_platforms=(platform,)).as_text())


def test_ffi_backend_without_kernel_is_a_clear_error():
  f = lambda l, r: cks_jax.conv_general_dilated(l, r, (1, 1), "SAME", backend="ffi")
  with pytest.raises(NotImplementedError, match="no cks kernel for platform 'tpu'"):
    jax.jit(f).trace(jnp.ones((1, 2, 5, 5)), jnp.ones((3, 2, 3, 3))).lower(
        lowering_platforms=("tpu",))


def test_use_backend_context_and_explain():
  shapes = ((2, 8, 8, 4), (4, 4, 4, 6), (1, 1), [(2, 2), (2, 2)], (2, 2))
  assert cks_jax.explain(*shapes, dimension_numbers=DN).backend == "cks-cpu"
  with cks_jax.use_backend("portable"):
    e = cks_jax.explain(*shapes, dimension_numbers=DN)
    assert e.backend == "portable" and "requested" in e.reason
    l, r = random((2, 8, 8, 4), np.float32, 0), random((4, 4, 4, 6), np.float32, 1)
    hlo = jax.jit(lambda l, r: cks_jax.conv_transpose(l, r, (2, 2), "SAME")).lower(
        l, r).as_text()
    assert "cks_conv_cpu" not in hlo
  assert cks_jax.explain(*shapes, dimension_numbers=DN, platform="tpu").backend == "portable"
  assert cks_jax.explain((1, 5, 5, 2), (3, 3, 2, 3), (2, 2), "SAME", dimension_numbers=DN,
                         platform="tpu").backend == "xla"
  assert cks_jax.explain(*shapes, dimension_numbers=DN, platform="tpu",
                         backend="ffi").backend == "unavailable"


def test_unknown_backend():
  with pytest.raises(ValueError, match="backend must be one of"):
    cks_jax.conv_general_dilated(jnp.ones((1, 2, 5)), jnp.ones((3, 2, 3)), (1,), "SAME",
                                 backend="cudnn")
  with pytest.raises(ValueError, match="backend must be one of"):
    with cks_jax.use_backend("fast"):
      pass
