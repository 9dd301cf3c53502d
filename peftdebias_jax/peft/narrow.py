"""x @ kernel for the patches' kernels, which have one narrow side (an adapter's bottleneck,
a LoRA rank), with a kernel gradient that transposes the narrow operand.

Why: for the kernel gradient x^T g, XLA's CPU back end lays out the wide operand (the
hidden states' gradient, [tokens, hidden]) transposed, inside the fusion that computes it.
Here the narrow one ([tokens, bottleneck]) is transposed and kept apart by an optimization
barrier, so the product is a plain matmul and the wide operand keeps its layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


@jax.custom_vjp
def narrow_matmul(x: Array, kernel: Array) -> Array:
    """x [..., in] @ kernel [in, out]."""
    return jnp.matmul(x, kernel)


def _forward(x, kernel):
    return jnp.matmul(x, kernel), (x, kernel)


def _backward(residuals, grad):
    x, kernel = residuals
    fan_in, fan_out = kernel.shape
    rows, grads = x.reshape(-1, fan_in), grad.reshape(-1, fan_out)
    if fan_in <= fan_out:  # x is the narrow operand
        grad_kernel = jax.lax.optimization_barrier(rows.T) @ grads
    else:
        grad_kernel = (jax.lax.optimization_barrier(grads.T) @ rows).T
    return jnp.matmul(grad, kernel.T), grad_kernel.astype(kernel.dtype)


narrow_matmul.defvjp(_forward, _backward)


def narrow_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`flax.linen.Dense`'s `dot_general` (inputs' last axis with the kernel's first)."""
    if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())):
        raise ValueError(f"narrow_dot_general only contracts x @ kernel, got {dimension_numbers}")
    return narrow_matmul(lhs, rhs)
