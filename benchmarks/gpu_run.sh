#!/usr/bin/env bash
# The GPU checks in one call on a machine with an NVIDIA GPU, jax[cuda] and
# PyTorch (the device machine of benchmarks/results/gpu_h200*): install, a
# smoke check of the CUDA kernel, the GPU tests, the benchmarks. Logs and
# results under $OUT.
#   bash benchmarks/gpu_run.sh     (installs a wheel from .whl/, else builds from source)
# The wheel: built beforehand from the same commit for the GPU machine's Python (3.12 on the
# device machine of 2026-12), e.g. in a Python 3.12 venv with jax/jaxlib of the GPU machine's
# version, nanobind and scikit-build-core:
#   pip wheel --no-build-isolation --no-deps -w .whl .    (.whl/ ignored by git)
# This tree's Python files are copied over the wheel's, its compiled libraries are not.
# Knobs (environment): CKS_TESTS=0 skips the tests; CKS_TEST_S / CKS_TEST2_S,
# CKS_BENCH_S, CKS_BENCH16_S cap each stage's seconds; CKS_BENCH_ARGS and
# CKS_BENCH16_ARGS are extra `cks-jax bench` arguments (bfloat16: --quick by
# default); CKS_BENCH_NAME names the float32 results; CKS_BENCH16=0 skips bfloat16.
set -u
OUT=${OUT:-/tmp/cks_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python3}
SITE=/tmp/cks_site
t0=$(date +%s)
stage() { echo "== $(( $(date +%s) - t0 ))s $*"; }

stage machine
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"
  nproc; } 2>&1 | tee "$OUT/machine.txt"

# From /tmp: python's first path entry, the current directory, would put the
# source tree's cks_jax (no compiled extension) before the installed one.
smoke() {
  (cd /tmp && PYTHONPATH=$SITE $PY - <<'PYEOF'
import jax, numpy as np
from jax import lax
import cks_jax
from cks_jax._src import cuda
print("library", cuda.available(), "platforms", cks_jax.kernel_platforms())
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 9, 9, 4), np.float32); w = rng.standard_normal((3, 3, 4, 6), np.float32)
kw = dict(window_strides=(1, 1), padding=[(2, 2), (2, 2)], lhs_dilation=(2, 2),
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
f = lambda x, w: cks_jax.conv_general_dilated(x, w, backend="ffi", **kw)
assert "cks_conv_cuda" in jax.jit(f).lower(x, w).compile().as_text()
ref = lax.conv_general_dilated(x.astype(np.float64), w.astype(np.float64), **kw) \
    if jax.config.jax_enable_x64 else lax.conv_general_dilated(x, w, precision="highest", **kw)
err = float(np.max(np.abs(np.asarray(f(x, w)) - np.asarray(ref))))
print("smoke max error", err)
assert err < 1e-4
PYEOF
  )
}

stage install
rm -rf "$SITE"
if ls .whl/cks_jax-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/cks_jax-*.whl
  cp -r cks_jax/. "$SITE/cks_jax/"  # this tree's Python over the wheel's
fi
set -o pipefail
if ! smoke 2>&1 | tee "$OUT/smoke.txt"; then
  stage "build from source"
  rm -rf "$SITE"
  $PY -m pip install -q --no-build-isolation --no-deps --target "$SITE" . 2>&1 | tail -20
  smoke 2>&1 | tee "$OUT/smoke.txt" || { echo "smoke check failed"; exit 1; }
fi
export PYTHONPATH=$SITE

if [ "${CKS_TESTS:-1}" = 1 ]; then
stage tests
# -v: each test's outcome is logged as it ends, so a run cut by its timeout
# still names its failures. lax's float32 reference in full float32 (XLA may
# use TF32 on the GPU otherwise). The value tests run on the CUDA kernel
# (CKS_TEST_BACKEND=ffi: "auto" does not choose it); the routing and explain
# tests pin themselves to the CPU (tests/conftest.py, on_cpu).
PER_TEST=""  # pytest-timeout, where installed: a hung test fails alone
$PY -c "import pytest_timeout" 2>/dev/null && PER_TEST="--timeout 120"
gpu_pytest() {  # log name, timeout, pytest arguments
  local log=$1 secs=$2; shift 2
  (cd tests && JAX_DEFAULT_MATMUL_PRECISION=highest timeout "$secs" $PY -m pytest -n 12 -v \
    -p no:cacheprovider $PER_TEST -rfEs --tb=short "$@" > "$OUT/$log" 2>&1)
  echo "pytest $log rc=$?"; grep -E " (FAILED|ERROR) " "$OUT/$log" | head -20; tail -1 "$OUT/$log"
}
CKS_TEST_BACKEND=ffi gpu_pytest tests_kernel.log "${CKS_TEST_S:-200}" test_cuda.py test_conv.py \
  test_transforms.py test_dtypes.py test_flax.py -k "not harness"
gpu_pytest tests_routing.log "${CKS_TEST2_S:-120}" test_edge.py test_explain.py test_hlo.py \
  test_backends.py
fi

stage "bench float32"
REPO=$PWD
cd /tmp
NAME=${CKS_BENCH_NAME:-gpu_h200}
timeout ${CKS_BENCH_S:-190} $PY -m cks_jax bench --min-time 0.03 ${CKS_BENCH_ARGS:-} \
  --json "$OUT/$NAME.json" --plot "$OUT/$NAME.png" > "$OUT/bench.txt" 2>&1
echo "bench rc=$?"; tail -25 "$OUT/bench.txt"

stage dcgan
timeout 60 $PY "$REPO/benchmarks/dcgan_step.py" 2>&1 | tee "$OUT/dcgan.txt"

[ "${CKS_BENCH16:-1}" = 1 ] || { stage done; exit 0; }
stage "bench bfloat16"
timeout ${CKS_BENCH16_S:-120} $PY -m cks_jax bench --dtype bfloat16 ${CKS_BENCH16_ARGS:---quick} \
  --min-time 0.03 --json "$OUT/gpu_h200_bf16.json" --plot "$OUT/gpu_h200_bf16.png" > "$OUT/bench_bf16.txt" 2>&1
echo "bench rc=$?"; tail -12 "$OUT/bench_bf16.txt"
stage done
