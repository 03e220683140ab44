"""Data-parallel training of a Flax generator on cks-jax kernels.

The batch is sharded over every device and the parameters are replicated:
each device runs the C-K-S kernels on its own slice of the batch, and the
filter gradients are all-reduced over the batch, as XLA does for its own
convolutions. Nothing else changes from single-device Flax code.

On a CPU, try it with 8 virtual devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/data_parallel_flax.py
"""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import cks_jax.flax.linen as cnn


class Generator(nn.Module):
  """z [N, 1, 1, 32] -> image [N, 32, 32, 3] through four transposed convolutions."""
  conv_transpose: type = cnn.ConvTranspose  # nn.ConvTranspose for the XLA reference

  @nn.compact
  def __call__(self, z):
    h = nn.relu(self.conv_transpose(64, (4, 4), padding="VALID")(z))          # 4x4
    for features in (32, 16):                                                   # 8x8, 16x16
      h = nn.relu(self.conv_transpose(features, (4, 4), strides=(2, 2))(h))
    return jnp.tanh(self.conv_transpose(3, (4, 4), strides=(2, 2))(h))          # 32x32


def make_step(model, tx):
  @jax.jit
  def step(params, opt_state, z, target):
    def loss_fn(p):
      return jnp.mean((model.apply(p, z) - target) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def main(steps: int = 20):
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

  kz, kt, kp = jax.random.split(jax.random.PRNGKey(0), 3)
  n = 4 * jax.device_count()
  z = jax.random.normal(kz, (n, 1, 1, 32))
  target = jnp.tanh(jax.random.normal(kt, (n, 32, 32, 3)))
  model, tx = Generator(), optax.adam(2e-3)
  params = model.init(kp, z)
  opt_state = tx.init(params)

  # Shard the data, replicate the state: the only multi-device code there is.
  z, target = jax.device_put((z, target), batch)
  params, opt_state = jax.device_put((params, opt_state), replicated)
  step = make_step(model, tx)

  hlo = step.lower(params, opt_state, z, target).compile().as_text()
  kernels, gathers, reduces = (len(re.findall(p, hlo)) for p in (
      r'custom_call_target="cks_conv', r"\sall-gather(?:-start)?\(", r"\sall-reduce(?:-start)?\("))
  print(f"{jax.device_count()} devices, global batch {n}; in the compiled step: {kernels} cks "
        f"kernel calls, {gathers} all-gathers, {reduces} all-reduces (the gradients)")

  # The same model on Flax's own (XLA) layers, from the same state, as a reference.
  ref_step = make_step(Generator(conv_transpose=nn.ConvTranspose), tx)
  ref_params, ref_opt_state = params, opt_state
  for i in range(steps):
    params, opt_state, loss = step(params, opt_state, z, target)
    ref_params, ref_opt_state, ref_loss = ref_step(ref_params, ref_opt_state, z, target)
    if i % 5 == 0 or i == steps - 1:
      print(f"step {i:3d}  loss {float(loss):.6f}  (Flax/XLA: {float(ref_loss):.6f})")


if __name__ == "__main__":
  main()
