"""Routing: every convolution of a training step, forward and backward, is a cks custom call,
and "auto" on the CPU routes narrow outputs as explain says. All on the CPU (on_cpu), also
where the default backend is a GPU."""
import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import cks_jax
from oracle import assert_close, random

pytestmark = pytest.mark.usefixtures("on_cpu")

DN = ("NHWC", "HWIO", "NHWC")


def init(seed):
  w = lambda shape, k: random(shape, jnp.float32, seed + k, scale=0.2)
  return {
      "down": w((4, 4, 3, 8), 0),     # strided conv
      "atrous": w((3, 3, 8, 8), 1),   # dilated conv
      "up": w((4, 4, 8, 4), 2),       # transposed conv
      "grouped": w((3, 3, 2, 4), 3),  # grouped conv
  }


def net(p, x):
  h = jax.nn.relu(cks_jax.conv_general_dilated(x, p["down"], (2, 2), "SAME",
                                               dimension_numbers=DN))
  h = jax.nn.relu(cks_jax.conv_general_dilated(h, p["atrous"], (1, 1), "SAME",
                                               rhs_dilation=(2, 2), dimension_numbers=DN))
  h = jax.nn.relu(cks_jax.conv_transpose(h, p["up"], (2, 2), "SAME", dimension_numbers=DN))
  return cks_jax.conv_general_dilated(h, p["grouped"], (1, 1), "SAME", dimension_numbers=DN,
                                      feature_group_count=2)


def loss(p, x):
  return jnp.mean((net(p, x) - x[..., :1]) ** 2)


def compiled_hlo(fn, *args):
  return jax.jit(fn).lower(*args).compile().as_text()


def assert_no_xla_convolution(hlo):
  assert not re.search(r"=\s*\S+\s+convolution\(", hlo), "an XLA convolution survived"


def test_training_step_has_no_xla_convolution():
  # backend "ffi": the kernel covers every convolution ("auto" sends the
  # 2-feature grouped layer to XLA, tested below).
  p, x = init(0), jnp.ones((2, 16, 16, 3), jnp.float32)
  with cks_jax.use_backend("ffi"):
    hlo = compiled_hlo(jax.grad(loss), p, x)
  assert_no_xla_convolution(hlo)
  calls = re.findall(r'custom_call_target="cks_conv_cpu"', hlo)
  # 4 forward convolutions + d lhs of the last 3 + d rhs of all 4.
  assert len(calls) >= 4 + 3 + 4, f"expected >= 11 cks calls, got {len(calls)}"


