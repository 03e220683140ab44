"""Test configuration: float64 enabled so index errors cannot hide behind rounding."""
import jax

jax.config.update("jax_enable_x64", True)
