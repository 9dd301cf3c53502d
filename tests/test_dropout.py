"""The hashed dropout masks: exact keep rate, no correlation between elements or calls."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftdebias_jax.models.dropout import Dropout, keep_mask, rows_from

SHAPE = (16, 8, 64, 128)  # 1,048,576 elements, dropout's (batch, heads, query, key) layout


def sigmas(observed: float, expected: float, count: int) -> float:
    return abs(observed - expected) / np.sqrt(expected * (1 - expected) / count)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_keep_rate(rate):
    mask = np.asarray(keep_mask(jax.random.key(0), rate, SHAPE))
    assert mask.dtype == bool and mask.shape == SHAPE
    assert sigmas(mask.mean(), 1 - rate, mask.size) < 5


def test_neighbours_along_every_axis_and_calls_are_independent():
    key = jax.random.key(7)
    mask = np.asarray(keep_mask(key, 0.1, SHAPE))
    both = 0.9 * 0.9
    for axis in range(len(SHAPE)):
        first = np.take(mask, range(SHAPE[axis] - 1), axis=axis)
        second = np.take(mask, range(1, SHAPE[axis]), axis=axis)
        joint = (first & second).mean()
        assert sigmas(joint, both, first.size) < 5, f"axis {axis}: P(keep, keep) = {joint}"
    other = np.asarray(keep_mask(jax.random.fold_in(key, 1), 0.1, SHAPE))
    assert sigmas((mask & other).mean(), both, mask.size) < 5
    np.testing.assert_array_equal(np.asarray(keep_mask(key, 0.1, SHAPE)), mask)


def test_low_bits_of_the_counter_do_not_leak_into_blocks():
    """Each aligned block of 32 elements keeps a binomial count (a weak hash would repeat)."""
    mask = np.asarray(keep_mask(jax.random.key(3), 0.5, (2**15, 32)))
    counts = np.bincount(mask.sum(axis=1), minlength=33)
    expected = np.array([math.comb(32, k) for k in range(33)]) / 2**32 * mask.shape[0]
    big = expected > 20
    chi2 = (((counts[big] - expected[big]) ** 2) / expected[big]).sum()
    assert chi2 < 3 * big.sum(), f"chi2 {chi2:.1f} over {big.sum()} bins"


def test_edge_rates_and_bad_rates():
    key = jax.random.key(0)
    assert np.asarray(keep_mask(key, 0.0, (1000,))).all()
    assert not np.asarray(keep_mask(key, 1.0, (1000,))).any()
    with pytest.raises(ValueError, match="rate"):
        keep_mask(key, 1.5, (4,))


def test_module_scales_kept_values_and_is_identity_when_deterministic():
    x = jnp.ones((256, 256), jnp.float32)
    layer = Dropout(0.25)
    assert layer.apply({}, x, deterministic=True) is x
    out = np.asarray(layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)}))
    assert set(np.unique(out)) == {0.0, np.float32(1 / 0.75)}
    assert sigmas((out > 0).mean(), 0.75, out.size) < 5
    again = layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(np.asarray(again), out)
    zeros = Dropout(1.0).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert not np.asarray(zeros).any()


def test_a_devices_rows_get_the_masks_of_those_rows_in_the_whole_batch():
    """pmap layout: each part drawn with its first global row equals the whole batch's mask."""
    key, shape = jax.random.key(3), (8, 5, 6)
    whole = np.asarray(keep_mask(key, 0.3, shape))
    parts = [np.asarray(keep_mask(key, 0.3, (2, 5, 6), first_row=r)) for r in range(0, 8, 2)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert not np.array_equal(parts[0], parts[1])


def test_module_reads_its_rows_offset_from_the_context():
    x, rngs = jnp.ones((4, 16)), {"dropout": jax.random.key(1)}
    module = Dropout(0.5)
    whole = module.apply({}, x, deterministic=False, rngs=rngs)
    with rows_from(2):
        tail = module.apply({}, x[2:], deterministic=False, rngs=rngs)
    np.testing.assert_array_equal(np.asarray(tail), np.asarray(whole[2:]))
