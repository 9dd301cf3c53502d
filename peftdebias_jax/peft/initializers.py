"""Initialisers matching the PyTorch libraries the patches come from."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def symmetric_uniform(bound: float):
    """U(-bound, bound)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_linear_kernel():
    """torch's kaiming_uniform(a=sqrt(5)) on a [out, in] weight: U(+-1/sqrt(fan_in))."""
    return nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def torch_linear_bias(fan_in: int):
    """torch.nn.Linear's default bias: U(+-1/sqrt(fan_in))."""
    return symmetric_uniform(1.0 / fan_in**0.5)