@pytest.mark.parametrize("groups", [1, 2])
def test_input_gradient_reads_the_flipped_kernel_in_place(groups):
  # d lhs convolves with the spatially flipped kernel: the CPU kernel reads it flipped
  # (rhs_reversed, negative tap strides) instead of XLA reversing a copy on every step; the
  # XLA and portable lowerings flip it with a reverse. The values and both gradients of the
  # flipped read, second order included, are the flip's (test_transforms, test_fuzz).
  x = random((2, 9, 8, 4), jnp.float32, 0)
  w = random((3, 4, 4 // groups, 6), jnp.float32, 1)
  ct = random((2, 5, 4, 6), jnp.float32, 2)

  def dlhs(backend):  # w an argument, so XLA cannot fold its reverse away
    f = lambda x, w: cks_jax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=DN,
                                                  feature_group_count=groups, backend=backend)
    return lambda x, w, ct: jax.vjp(lambda x: f(x, w), x)[1](ct)[0]

  hlo = compiled_hlo(dlhs("ffi"), x, w, ct)
  assert "cks_conv_cpu" in hlo and not re.search(r"\breverse\(", hlo), hlo
  ref = jax.vjp(lambda x: jax.lax.conv_general_dilated(
      x, w, (2, 2), "SAME", dimension_numbers=DN, feature_group_count=groups), x)[1](ct)[0]
  for backend in ("ffi", "portable", "xla"):
    if backend != "ffi":
      assert re.search(r"\breverse\(", compiled_hlo(dlhs(backend), x, w, ct)), backend
    assert_close(jax.jit(dlhs(backend))(x, w, ct), ref, jnp.float32, f"d lhs {backend}")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_cpu_kernel_runs_16bit_operands_widened(dtype):
  # 16-bit operands reach the CPU kernel as they are, forward and both gradients, with no
  # converts around it (it makes its float32 copies itself, in parallel: conv_cpu.cc RunConv),
  # and the results come back in the 16-bit dtype.
  x, w = jnp.ones((2, 8, 8, 16), dtype), jnp.ones((3, 3, 16, 8), dtype)
  f = lambda x, w: jnp.sum(cks_jax.conv_transpose(x, w, (2, 2), "SAME", dimension_numbers=DN))
  with cks_jax.use_backend("ffi"):
    hlo = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(x, w).as_text()
  calls = re.findall(r"@cks_conv_cpu\(.*\}\s*:\s*\(([^)]*)\)\s*->\s*(\S+)", hlo)
  assert len(calls) == 3, hlo
  short = {jnp.bfloat16: "xbf16>", jnp.float16: "xf16>"}[dtype]
  for operands, result in calls:
    assert operands.count(short) == 2 and result.endswith(short), (operands, result)
  val, (gx, gw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, w)
  assert val.dtype == gx.dtype == gw.dtype == dtype
  e = cks_jax.explain(x, w, (1, 1), "SAME", dimension_numbers=DN, platform="cpu", backend="ffi")
  assert "widened to float32" in e.reason


def test_training_step_learns():
  p = init(0)
  x = random((2, 16, 16, 3), jnp.float32, 10)
  step = jax.jit(lambda p: jax.tree.map(lambda w, g: w - 0.2 * g, p, jax.grad(loss)(p, x)))
  l0 = float(loss(p, x))
  for _ in range(60):
    p = step(p)
  assert float(loss(p, x)) < 0.8 * l0


def test_other_platforms_lower_without_cks_custom_calls():
  # No cks kernel for TPU: the op lowers (cross-lowering works on a CPU
  # machine) to the portable decomposition or XLA's own convolution, and
  # explain says which.
  p, x = init(0), jnp.ones((2, 16, 16, 3), jnp.float32)
  text = jax.jit(jax.grad(loss)).trace(p, x).lower(lowering_platforms=("tpu",)).as_text()
  assert "stablehlo.convolution" in text and "cks_conv_cpu" not in text
  e = cks_jax.explain((2, 16, 16, 3), (4, 4, 3, 8), (2, 2), "SAME", dimension_numbers=DN,
                      platform="tpu")
  assert e.backend == "xla" and "no cks kernel" in e.reason


@pytest.mark.parametrize("isa", [2, 1])
@pytest.mark.parametrize("cin", [32, 28])
def test_auto_on_cpu_routes_narrow_outputs(cin, isa, monkeypatch):
  # A 1-feature transposed convolution (FSRCNN's last layer; above
  # CPU_MIN_MACS). The float32 forward stays on the kernel's dot path (cin >= 16
  # contiguous channels) whatever the instruction set. With AVX-512 (isa 2) the
  # filter gradient stays on the kernel's narrow path when its batch (the cin
  # input channels, contiguous in NHWC) fills a strip of 32 floats, else goes
  # to the portable path; with AVX2 only (isa 1) it stays there only where the
  # kernel runs its taps as columns (on x86-64 CPUs with AVX2 or AVX-512).
  # The input gradient (cin features) stays on the kernel. explain and the HLO
  # agree.
  from cks_jax._src import backends
  x, w = jnp.ones((8, 32, 32, cin), jnp.float32), jnp.ones((9, 9, cin, 1), jnp.float32)
  args = ((1, 1), [(4, 6), (4, 6)], (3, 3))
  on_kernel = cks_jax.explain(x, w, *args, dimension_numbers=DN, gradients=True, platform="cpu",
                              backend="ffi")
  cols = dict(on_kernel.gradients)["d rhs"].cpu_path == "narrow, taps as columns"
  monkeypatch.setattr(backends, "cpu_isa", lambda: isa)
  drhs = "cks-cpu" if cin == 32 and (isa == 2 or cols) else "portable"
  f = lambda x, w: cks_jax.conv_general_dilated(x, w, *args, dimension_numbers=DN)
  e = cks_jax.explain(x, w, *args, dimension_numbers=DN, gradients=True, platform="cpu")
  assert e.backend == "cks-cpu" and "dot path" in e.reason, e.reason
  small = cks_jax.explain((1, 8, 8, cin), (9, 9, cin, 1), *args, dimension_numbers=DN,
                          platform="cpu")
  assert small.backend == "cks-cpu"  # below CPU_MIN_MACS
  routes = dict((name, g.backend) for name, g in e.gradients)
  assert routes == {"d lhs": "cks-cpu", "d rhs": drhs}, routes
  rhs_reason = dict(e.gradients)["d rhs"].reason
  if drhs == "cks-cpu":
    assert "narrow" in rhs_reason
  else:
    assert "output features" in rhs_reason and ("AVX2" in rhs_reason) == (isa == 1), rhs_reason
  hlo = compiled_hlo(jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), (0, 1)), x, w)
  kernels = 3 if drhs == "cks-cpu" else 2  # forward, d lhs, and d rhs where on the kernel
  assert len(re.findall(r'custom_call_target="cks_conv_cpu"', hlo)) == kernels
  # Values and gradients are the same either way.
  ref = lambda x, w: lax_conv(x, w, *args)
  rng = np.random.default_rng(0)
  xr, wr = (jnp.asarray(rng.standard_normal(a.shape), jnp.float32) for a in (x, w))
  for a, b in zip(jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), (0, 1))(xr, wr),
                  jax.grad(lambda x, w: jnp.sum(ref(x, w) ** 2), (0, 1))(xr, wr)):
    # Relative to the gradient's scale (8192-term float32 sums of terms up to
    # ~6e4: XLA's own result is 0.17 off a float64 reference there, ours 0.04).
    assert_close(a, b, np.float32, "gradient")


