"""Fisher group importance and the Fisher-weighted low-rank factorization, against closed
forms (MASKS.md Part A; the method's equations are reconstructed)."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from peftdebias_jax.errors import ConfigError
from peftdebias_jax.importance import fisher, lowrank


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_per_example_group_fisher_matches_the_closed_form_of_a_linear_softmax():
    """For logits = x W, d log p_y / dW = outer(x, onehot(y) - p): F_g is the group mean of
    its square, not the square of the group's mean gradient."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=10)
    groups = np.array([0, 1] * 5)
    w = rng.normal(size=(4, 3)).astype(np.float32)

    def logits_fn(params, example):
        return example["x"] @ params["w"]

    fishers = fisher.group_fisher(
        logits_fn, {"w": jnp.asarray(w)}, {"x": x, "label": y}, groups, chunk=3
    )
    p = softmax(x @ w)
    per_example = np.einsum("ni,nj->nij", x, np.eye(3)[y] - p) ** 2
    for g in (0, 1):
        np.testing.assert_allclose(fishers[g][("w",)], per_example[groups == g].mean(0), rtol=1e-5)
    expected = fisher.group_fisher(logits_fn, {"w": jnp.asarray(w)}, {"x": x, "label": y},
                                     groups, mode="expected")  # fmt: skip
    exact = np.zeros((10, 4, 3))
    for n in range(10):
        for c in range(3):
            exact[n] += p[n, c] * np.outer(x[n], np.eye(3)[c] - p[n]) ** 2
    np.testing.assert_allclose(expected[0][("w",)], exact[groups == 0].mean(0), rtol=1e-5)


def test_neutralizers():
    f0 = {("w",): np.array([4.0, 0.0, 2.0, 2.0])}
    f1 = {("w",): np.array([0.0, 2.0, 1.0, 1.0])}
    # normalized by their means (2 and 1): [2, 0, 1, 1] and [0, 2, 1, 1]
    mean, mask = fisher.neutralize({0: f0, 1: f1}, "balanced_mean")
    np.testing.assert_allclose(mean[("w",)], [1, 1, 1, 1])
    assert mask is None
    np.testing.assert_allclose(fisher.neutralize({0: f0, 1: f1}, "min")[0][("w",)], [0, 0, 1, 1])
    penalized, _ = fisher.neutralize({0: f0, 1: f1}, "discrepancy_penalized", lam=0.25)
    np.testing.assert_allclose(penalized[("w",)], [0.5, 0.5, 1, 1])
    zeroed, mask = fisher.neutralize({0: f0, 1: f1}, "mask", q=0.5)
    np.testing.assert_array_equal(mask[("w",)], [True, True, False, False])
    np.testing.assert_allclose(zeroed[("w",)], [0, 0, 1, 1])
    assert fisher.overlap_at_k(f0, f1, 1) == 0.0
    with pytest.raises(ConfigError, match="two or more groups"):
        fisher.neutralize({0: f0}, "min")


def test_low_rank_error_falls_with_rank_and_is_the_weighted_optimum():
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(6, 5))  # Flax layout [d_in, d_out]
    importance = rng.uniform(0.1, 5.0, size=(6, 5))
    errors = []
    for rank in range(1, 6):
        down, up = lowrank.fwsvd(kernel, importance, rank, eps=0.0)
        errors.append(lowrank.weighted_error(kernel, importance, down, up, eps=0.0))
        # Eckart-Young on D W: the optimum is the sum of the trailing squared singular values
        d = np.sqrt(importance.sum(0))
        tail = np.linalg.svd(d[:, None] * kernel.T, compute_uv=False)[rank:]
        assert errors[-1] == pytest.approx(float(np.sum(tail**2)), rel=1e-4, abs=1e-8)
        # and no other rank-r factorization does better, e.g. the unweighted SVD
        plain_down, plain_up = lowrank.fwsvd(kernel, np.ones_like(importance), rank, eps=0.0)
        assert errors[-1] <= lowrank.weighted_error(kernel, importance, plain_down, plain_up,
                                                     eps=0.0) + 1e-9  # fmt: skip
    assert all(a > b for a, b in itertools.pairwise(errors))
    assert errors[-1] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError, match=r"rank must be in 1\.\.5"):
        lowrank.fwsvd(kernel, importance, 6)


def test_ewc_penalty_by_hand():
    current = {("w",): jnp.array([1.0, 2.0])}
    anchor = {("w",): jnp.array([0.0, 0.0])}
    importance = {("w",): jnp.array([2.0, 0.5])}
    assert float(fisher.ewc_penalty(current, anchor, importance, 0.1)) == pytest.approx(
        0.05 * (2 * 1 + 0.5 * 4)
    )
