"""Test configuration.

- float64 enabled so index errors cannot hide behind rounding.
- Hypothesis profiles: "ci" (default) is derandomized, so every run draws the
  same examples; "long" draws fresh ones (HYPOTHESIS_PROFILE=long). The
  number of examples is CKS_FUZZ_EXAMPLES, or the profile's default.
"""
import os
import sys

# pytest-xdist's workers put the repository root on sys.path, where the source
# tree's cks_jax (without its compiled extension) would shadow the installed one.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

import jax  # noqa: E402
import pytest  # noqa: E402

import cks_jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_enable_x64", True)

_examples = os.environ.get("CKS_FUZZ_EXAMPLES")
_common = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", derandomize=True, max_examples=int(_examples or 120), **_common)
settings.register_profile("long", max_examples=int(_examples or 20000), **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def on_cpu():
  """The test's computations on the CPU whatever the default backend: tests of
  the CPU kernel, or of XLA:CPU's semantics, on a machine with a GPU too."""
  with jax.default_device(jax.devices("cpu")[0]):
    yield


@pytest.fixture(autouse=True)
def _test_backend():
  """CKS_TEST_BACKEND (e.g. ffi) runs the cks calls that name no backend on it:
  benchmarks/gpu_run.sh runs the value tests on the CUDA kernel this way, which
  "auto" does not choose."""
  name = os.environ.get("CKS_TEST_BACKEND")
  if not name:
    yield
    return
  with cks_jax.use_backend(name):
    yield
