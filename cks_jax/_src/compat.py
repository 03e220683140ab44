"""The supported jax range, checked at import (keep in sync with pyproject.toml)."""
from __future__ import annotations

import re

MIN_JAX = (0, 10, 0)
TESTED = ("0.10.2", "0.12.0.1", "0.12.1")


def _parse(version: str) -> tuple[int, ...]:
  return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def check_jax_version(version: str | None = None) -> None:
  """Raises ImportError naming the fix if the installed jax is too old."""
  if version is None:
    import jax
    version = jax.__version__
  if _parse(version) < MIN_JAX:
    raise ImportError(
        f"cks_jax needs jax >= {'.'.join(map(str, MIN_JAX))} (tested with {', '.join(TESTED)}), "
        f"found jax {version}; upgrade with `pip install -U jax`")
