"""cks-jax: C-K-S convolutions for JAX.

Drop-in replacements for ``jax.lax``'s convolutions that never multiply the
zeros of padding (ConvV2), of transposed convolutions (KS-deconv) or of
dilated convolutions (Sk-dilated), forward and backward.
"""
__version__ = "0.1.0"

from cks_jax._src.compat import check_jax_version as _check_jax_version

_check_jax_version()

from cks_jax._src.api import (  # noqa: E402
    conv,
    conv_general_dilated,
    conv_transpose,
    conv_with_general_padding,
)
from cks_jax._src.backends import BACKENDS, use_backend  # noqa: E402
from cks_jax._src.explain import Explanation, explain  # noqa: E402
from cks_jax._src.ffi import kernel_platforms, release_cpu_buffers  # noqa: E402

__all__ = [
    "conv",
    "conv_general_dilated",
    "conv_transpose",
    "conv_with_general_padding",
    "explain",
    "Explanation",
    "kernel_platforms",
    "release_cpu_buffers",
    "use_backend",
    "BACKENDS",
]
