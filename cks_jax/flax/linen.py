"""``flax.linen`` ``Conv`` and ``ConvTranspose`` on cks-jax's C-K-S kernels.

Drop-in replacements: same attributes, defaults, parameter names
(``'kernel'``, ``'bias'``) and shapes as ``flax.linen.Conv`` /
``flax.linen.ConvTranspose``, so the params of a Flax model load unchanged::

    import cks_jax.flax.linen as cnn     # instead of flax.linen's Conv layers
    y = cnn.ConvTranspose(64, (4, 4), strides=(2, 2)).apply(params, x)
"""
from __future__ import annotations

from typing import Any

try:
  import flax.linen as _nn
except ImportError as e:  # pragma: no cover
  raise ImportError("cks_jax.flax needs flax with flax.linen: pip install 'cks-jax[flax]'") from e

import cks_jax
from cks_jax.flax._rebind import rebind_lax

__all__ = ["Conv", "ConvTranspose"]


class Conv(_nn.Conv):
  """``flax.linen.Conv`` whose convolution is ``cks_jax.conv_general_dilated``.

  Uses Flax's own hook: only the default of the ``conv_general_dilated``
  attribute changes (``conv_general_dilated_cls``, if given, still wins).
  Padding ``'CIRCULAR'``, ``'REFLECT'`` and ``'CAUSAL'`` pad the input with
  ``jnp.pad`` (as Flax does) and then run a ``'VALID'`` cks convolution.
  """

  conv_general_dilated: Any = cks_jax.conv_general_dilated


class ConvTranspose(_nn.ConvTranspose):
  """``flax.linen.ConvTranspose`` whose convolution is ``cks_jax.conv_transpose``.

  Flax offers no hook for the transposed convolution, so ``__call__`` is
  Flax's own code run with ``lax.conv_transpose`` resolved to
  ``cks_jax.conv_transpose`` (see ``cks_jax/flax/_rebind.py`` for why this
  beats copying the method or patching Flax).
  """

  __call__ = rebind_lax(_nn.ConvTranspose.__call__, "flax.linen.ConvTranspose.__call__")
