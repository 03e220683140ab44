"""``flax.nnx`` ``Conv`` and ``ConvTranspose`` on cks-jax's C-K-S kernels.

Drop-in replacements: same constructor arguments, defaults, parameter names
(``kernel``, ``bias``) and shapes as ``flax.nnx.Conv`` /
``flax.nnx.ConvTranspose``, so an nnx state saved from Flax's layers loads
unchanged::

    from cks_jax.flax import nnx as cnnx
    layer = cnnx.ConvTranspose(128, 64, (4, 4), strides=(2, 2), rngs=nnx.Rngs(0))
"""
from __future__ import annotations

import inspect

try:
  import flax.nnx as _nnx
except ImportError as e:  # pragma: no cover
  raise ImportError("cks_jax.flax needs flax with flax.nnx: pip install 'cks-jax[flax]'") from e

import cks_jax
from cks_jax.flax._rebind import rebind_lax

__all__ = ["Conv", "ConvTranspose"]


class Conv(_nnx.Conv):
  """``flax.nnx.Conv`` whose convolution defaults to ``cks_jax.conv_general_dilated``.

  Same arguments as ``flax.nnx.Conv``; only the default of
  ``conv_general_dilated`` differs (pass ``jax.lax.conv_general_dilated`` to get
  Flax's behaviour back).
  """

  def __init__(self, *args, conv_general_dilated=cks_jax.conv_general_dilated, **kwargs):
    super().__init__(*args, conv_general_dilated=conv_general_dilated, **kwargs)


def _with_cks_default(init, fn):
  """Flax's ``__init__`` signature with the ``conv_general_dilated`` default set to ``fn``."""
  sig = inspect.signature(init)
  params = [p.replace(default=fn) if p.name == "conv_general_dilated" else p
            for p in sig.parameters.values()]
  return sig.replace(parameters=params)


Conv.__init__.__signature__ = _with_cks_default(_nnx.Conv.__init__,
                                                cks_jax.conv_general_dilated)


class ConvTranspose(_nnx.ConvTranspose):
  """``flax.nnx.ConvTranspose`` whose convolution is ``cks_jax.conv_transpose``.

  Same arguments as ``flax.nnx.ConvTranspose``. Flax offers no hook for the
  transposed convolution, so ``__call__`` is Flax's own code run with
  ``lax.conv_transpose`` resolved to ``cks_jax.conv_transpose`` (see
  ``cks_jax/flax/_rebind.py`` for why).
  """

  __call__ = rebind_lax(_nnx.ConvTranspose.__call__, "flax.nnx.ConvTranspose.__call__")
