"""The exact GELU's hand-written backward pass equals autodiff of jax.nn.gelu."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftdebias_jax.models.gelu import exact_gelu


def reference(x):
    return jax.nn.gelu(x, approximate=False)


def test_values_and_gradients_match_autodiff():
    x = jnp.concatenate([jnp.linspace(-12.0, 12.0, 2001), jnp.asarray([0.0, -0.5, 3e-4])])
    grad = jnp.asarray(np.random.default_rng(0).normal(size=x.shape), jnp.float32)
    ours, ours_vjp = jax.vjp(exact_gelu, x)
    theirs, theirs_vjp = jax.vjp(reference, x)
    np.testing.assert_array_equal(ours, theirs)
    # equal to within fp32 rounding of a unit slope (1 + erf cancels in the far left tail)
    np.testing.assert_allclose(ours_vjp(grad)[0], theirs_vjp(grad)[0], rtol=2e-6, atol=3e-7)


def test_derivative_at_known_points():
    # d/dx x Phi(x) = Phi(x) + x phi(x): 0.5 at 0, ~1 far right, ~0 far left
    slope = jax.vmap(jax.grad(exact_gelu))(jnp.asarray([0.0, 8.0, -8.0, 1.0]))
    expected_at_one = 0.8413447 + 0.24197072
    np.testing.assert_allclose(slope, [0.5, 1.0, 0.0, expected_at_one], atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_gradient_keeps_dtype(dtype):
    x = jnp.linspace(-4.0, 4.0, 64).astype(dtype)
    grad = jax.grad(lambda v: jnp.sum(exact_gelu(v).astype(jnp.float32)))(x)
    assert grad.dtype == dtype
    expected = jax.grad(lambda v: jnp.sum(reference(v)))(x.astype(jnp.float32))
    np.testing.assert_allclose(grad.astype(jnp.float32), expected, atol=2e-2)
