"""Training-convergence demo: the same models trained on cks-jax and on jax.lax.

Two small models on scikit-learn's bundled digits (8x8, upsampled to 16x16):

- a DCGAN (generator of stride-2 transposed convolutions, discriminator of
  stride-2 convolutions), non-saturating GAN loss, Adam;
- a classifier of dilated convolutions (dilation 1, 2, 4), cross-entropy, Adam.

Each is trained twice from identical seeds and batches, once with every
convolution on ``cks_jax`` and once on ``jax.lax``. The loss curves should
overlap within floating-point noise; the step times give the speed ratio.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import cks_jax

DN = ("NHWC", "HWIO", "NHWC")


def load_digits(size: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """Digits as float32 images in [-1, 1], shape (n, size, size, 1), and labels."""
  from sklearn.datasets import load_digits as _load  # bundled with scikit-learn
  d = _load()
  x = d.images.astype(np.float32) / 16.0 * 2.0 - 1.0
  x = np.asarray(jax.image.resize(jnp.asarray(x)[..., None], (len(x), size, size, 1),
                                  "bilinear"))
  return np.clip(x, -1, 1), d.target.astype(np.int32)


# ---------------------------------------------------------------- models
def _conv(mod: ModuleType):
  return lambda x, w, s, pad, dil=1: mod.conv_general_dilated(
      x, w, (s, s), pad, rhs_dilation=(dil, dil), dimension_numbers=DN)


def _deconv(mod: ModuleType):
  return lambda x, w: mod.conv_transpose(x, w, (2, 2), "SAME", dimension_numbers=DN)


def _he(key, shape, fan_in):
  return jax.random.normal(key, shape, jnp.float32) * float(np.sqrt(2.0 / fan_in))


def gan_init(key, latent: int = 32):
  k = jax.random.split(key, 6)
  g = {"fc": _he(k[0], (latent, 4 * 4 * 64), latent), "d1": _he(k[1], (4, 4, 64, 32), 64 * 4),
       "d2": _he(k[2], (4, 4, 32, 16), 32 * 4), "out": _he(k[3], (3, 3, 16, 1), 16 * 9) * 0.5}
  d = {"c1": _he(k[4], (4, 4, 1, 32), 16), "c2": _he(k[5], (4, 4, 32, 64), 32 * 16),
       "fc": jnp.zeros((4 * 4 * 64, 1), jnp.float32)}
  return {"g": g, "d": d}


def generator(mod, g, z):
  h = jax.nn.relu(z @ g["fc"]).reshape(-1, 4, 4, 64)
  h = jax.nn.relu(_deconv(mod)(h, g["d1"]))        # 4 -> 8
  h = jax.nn.relu(_deconv(mod)(h, g["d2"]))        # 8 -> 16
  return jnp.tanh(_conv(mod)(h, g["out"], 1, "SAME"))


def discriminator(mod, d, x):
  h = jax.nn.leaky_relu(_conv(mod)(x, d["c1"], 2, "SAME"), 0.2)   # 16 -> 8
  h = jax.nn.leaky_relu(_conv(mod)(h, d["c2"], 2, "SAME"), 0.2)   # 8 -> 4
  return (h.reshape(h.shape[0], -1) @ d["fc"])[:, 0]


def gan_losses(mod, params, x, z):
  fake = generator(mod, params["g"], z)
  real_logit = discriminator(mod, params["d"], x)
  fake_logit = discriminator(mod, params["d"], jax.lax.stop_gradient(fake))
  d_loss = jnp.mean(jax.nn.softplus(-real_logit) + jax.nn.softplus(fake_logit))
  g_loss = jnp.mean(jax.nn.softplus(-discriminator(mod, params["d"], fake)))
  return d_loss, g_loss


def dilated_init(key):
  k = jax.random.split(key, 4)
  return {"c1": _he(k[0], (3, 3, 1, 32), 9), "c2": _he(k[1], (3, 3, 32, 32), 288),
          "c3": _he(k[2], (3, 3, 32, 32), 288), "fc": _he(k[3], (32, 10), 32)}


def dilated_logits(mod, p, x):
  h = jax.nn.relu(_conv(mod)(x, p["c1"], 1, "SAME", 1))
  h = jax.nn.relu(_conv(mod)(h, p["c2"], 1, "SAME", 2))
  h = jax.nn.relu(_conv(mod)(h, p["c3"], 1, "SAME", 4))
  return jnp.mean(h, axis=(1, 2)) @ p["fc"]


# ---------------------------------------------------------------- Adam
def adam_init(params):
  zeros = jax.tree.map(jnp.zeros_like, params)
  return {"m": zeros, "v": zeros, "t": jnp.zeros((), jnp.int32)}


def adam_update(params, grads, state, lr, b1=0.5, b2=0.999, eps=1e-8):
  t = state["t"] + 1
  m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state["m"], grads)
  v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state["v"], grads)
  c1, c2 = 1 - b1 ** t.astype(jnp.float32), 1 - b2 ** t.astype(jnp.float32)
  params = jax.tree.map(lambda p, m, v: p - lr * (m / c1) / (jnp.sqrt(v / c2) + eps),
                        params, m, v)
  return params, {"m": m, "v": v, "t": t}


# ---------------------------------------------------------------- runs
@dataclass
class RunResult:
  backend: str
  losses: dict[str, list[float]] = field(default_factory=dict)
  step_ms: dict[str, float] = field(default_factory=dict)
  samples: np.ndarray | None = None
  accuracy: float | None = None


def _gan_step(mod):
  def step(params, opt, x, z):
    def d_loss(d):
      return gan_losses(mod, {"g": params["g"], "d": d}, x, z)[0]

    def g_loss(g):
      return gan_losses(mod, {"g": g, "d": params["d"]}, x, z)[1]

    dl, dg = jax.value_and_grad(d_loss)(params["d"])
    gl, gg = jax.value_and_grad(g_loss)(params["g"])
    new_d, od = adam_update(params["d"], dg, opt["d"], 2e-3)
    new_g, og = adam_update(params["g"], gg, opt["g"], 2e-3)
    return {"g": new_g, "d": new_d}, {"g": og, "d": od}, dl, gl
  return jax.jit(step)


def _clf_step(mod):
  def loss(p, x, y):
    logp = jax.nn.log_softmax(dilated_logits(mod, p, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], 1))

  def step(p, opt, x, y):
    l, g = jax.value_and_grad(loss)(p, x, y)
    p, opt = adam_update(p, g, opt, 3e-3, b1=0.9)
    return p, opt, l
  return jax.jit(step)


def _median_ms(times: list[float]) -> float:
  return 1e3 * float(np.median(times[1:] if len(times) > 1 else times))


def train_both(steps: int = 300, batch: int = 64, seed: int = 0,
               progress: Callable[[str], None] | None = None) -> dict[str, RunResult]:
  """Trains both models on cks-jax and on jax.lax with identical seeds and batches."""
  x_all, y_all = load_digits()
  n_train = int(0.8 * len(x_all))
  results = {}
  for name, mod in (("cks", cks_jax), ("lax", lax)):
    res = RunResult(name)
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)
    params = gan_init(key)
    opt = {"g": adam_init(params["g"]), "d": adam_init(params["d"])}
    step = _gan_step(mod)
    d_losses, g_losses, times = [], [], []
    for i in range(steps):
      idx = rng.integers(0, n_train, batch)
      z = rng.standard_normal((batch, 32)).astype(np.float32)
      t0 = time.perf_counter()
      params, opt, dl, gl = step(params, opt, x_all[idx], z)
      dl, gl = float(dl), float(gl)
      times.append(time.perf_counter() - t0)
      d_losses.append(dl)
      g_losses.append(gl)
      if progress and i % 10 == 0:
        progress(f"{name} GAN step {i}/{steps}")
    res.losses["gan_d"], res.losses["gan_g"] = d_losses, g_losses
    res.step_ms["gan"] = _median_ms(times)
    z = np.random.default_rng(seed + 1).standard_normal((64, 32)).astype(np.float32)
    res.samples = np.asarray(generator(mod, params["g"], z))

    p = dilated_init(jax.random.PRNGKey(seed + 2))
    opt = adam_init(p)
    cstep = _clf_step(mod)
    rng = np.random.default_rng(seed + 3)
    losses, times = [], []
    for i in range(steps):
      idx = rng.integers(0, n_train, batch)
      t0 = time.perf_counter()
      p, opt, l = cstep(p, opt, x_all[idx], y_all[idx])
      losses.append(float(l))
      times.append(time.perf_counter() - t0)
      if progress and i % 10 == 0:
        progress(f"{name} dilated-net step {i}/{steps}")
    res.losses["dilated"] = losses
    res.step_ms["dilated"] = _median_ms(times)
    pred = jnp.argmax(dilated_logits(mod, p, x_all[n_train:]), -1)
    res.accuracy = float(jnp.mean(pred == y_all[n_train:]))
    results[name] = res
  return results


def plot(results: dict[str, RunResult], path: str) -> None:
  """Loss curves of both backends (three panels) and a grid of cks-jax GAN samples."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
  titles = {"gan_d": "GAN discriminator loss", "gan_g": "GAN generator loss",
            "dilated": "dilated-conv classifier loss"}
  smooth = lambda v: np.convolve(v, np.ones(5) / 5, mode="valid")
  for ax, key in zip(axes, titles):
    for name, style in (("lax", dict(color="tab:orange", lw=2.5, alpha=0.6)),
                        ("cks", dict(color="tab:blue", lw=1.0))):
      r = results[name]
      ax.plot(smooth(r.losses[key]), label=f"{name} ({r.step_ms['gan' if 'gan' in key else 'dilated']:.1f} ms/step)",
              **style)
    ax.set_title(titles[key], fontsize=10)
    ax.set_xlabel("step (5-step moving average)")
    ax.legend(fontsize=8)
  s = results["cks"].samples[:64, ..., 0]
  grid = np.concatenate([np.concatenate(list(s[r * 8:(r + 1) * 8]), 1) for r in range(8)], 0)
  axes[3].imshow(grid, cmap="gray", vmin=-1, vmax=1)
  axes[3].set_title("cks-jax generator samples", fontsize=10)
  axes[3].axis("off")
  fig.suptitle("Same seeds, same batches: every convolution on cks-jax vs on jax.lax",
               fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
