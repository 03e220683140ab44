"""DCGAN generator training step (the CPU performance issue's workload), cks-jax vs XLA.

N16, latent 100 (1x1) -> ConvTranspose k4 s1 p0 -> 4x4x256 -> k4 s2 p1 -> 8x8x128 -> 16x16x64
-> 32x32x32 -> 64x64x3; ReLU between, tanh last, no bias, MSE loss, SGD; jitted; fp32, NHWC.
Run: python benchmarks/dcgan_step.py  (prints median step times and the ratio).
"""
import statistics
import time

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


def bench(step, ws, z, y, n=10):
  ws = step(ws, z, y)
  jax.block_until_ready(ws)
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    ws = step(ws, z, y)
    jax.block_until_ready(ws)
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


if __name__ == "__main__":
  ws = init(jax.random.PRNGKey(0))
  z = jnp.asarray(np.random.default_rng(0).standard_normal((16, 1, 1, 100)), jnp.float32)
  y = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (16, 64, 64, 3)), jnp.float32)
  assert generator(cks_jax, ws, z).shape == (16, 64, 64, 3)
  t_cks = bench(make_step(cks_jax), ws, z, y)
  t_xla = bench(make_step(lax), ws, z, y, n=5)
  print(f"DCGAN generator step: cks-jax {t_cks:.1f} ms, XLA {t_xla:.1f} ms, "
        f"speed-up {t_xla / t_cks:.1f}x  ({jax.devices()[0].device_kind})")
