"""Negative padding on every backend, against the direct oracle (not lax).

XLA:CPU's convolution reads past its input for some negative low paddings
(openxla/xla#48713): where lax's output should hold the padding's zeros it
holds other rows or uninitialised memory. The kernel crops by its geometry;
every convolution cks_jax hands to XLA (``backend="xla"``, the portable
path's dense pieces, and ``"auto"``'s choice of XLA for some narrow outputs)
gets the negative padding as a slice (``portable.crop_negative_padding``).
The references here are :func:`oracle.direct_conv` (pad, slice, einsum: no
convolution op) and its VJP.
"""
from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest

import cks_jax
from cks_jax._src import shapes
from oracle import assert_close, direct_conv, random

NHWC = ("NHWC", "HWIO", "NHWC")
NWC = ("NWC", "WIO", "NWC")

# (lhs, rhs, padding, lhs_dilation, dimension_numbers): each gave garbage from
# lax.conv_general_dilated on the CPU with jax 0.10.2 (up to 1e35 where zeros
# belong), the lhs-dilated ones aside.
CASES = [
    ((1, 16, 8), (1, 8, 8), [(-1, 1)], None, NWC),
    ((1, 15, 6, 8), (1, 1, 8, 8), [(0, 0), (-5, 1)], None, NHWC),  # the XLA issue's own
    ((2, 15, 6, 4), (3, 3, 4, 4), [(-2, 2), (0, 0)], None, NHWC),
    # Two output features and 2^24 multiply-adds or more: "auto" runs it on XLA.
    ((2, 256, 256, 8), (3, 3, 8, 2), [(-1, 1), (-1, 1)], None, NHWC),
    # lhs dilation: the crop starts between two elements (its zeros become padding).
    ((2, 9, 7, 4), (3, 3, 4, 4), [(-3, 1), (-2, -1)], (2, 3), NHWC),
    # Nothing real left along H (dilated positions 0 and 3, crop keeps 1..1): zeros.
    ((2, 2, 5, 3), (1, 2, 3, 2), [(-1, -2), (1, -1)], (3, 1), NHWC),
]


@pytest.mark.parametrize("backend", ["auto", "ffi", "portable", "xla"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_negative_padding(case, backend):
  lhs_shape, rhs_shape, padding, lhs_dilation, dn = CASES[case]
  nd = len(padding)
  lhs, rhs = random(lhs_shape, np.float32, case), random(rhs_shape, np.float32, case + 1)
  kw = dict(lhs_dilation=lhs_dilation, dimension_numbers=dn)

  def cks(l, r):
    return cks_jax.conv_general_dilated(l, r, (1,) * nd, padding, backend=backend, **kw)

  def ref(l, r):
    return direct_conv(l, r, (1,) * nd, padding, **kw)

  out, cks_vjp = jax.vjp(cks, lhs, rhs)
  want, ref_vjp = jax.vjp(ref, lhs, rhs)
  ct = random(want.shape, np.float32, case + 2)
  where = f"case {case}, backend {backend}"
  assert_close(out, want, np.float32, f"{where}: value")
  for name, g, r in zip(("d lhs", "d rhs"), cks_vjp(ct), ref_vjp(ct)):
    assert_close(g, r, np.float32, f"{where}: {name}")


def test_auto_runs_the_narrow_case_on_xla():
  """The narrow case above reaches XLA's convolution through "auto" (a rule
  of backends.cpu_alternative): so the crop is tested on that route too. If
  the rules change, pick another case that "auto" hands to XLA."""
  lhs_shape, rhs_shape, padding, _, dn = CASES[3]
  e = cks_jax.explain(lhs_shape, rhs_shape, (1, 1), padding, dimension_numbers=dn)
  assert e.backend == "xla", e
  assert "negative padding as a slice" in e.reason, e.reason


def _padded(x, a, lo, hi):
  """x dilated by a, then padded by (lo, hi) (negative: cropped), in numpy."""
  d = np.zeros(shapes.dilate_dim(len(x), a))
  d[::a] = x
  d = d[-lo:] if lo < 0 else np.concatenate([np.zeros(lo), d])
  return d[:len(d) + hi] if hi < 0 else np.concatenate([d, np.zeros(hi)])


def test_cropped_window_is_the_same_padded_input():
  """Every (size, dilation, lo, hi) lax accepts, sizes 1-6: the slice with its
  non-negative padding is the same dilated, padded dimension, or None exactly
  where no element survives."""
  for size, a in itertools.product(range(1, 7), range(1, 5)):
    n = shapes.dilate_dim(size, a)
    for lo, hi in itertools.product(range(-n - 1, 4), repeat=2):
      if n + lo + hi < 0:
        continue
      x = np.arange(1.0, size + 1)
      want = _padded(x, a, lo, hi)
      got = shapes.cropped_window(size, a, lo, hi)
      if got is None:
        assert not want.any(), (size, a, lo, hi)
        continue
      start, stop, lo2, hi2 = got
      assert 0 <= start < stop <= size and lo2 >= 0 and hi2 >= 0, (size, a, lo, hi, got)
      np.testing.assert_array_equal(_padded(x[start:stop], a, lo2, hi2), want,
                                    err_msg=str((size, a, lo, hi, got)))
