"""The attention kernel's hand-written backward pass against JAX's autodiff of the same
formula, with key masking, prefix keys (more keys than queries) and dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftdebias_jax.models.attention import attend
from peftdebias_jax.models.dropout import Dropout


def reference(query, key, value, bias, keep, scale):
    scores = jnp.einsum("bhqd,bhkd->bhqk", query, key) * scale + bias
    probs = jax.nn.softmax(scores, axis=-1)
    probs = probs if keep is None else probs * keep
    return jnp.einsum("bhqk,bhkd->bhqd", probs, value)


@pytest.mark.parametrize("dropout", [False, True])
def test_values_and_gradients_match_autodiff(dropout):
    rng = np.random.default_rng(0)
    batch, heads, queries, keys, dim = 2, 3, 5, 9, 8  # keys > queries: prefix or row subset

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    query, key, value = (
        normal(batch, heads, queries, dim),
        normal(batch, heads, keys, dim),
        normal(batch, heads, keys, dim),
    )
    masked = rng.random((batch, 1, 1, keys)) < 0.3
    masked[..., 0] = False  # every row attends to something
    bias = jnp.asarray(np.where(masked, -1e9, 0.0), jnp.float32)
    keep = None
    if dropout:
        keep = jnp.asarray((rng.random((batch, heads, queries, keys)) < 0.8) / 0.8, jnp.float32)
    grad_out = normal(batch, heads, queries, dim)

    ours, ours_vjp = jax.vjp(lambda q, k, v: attend(q, k, v, bias, keep, 0.35), query, key, value)
    theirs, theirs_vjp = jax.vjp(
        lambda q, k, v: reference(q, k, v, bias, keep, 0.35), query, key, value
    )
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    for mine, expected in zip(ours_vjp(grad_out), theirs_vjp(grad_out), strict=True):
        np.testing.assert_allclose(mine, expected, atol=2e-6)
    # masked keys get no attention, so neither their keys nor their values get a gradient
    _, grad_key, grad_value = ours_vjp(grad_out)
    per_key = masked[:, 0, 0, :]  # [batch, keys]
    for grad in (grad_key, grad_value):
        assert np.all(np.asarray(grad).transpose(0, 2, 1, 3)[per_key] == 0)


def test_dropout_multiplier_draws_the_same_mask_as_dropout():
    shape, rate = (2, 4, 16, 16), 0.25
    inputs = jnp.ones(shape)
    rngs = {"dropout": jax.random.key(3)}
    dropped = Dropout(rate).apply({}, inputs, deterministic=False, rngs=rngs)
    multiplier = Dropout(rate).apply(
        {}, shape, jnp.float32, False, rngs=rngs, method=Dropout.multiplier
    )
    np.testing.assert_allclose(multiplier, dropped, rtol=1e-6)
    assert 0 < float(jnp.mean(multiplier == 0)) < 1
    assert Dropout(rate).apply({}, shape, jnp.float32, True, method=Dropout.multiplier) is None
