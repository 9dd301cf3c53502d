"""The exact (erf) GELU with a hand-written backward pass.

Why: the derivative JAX derives for x * Phi(x) runs as three passes over the activation on
XLA's CPU back end; this one is a single pass, g * (Phi(x) + x * phi(x)), recomputed from x
(nothing extra is saved). Values equal `jax.nn.gelu(x, approximate=False)`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


@jax.custom_vjp
def exact_gelu(x: Array) -> Array:
    """x * Phi(x), Phi the standard normal CDF (transformers' "gelu")."""
    return jax.nn.gelu(x, approximate=False)


def _forward(x):
    return exact_gelu(x), x


def _backward(x, grad):
    compute = jnp.promote_types(x.dtype, jnp.float32)
    z = x.astype(compute)
    # erf, not erfc: erfc runs at half erf's speed on CPU, and 1 + erf(.) loses only an
    # absolute ~1e-7 of the slope in the far left tail (fp32 rounding of a unit slope)
    cdf = 0.5 * (1.0 + jax.lax.erf(z * (1.0 / math.sqrt(2.0))))
    pdf = jnp.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
    return ((grad.astype(compute) * (cdf + z * pdf)).astype(x.dtype),)


exact_gelu.defvjp(_forward, _backward)
