"""x @ kernel for dense layers, with a kernel gradient that XLA's CPU back end runs as a
plain matmul.

Why: for the kernel gradient x^T g (a contraction over the token axis), XLA's CPU back end
either hands the product to Eigen, whose matmuls with a transposed operand are slower, or
lays out the gradient g transposed inside the fusion that computes it (e.g. the LayerNorm
backward). Here the narrower of x and g ([tokens, features]) is transposed explicitly and
kept apart by an optimization barrier, so the product is a plain row-major matmul and g
keeps its layout. Full fine-tuning step on CPU: -7.6%; the patches' (adapter, LoRA)
upstream steps: -1.3 to -1.7% (docs/performance.md). `bias_add` does the same for a bias
whose gradient sums many wide rows (the MLM decoder's), as a matmul instead of a column sum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


@jax.custom_vjp
def kernel_matmul(x: Array, kernel: Array) -> Array:
    """x [..., in] @ kernel [in, out]."""
    return jnp.matmul(x, kernel)


def _forward(x, kernel):
    return jnp.matmul(x, kernel), (x, kernel)


def _transposed(a: Array) -> Array:
    """a^T, materialised on CPU; other back ends (cuBLAS, TPU) take transposed operands
    natively, and were not measured with the barrier, so they get the plain transpose."""
    return jax.lax.optimization_barrier(a.T) if jax.default_backend() == "cpu" else a.T


def _backward(residuals, grad):
    x, kernel = residuals
    fan_in, fan_out = kernel.shape
    rows, grads = x.reshape(-1, fan_in), grad.reshape(-1, fan_out)
    narrow_x = fan_in <= fan_out  # transpose the narrower operand
    grad_kernel = _transposed(rows) @ grads if narrow_x else (_transposed(grads) @ rows).T
    return jnp.matmul(grad, kernel.T), grad_kernel.astype(kernel.dtype)


kernel_matmul.defvjp(_forward, _backward)


@jax.custom_vjp
def bias_add(y: Array, bias: Array) -> Array:
    """y [..., out] + bias [out], whose bias gradient is a matmul (ones @ g) instead of a
    column sum: XLA's CPU back end sums the MLM decoder's [rows, vocab] gradient over its
    rows at about 0.4 G elements/s (13 ms for 188 x 30,522), the matmul in 0.6 ms."""
    return y + bias


def _bias_forward(y, bias):
    return y + bias, None


def _bias_backward(_, grad):
    rows = grad.reshape(-1, grad.shape[-1])
    ones = jnp.ones((rows.shape[0],), rows.dtype)
    return grad, jnp.matmul(ones, rows, precision=jax.lax.Precision.HIGHEST)


bias_add.defvjp(_bias_forward, _bias_backward)


def kernel_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`flax.linen.Dense`'s `dot_general` (inputs' last axis with the kernel's first)."""
    if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())):
        raise ValueError(f"kernel_dot_general only contracts x @ kernel, got {dimension_numbers}")
    return kernel_matmul(lhs, rhs)