def lax_conv(x, w, *args):
  return jax.lax.conv_general_dilated(x, w, *args, dimension_numbers=DN)


@pytest.mark.parametrize("policy", ["nothing_saveable", "everything_saveable",
                                    "dots_with_no_batch_dims_saveable"])
def test_remat_recomputes_on_the_kernel(policy):
  # jax.checkpoint (Flax's nn.remat) around the network: its gradient recomputes (or saves,
  # as the policy says) the forward, and the recomputation runs on the kernel too.
  p, x = init(0), random((2, 16, 16, 3), jnp.float32, 10)
  remat = jax.checkpoint(loss, policy=getattr(jax.checkpoint_policies, policy))
  with cks_jax.use_backend("ffi"):
    compiled = jax.jit(jax.grad(remat)).lower(p, x).compile()
    hlo, got, want = compiled.as_text(), compiled(p, x), jax.jit(jax.grad(loss))(p, x)
  assert_no_xla_convolution(hlo)
  assert len(re.findall(r'custom_call_target="cks_conv_cpu"', hlo)) >= 4 + 3 + 4
  for k in p:
    assert_close(got[k], want[k], jnp.float32, f"{policy}: d {k}")


def test_scan_over_layers_runs_on_the_kernel():
  # A stack of same-shape dilated layers under lax.scan (Flax's nn.scan), remat
  # inside: every convolution of the loop body, forward and both gradients, is a
  # kernel call, and the gradients are lax's.
  ws = random((5, 3, 3, 8, 8), jnp.float32, 0, scale=0.2)
  x = random((2, 12, 12, 8), jnp.float32, 1)

  def stack(conv):
    def body(h, w):
      return jnp.tanh(conv(h, w, (1, 1), "SAME", rhs_dilation=(2, 2),
                           dimension_numbers=DN)), None
    return lambda ws, x: jnp.sum(jax.lax.scan(jax.checkpoint(body), x, ws)[0] ** 2)

  with cks_jax.use_backend("ffi"):
    compiled = jax.jit(jax.grad(stack(cks_jax.conv_general_dilated), (0, 1))).lower(
        ws, x).compile()
    hlo, got = compiled.as_text(), compiled(ws, x)
  assert_no_xla_convolution(hlo)
  assert "cks_conv_cpu" in hlo
  want = jax.grad(stack(jax.lax.conv_general_dilated), (0, 1))(ws, x)
  assert_close(got[0], want[0], jnp.float32, "d weights")
  assert_close(got[1], want[1], jnp.float32, "d x")
