"""C-K-S index geometry of one spatial dimension, in Python.

A mirror of ``ffi/include/cks/geometry.h``, which is the reference: same
formulas, same field names (``tests/test_portable.py`` checks that both give
identical phases and segments). Used by the portable backend to build its
dense sub-problems at trace time.

An output o and a filter tap k meet input element i when
``o*s + k*d - lo == i*a`` (window stride s, lhs dilation a, rhs dilation d,
low padding lo). Outputs split into residue classes (phases); inside a phase
the taps form a sub-kernel ``k = k0 + kstep*t`` and the input index is affine:
``o = o0 + L*u``, ``i = base + ustride*u + tstride*t``.
"""
from __future__ import annotations

from math import gcd
from typing import NamedTuple


class Dim(NamedTuple):
  in_size: int   # N: undilated input length
  k_size: int    # K: undilated filter length
  out_size: int  # O
  stride: int    # s
  lhs_dil: int   # a
  rhs_dil: int   # d
  pad_lo: int    # lo (may be negative)


class Phase(NamedTuple):
  o0: int
  L: int
  U: int
  k0: int
  kstep: int
  T: int
  base: int
  ustride: int
  tstride: int


class Segment(NamedTuple):
  phase: int
  u0: int
  count: int
  t_lo: int
  t_hi: int


def _ceil_div(x: int, y: int) -> int:
  return -(-x // y)


def trimmed_range(p: Phase, in_size: int, u: int) -> tuple[int, int]:
  """The taps ``[t_lo, t_hi)`` of output u of phase p that read a real input."""
  x = p.base + p.ustride * u
  lo = max(0, _ceil_div(-x, p.tstride))
  hi = min(p.T, (in_size - 1 - x) // p.tstride + 1)
  return (0, 0) if hi <= lo else (lo, hi)


def phases(dm: Dim) -> list[Phase]:
  """K split (P phases by lhs dilation) times S split (Q sub-images by rhs dilation)."""
  s, a, d, lo = dm.stride, dm.lhs_dil, dm.rhs_dil, dm.pad_lo
  g_as = gcd(a, s)
  P, s1 = a // g_as, s // g_as
  g_ad = gcd(a, d)
  kstep, d1 = a // g_ad, d // g_ad
  h = gcd(s1, d1)
  Q, s2 = d1 // h, s1 // h
  out = []
  # Bounded by the sizes, not by a: huge dilations stay O(out_size * k_size).
  for phi in range(min(P, dm.out_size)):
    k0 = next((k for k in range(min(kstep, dm.k_size)) if (phi * s + k * d - lo) % a == 0), -1)
    T = 0 if (k0 < 0 or k0 >= dm.k_size) else _ceil_div(dm.k_size - k0, kstep)
    off = (phi * s + k0 * d - lo) // a if T > 0 else 0  # exact division
    for q in range(min(Q, _ceil_div(dm.out_size - phi, P))):
      o0, L = phi + P * q, P * Q
      out.append(Phase(o0, L, _ceil_div(dm.out_size - o0, L), k0 if T > 0 else 0, kstep, T,
                       off + q * s1, d1 * s2, d1))
  return out


def segments(dm: Dim, ph: list[Phase]) -> list[Segment]:
  """Runs of consecutive outputs of one phase sharing one trimmed tap range."""
  out: list[Segment] = []
  for pi, p in enumerate(ph):
    for u in range(p.U):
      t_lo, t_hi = trimmed_range(p, dm.in_size, u)
      if out and out[-1].phase == pi and out[-1][3:] == (t_lo, t_hi) and \
          out[-1].u0 + out[-1].count == u:
        out[-1] = out[-1]._replace(count=out[-1].count + 1)
      else:
        out.append(Segment(pi, u, 1, t_lo, t_hi))
  return out
