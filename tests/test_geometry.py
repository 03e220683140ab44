"""The per-dimension C-K-S decomposition against brute-force enumeration."""
import itertools

import pytest
from hypothesis import given, settings, strategies as st

from cks_jax._src import ffi, geometry, shapes


def brute_force(N, K, O, s, a, d, lo):
  """All (o, k, i) with o*s + k*d - lo == i*a and every index in range."""
  out = set()
  for o in range(O):
    for k in range(K):
      z = o * s + k * d - lo
      if z >= 0 and z % a == 0 and z // a < N:
        out.add((o, k, z // a))
  return out


def from_plan(N, K, O, s, a, d, lo, split=True):
  phases, segments = ffi.extension().geometry_1d(N, K, O, s, a, d, lo, split)
  triples, owner = set(), {}
  for ph, u0, count, t_lo, t_hi in segments:
    o0, L, U, k0, kstep, T, base, ustride, tstride = phases[ph]
    assert 0 <= t_lo <= t_hi <= T
    for u in range(u0, u0 + count):
      o = o0 + L * u
      assert o not in owner, "an output lies in two segments"
      owner[o] = ph
      for t in range(t_lo, t_hi):
        k, i = k0 + kstep * t, base + ustride * u + tstride * t
        assert 0 <= i < N and 0 <= k < K
        assert (o, k, i) not in triples
        triples.add((o, k, i))
  assert sorted(owner) == list(range(O)), "every output belongs to exactly one segment"
  return triples, phases


def out_size(N, K, s, a, d, lo, hi):
  return shapes.stride_dim(shapes.dilate_dim(N, a) + lo + hi, shapes.dilate_dim(K, d), s)


@pytest.mark.parametrize("s,a,d", list(itertools.product([1, 2, 3, 4], repeat=3)))
def test_exhaustive_small(s, a, d):
  for N, K, lo, hi in itertools.product([1, 2, 5, 8], [1, 2, 3, 5], [-3, 0, 1, 4, 7], [-2, 0, 3]):
    O = out_size(N, K, s, a, d, lo, hi)
    for split in (True, False):  # with the S split, and with it left to the reader
      triples, _ = from_plan(N, K, O, s, a, d, lo, split)
      assert triples == brute_force(N, K, O, s, a, d, lo)


@settings(max_examples=300, deadline=None)
@given(N=st.integers(0, 20), K=st.integers(1, 9), s=st.integers(1, 6), a=st.integers(1, 6),
       d=st.integers(1, 6), lo=st.integers(-6, 12), extra=st.integers(-4, 12))
def test_property(N, K, s, a, d, lo, extra):
  # Any output length, including outputs past the natural end.
  O = max(0, out_size(N, K, s, a, d, lo, 0) + extra)
  for split in (True, False):
    triples, _ = from_plan(N, K, O, s, a, d, lo, split)
    assert triples == brute_force(N, K, O, s, a, d, lo)


def test_phase_counts():
  # Stride-2 transposed conv, k4: two phases of two taps each (KS-deconv).
  phases, _ = ffi.extension().geometry_1d(16, 4, 32, 1, 2, 1, 2)
  assert len(phases) == 2 and all(p[5] == 2 for p in phases)
  # Dilation 2, stride 1: two polyphase sub-images x[r::2] (Sk-dilated), each
  # read densely: consecutive outputs and taps step by one sub-image element.
  phases, _ = ffi.extension().geometry_1d(16, 3, 12, 1, 1, 2, 0)
  assert len(phases) == 2 and all(p[5] == 3 and p[7] == p[8] == 2 for p in phases)
  # Without the split: one phase whose taps step by 2 inputs (the same reads).
  phases, _ = ffi.extension().geometry_1d(16, 3, 12, 1, 1, 2, 0, False)
  assert len(phases) == 1 and phases[0][5] == 3 and phases[0][7:] == (1, 2)


@settings(max_examples=200, deadline=None)
@given(N=st.integers(0, 3000), K=st.integers(1, 9), s=st.integers(1, 6), a=st.integers(1, 6),
       d=st.integers(1, 40), lo=st.integers(-60, 200), extra=st.integers(-50, 200),
       split=st.booleans())
def test_long_segments_match_mirror(N, K, s, a, d, lo, extra, split):
  # The header finds each run of equal tap ranges by bisection; the Python
  # mirror walks output by output. Long dimensions, wide borders.
  O = max(0, out_size(N, K, s, a, d, lo, 0) + extra)
  dm = geometry.Dim(N, K, O, s, a, d, lo)
  cpp_phases, cpp_segments = ffi.extension().geometry_1d(N, K, O, s, a, d, lo, split)
  phases = [geometry.Phase(*p) for p in cpp_phases]
  if split:
    assert geometry.phases(dm) == phases
  assert [tuple(g) for g in geometry.segments(dm, phases)] == [tuple(g) for g in cpp_segments]
