"""DCGAN generator training step (the CPU performance issue's workload): cks-jax, XLA, PyTorch.

N16, latent 100 (1x1) -> ConvTranspose k4 s1 p0 -> 4x4x256 -> k4 s2 p1 -> 8x8x128 -> 16x16x64
-> 32x32x32 -> 64x64x3; ReLU between, tanh last, no bias, MSE loss, SGD; jitted; fp32, NHWC.
cks-jax and XLA steps alternate within each timed round. PyTorch (if installed) runs the same
model from the same weights, channels-last, with ConvTranspose2d, timed after them (its OpenMP
threads would spin into the next JAX step); its first loss is checked against cks-jax's first.
On a GPU, PyTorch runs there too, and the steps of backend="ffi" (the CUDA kernel) and
"portable" are timed beside "auto" (cks) and XLA.
Run: python benchmarks/dcgan_step.py  (prints median step times and the ratios).
"""
import functools
import statistics
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import cks_jax

DN = ("NHWC", "HWIO", "NHWC")
CH = [100, 256, 128, 64, 32, 3]


def init(key):
  ks = jax.random.split(key, len(CH) - 1)
  return [jax.random.normal(k, (4, 4, ci, co), jnp.float32) * 0.02
          for k, ci, co in zip(ks, CH[:-1], CH[1:])]


def generator(mod, ws, z):
  h = z
  for i, w in enumerate(ws):
    if i == 0:   # k4 s1 p0 from 1x1: padding 3 on each side, no dilation
      h = mod.conv_general_dilated(h, w, (1, 1), [(3, 3), (3, 3)], dimension_numbers=DN)
    else:        # k4 s2 p1 transposed: lhs dilation 2, padding k-1-p = 2
      h = mod.conv_general_dilated(h, w, (1, 1), [(2, 2), (2, 2)], (2, 2), dimension_numbers=DN)
    h = jnp.tanh(h) if i == len(ws) - 1 else jax.nn.relu(h)
  return h


def make_step(mod):
  def loss(ws, z, y):
    return jnp.mean((generator(mod, ws, z) - y) ** 2)

  @jax.jit
  def step(ws, z, y):
    g = jax.grad(loss)(ws, z, y)
    return [w - 0.01 * gw for w, gw in zip(ws, g)]
  return step


def bench(steps, ws, z, y, n=10):
  """Median ms per step of each of ``steps`` (name -> jitted step), called in
  turn within each of ``n`` rounds: a change in the machine's load then moves
  every column alike, not the ratios between them."""
  state = {k: jax.block_until_ready(f(ws, z, y)) for k, f in steps.items()}
  times = {k: [] for k in steps}
  for _ in range(n):
    for k, f in steps.items():
      t0 = time.perf_counter()
      state[k] = jax.block_until_ready(f(state[k], z, y))
      times[k].append(time.perf_counter() - t0)
  return {k: 1e3 * statistics.median(t) for k, t in times.items()}


def torch_step(ws, z, y):
  """The same step in PyTorch (channels-last), or None without torch: on the GPU
  when jax runs on one and torch sees CUDA, else on the CPU.

  Returns (step, first_loss): ``step()`` runs forward, backward and the SGD
  update in place (and waits for the GPU). The first loss is computed in full
  float32 (no TF32) for the equivalence check; the timed steps run with
  PyTorch's defaults, as its users do.
  """
  try:
    import torch
  except ImportError:
    return None
  import os
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  cuda = jax.default_backend() == "gpu" and torch.cuda.is_available()
  dev = "cuda" if cuda else "cpu"
  # lax's lhs-dilated conv with kernel w (HWIO) is conv_transpose with the
  # kernel flipped, as [I, O, H, W].
  tw = [torch.tensor(np.ascontiguousarray(np.flip(np.asarray(w), (0, 1)).transpose(2, 3, 0, 1)),
                     device=dev, requires_grad=True) for w in ws]
  tz = torch.tensor(np.asarray(z).transpose(0, 3, 1, 2), device=dev).contiguous(
      memory_format=torch.channels_last)
  ty = torch.tensor(np.asarray(y).transpose(0, 3, 1, 2), device=dev).contiguous(
      memory_format=torch.channels_last)
  F = torch.nn.functional

  def loss():
    h = tz
    for i, w in enumerate(tw):
      h = F.conv_transpose2d(h, w, stride=1 if i == 0 else 2, padding=0 if i == 0 else 1)
      h = torch.tanh(h) if i == len(tw) - 1 else torch.relu(h)
    return torch.mean((h - ty) ** 2)

  def step():
    val = loss()
    grads = torch.autograd.grad(val, tw)
    with torch.no_grad():
      for w, g in zip(tw, grads):
        w -= 0.01 * g
    if cuda:
      torch.cuda.synchronize()
    return val

  with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
    first = float(loss())
  return step, first


def bench_torch(step, n=10):
  step()
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


if __name__ == "__main__":
  ws = init(jax.random.PRNGKey(0))
  z = jnp.asarray(np.random.default_rng(0).standard_normal((16, 1, 1, 100)), jnp.float32)
  y = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (16, 64, 64, 3)), jnp.float32)
  assert generator(cks_jax, ws, z).shape == (16, 64, 64, 3)
  steps = {"cks": make_step(cks_jax), "xla": make_step(lax)}
  if jax.default_backend() != "cpu":  # the kernel and the lax-ops decomposition, both
    for b in ("ffi", "portable"):
      steps[b] = make_step(types.SimpleNamespace(conv_general_dilated=functools.partial(
          cks_jax.conv_general_dilated, backend=b)))
  t = bench(steps, ws, z, y)
  t_cks, t_xla = t["cks"], t["xla"]
  line = (f"DCGAN generator step: cks-jax {t_cks:.1f} ms, XLA {t_xla:.1f} ms "
          f"(cks {t_xla / t_cks:.1f}x XLA)")
  tstep = torch_step(ws, z, y)
  if tstep is not None:
    jax_loss = float(jnp.mean((generator(cks_jax, ws, z) - y) ** 2))
    assert abs(tstep[1] - jax_loss) <= 1e-4 * abs(jax_loss), (tstep[1], jax_loss)
    t_torch = bench_torch(tstep[0])
    line += f", PyTorch {t_torch:.1f} ms (cks {t_torch / t_cks:.2f}x PyTorch)"
  others = [k for k in t if k not in ("cks", "xla")]
  if others:
    line += "; " + ", ".join(f"backend={k} {t[k]:.1f} ms" for k in others)
  print(line + f"  ({jax.devices()[0].device_kind}, {len(__import__('os').sched_getaffinity(0))} cores)")
