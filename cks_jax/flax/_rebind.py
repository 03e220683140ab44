"""Runs a Flax method with ``lax.conv_transpose`` routed to cks-jax.

Flax's ``ConvTranspose`` (linen and nnx) calls ``lax.conv_transpose`` directly
and offers no hook for it (unlike ``Conv``, whose ``conv_general_dilated``
argument we simply set). We do not copy its ~100-line ``__call__`` (batch-dim
flattening, mask, dtype promotion, the CIRCULAR wrap-around): a copy would
silently drift from upstream fixes. We also do not monkey-patch ``flax``'s
module-level ``lax`` (that would change ``flax.linen.ConvTranspose`` itself,
and is not thread-safe). Instead we build a second function object from the
*same code* as Flax's ``__call__`` whose globals see, under the name ``lax``,
a read-only view of ``jax.lax`` in which ``conv_transpose`` (and
``conv_general_dilated``) are cks-jax's. Flax's ``ConvTranspose`` is
untouched; only our subclass runs the rebound copy. ``rebind_lax`` checks that
the function really reads ``lax.conv_transpose`` from a global ``lax`` that is
``jax.lax``, so a future Flax refactor fails loudly at import instead of
falling back to XLA's convolution unnoticed.
"""
from __future__ import annotations

import inspect
import types

from jax import lax

import cks_jax


class _CksLax:
  """``jax.lax`` with its convolutions replaced by cks-jax's."""

  conv_general_dilated = staticmethod(cks_jax.conv_general_dilated)
  conv_transpose = staticmethod(cks_jax.conv_transpose)
  conv = staticmethod(cks_jax.conv)
  conv_with_general_padding = staticmethod(cks_jax.conv_with_general_padding)

  def __getattr__(self, name):
    return getattr(lax, name)

  def __repr__(self):
    return "<jax.lax with cks_jax convolutions>"


CKS_LAX = _CksLax()


def rebind_lax(fn, owner: str):
  """Returns a copy of ``fn`` (unwrapped) whose global ``lax`` is ``CKS_LAX``.

  Args:
    fn: the Flax method, e.g. ``flax.linen.ConvTranspose.__call__``.
    owner: a name for error messages.
  """
  fn = inspect.unwrap(fn)
  code = fn.__code__
  if (fn.__globals__.get("lax") is not lax or "lax" not in code.co_names
      or "conv_transpose" not in code.co_names):
    import flax  # pylint: disable=import-outside-toplevel
    raise ImportError(
        f"cks_jax.flax cannot route {owner} to cks_jax.conv_transpose: the installed flax "
        f"{flax.__version__} no longer calls the module-level `lax.conv_transpose` there. "
        "Please report this to cks-jax together with your flax version.")
  globals_ = dict(fn.__globals__)
  globals_["lax"] = CKS_LAX
  new = types.FunctionType(code, globals_, fn.__name__, fn.__defaults__, fn.__closure__)
  new.__kwdefaults__ = fn.__kwdefaults__
  new.__dict__.update(fn.__dict__)  # keeps e.g. linen's `compact` marker
  new.__doc__ = fn.__doc__
  new.__qualname__ = fn.__qualname__
  new.__module__ = fn.__module__
  new.__annotations__ = dict(getattr(fn, "__annotations__", {}))
  return new
