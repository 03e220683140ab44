"""Flax layers whose convolutions run on cks-jax's C-K-S kernels.

``cks_jax.flax.linen`` and ``cks_jax.flax.nnx`` provide ``Conv`` and
``ConvTranspose``: subclasses of Flax's own layers with the same constructor
arguments, defaults, parameter names and shapes, so a Flax checkpoint loads
unchanged. Only the convolution call differs: ``cks_jax.conv_general_dilated``
and ``cks_jax.conv_transpose`` replace their ``jax.lax`` namesakes, in the
forward pass and in every gradient.

Requires ``flax`` (``pip install "cks-jax[flax]"``). The submodules are
imported lazily, so ``cks_jax.flax.linen`` does not need ``flax.nnx``.
"""
from __future__ import annotations

import importlib

__all__ = ["linen", "nnx"]


def __getattr__(name):
  if name in __all__:
    module = importlib.import_module(f"{__name__}.{name}")
    globals()[name] = module
    return module
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + __all__)
