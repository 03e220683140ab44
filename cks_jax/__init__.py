"""cks-jax: C-K-S convolutions for JAX.

Drop-in replacements for ``jax.lax``'s convolutions that never multiply the
zeros of padding (ConvV2), of transposed convolutions (KS-deconv) or of
dilated convolutions (Sk-dilated), forward and backward.
"""
from cks_jax._src.api import (
    conv,
    conv_general_dilated,
    conv_transpose,
    conv_with_general_padding,
)
from cks_jax._src.explain import Explanation, explain
from cks_jax._src.ffi import kernel_platforms

__version__ = "0.1.0"

__all__ = [
    "conv",
    "conv_general_dilated",
    "conv_transpose",
    "conv_with_general_padding",
    "explain",
    "Explanation",
    "kernel_platforms",
]
