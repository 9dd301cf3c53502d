"""Dense layers' matmul with a hand-written kernel gradient equals plain autodiff."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftdebias_jax.models.matmul import bias_add, kernel_dot_general, kernel_matmul


@pytest.mark.parametrize("fan_in, fan_out", [(24, 4), (4, 24), (6, 6)])
def test_gradients_match_autodiff(fan_in, fan_out):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 5, fan_in)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(fan_in, fan_out)), jnp.float32)
    grad = jnp.asarray(rng.normal(size=(3, 5, fan_out)), jnp.float32)
    ours, ours_vjp = jax.vjp(kernel_matmul, x, kernel)
    theirs, theirs_vjp = jax.vjp(jnp.matmul, x, kernel)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    for mine, expected in zip(ours_vjp(grad), theirs_vjp(grad), strict=True):
        assert mine.shape == expected.shape
        np.testing.assert_allclose(mine, expected, rtol=1e-5, atol=1e-5)


def test_as_flax_dense_dot_general():
    x = jnp.ones((2, 7, 6))
    dense = nn.Dense(3, dot_general=kernel_dot_general)
    params = dense.init(jax.random.key(0), x)
    plain = nn.Dense(3).apply(params, x)
    np.testing.assert_allclose(dense.apply(params, x), plain, rtol=1e-6)
    with pytest.raises(ValueError, match="x @ kernel"):
        kernel_dot_general(x, jnp.ones((7, 3)), (((1,), (0,)), ((), ())))


def test_bias_add_gradients_match_autodiff():
    rng = np.random.default_rng(1)
    y = jnp.asarray(rng.normal(size=(3, 5, 7)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(7,)), jnp.float32)
    grad = jnp.asarray(rng.normal(size=(3, 5, 7)), jnp.float32)
    ours, ours_vjp = jax.vjp(bias_add, y, bias)
    theirs, theirs_vjp = jax.vjp(jnp.add, y, bias)
    np.testing.assert_array_equal(ours, theirs)
    for mine, expected in zip(ours_vjp(grad), theirs_vjp(grad), strict=True):
        assert mine.shape == expected.shape
        np.testing.assert_allclose(mine, expected, rtol=1e-5, atol=1e-5)
