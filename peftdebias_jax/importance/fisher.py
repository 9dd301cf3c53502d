"""Fisher group importance and its neutralization across demographic groups (after Zhang
& Zhou 2024, arXiv 2403.00625); the Fisher-weighted factorization is in `lowrank`.

RECONSTRUCTED (MASKS.md Part A): the paper's equations are not known; only its abstract
is. Every choice here is an option and none is "the paper's method": the per-example
diagonal Fisher (A1) with empirical, sampled or expected labels; four neutralizations
(A2: balanced_mean, min, discrepancy_penalized, mask); the row-weighted SVD of Hsu et al.
2022 (A3, `lowrank`) in replace or residual mode; the optional EWC term (A4).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from peftdebias_jax.errors import ConfigError
from peftdebias_jax.registry import Registry

Flat = dict[tuple[str, ...], Any]

LABEL_MODES = ("empirical", "sampled", "expected")


def squared_grads(logits_fn: Callable[[dict, dict], jax.Array], mode: str = "empirical"):
    """f(params, example, key) -> the squared gradient of log p(y | x) for one example:
    y the true label ("empirical"), drawn from the model ("sampled"), or the expectation
    over y under the model ("expected": sum_y p_y (d log p_y)^2)."""
    if mode not in LABEL_MODES:
        raise ConfigError(f"fisher label mode must be one of {LABEL_MODES}, got {mode!r}")

    def log_prob(params: dict, example: dict, label: jax.Array) -> jax.Array:
        return jax.nn.log_softmax(logits_fn(params, example))[label]

    def square(tree: Any) -> Any:
        return jax.tree_util.tree_map(jnp.square, tree)

    def per_example(params: dict, example: dict, key: jax.Array) -> Any:
        if mode == "expected":
            probs = jax.nn.softmax(jax.lax.stop_gradient(logits_fn(params, example)))
            per_class = jax.vmap(
                lambda c: square(jax.grad(log_prob)(params, example, c))
            )(jnp.arange(probs.shape[-1]))  # fmt: skip
            return jax.tree_util.tree_map(lambda s: jnp.tensordot(probs, s, axes=1), per_class)
        if mode == "sampled":
            label = jax.random.categorical(key, jax.lax.stop_gradient(logits_fn(params, example)))
        else:
            label = example["label"]
        return square(jax.grad(log_prob)(params, example, label))

    return per_example


def group_fisher(
    logits_fn: Callable[[dict, dict], jax.Array],
    params: dict,
    examples: dict[str, np.ndarray],
    groups: np.ndarray,
    mode: str = "empirical",
    chunk: int = 16,
    seed: int = 0,
) -> dict[Any, Flat]:
    """(A1) {group: {path: F_g}}: the mean over the group's examples of the squared
    per-example gradient of log p(y|x) w.r.t. `params` (the leaves to score), computed with
    vmap(grad) `chunk` examples at a time (squaring a batch-mean gradient would not do)."""
    groups = np.asarray(groups)
    count = len(groups)
    fn = jax.jit(jax.vmap(squared_grads(logits_fn, mode), in_axes=(None, 0, 0)))
    keys = jax.random.split(jax.random.key(seed), count)
    sums: dict[Any, Flat] = {}
    for start in range(0, count, chunk):
        part = {k: v[start : start + chunk] for k, v in examples.items()}
        flat = traverse_util.flatten_dict(
            jax.device_get(fn(params, part, keys[start : start + chunk]))
        )
        for g in np.unique(groups[start : start + chunk]):
            rows = groups[start : start + chunk] == g
            total = sums.setdefault(g.item(), {})
            for path, value in flat.items():
                total[path] = total.get(path, 0.0) + np.asarray(value)[rows].sum(axis=0)
    sizes = {g.item(): int(np.sum(groups == g)) for g in np.unique(groups)}
    return {g: {p: v / sizes[g] for p, v in total.items()} for g, total in sums.items()}


def normalized(fisher: Flat) -> Flat:
    """F_g / mean_i F_g[i] over every scored entry: group size and scale stop mattering."""
    mean = np.mean(np.concatenate([np.ravel(v) for v in fisher.values()]))
    return {p: np.asarray(v) / max(float(mean), 1e-30) for p, v in fisher.items()}


def discrepancy(fishers: dict[Any, Flat]) -> Flat:
    """|F^_0 - F^_1| per entry (for more groups: the spread max_g - min_g)."""
    norm = [normalized(f) for f in fishers.values()]
    return {p: np.max([n[p] for n in norm], 0) - np.min([n[p] for n in norm], 0) for p in norm[0]}


# (A2) neutralizers by `fisher.neutralize`: f(normalized per-group Fishers, raw Fishers,
# lam, q) -> (importance, influence mask or None).
NEUTRALIZERS = Registry(
    "neutralizer", "config.fisher.neutralize", "peftdebias_jax.importance.fisher.NEUTRALIZERS"
)


def group_mean(norm: list[Flat]) -> Flat:
    return {p: np.mean([n[p] for n in norm], 0) for p in norm[0]}


@NEUTRALIZERS.register("balanced_mean")
def balanced_mean(norm: list[Flat], fishers: dict[Any, Flat], lam: float, q: float):
    """mean_g F^_g: every group counts the same, whatever its size."""
    return group_mean(norm), None


@NEUTRALIZERS.register("min")
def group_min(norm: list[Flat], fishers: dict[Any, Flat], lam: float, q: float):
    """min_g F^_g: important only where every group finds it important."""
    return {p: np.min([n[p] for n in norm], 0) for p in norm[0]}, None


@NEUTRALIZERS.register("discrepancy_penalized")
def discrepancy_penalized(norm: list[Flat], fishers: dict[Any, Flat], lam: float, q: float):
    """max(mean_g F^_g - lam |F^_0 - F^_1|, 0)."""
    mean, disc = group_mean(norm), discrepancy(fishers)
    return {p: np.maximum(mean[p] - lam * disc[p], 0.0) for p in mean}, None


@NEUTRALIZERS.register("mask")
def discrepancy_mask(norm: list[Flat], fishers: dict[Any, Flat], lam: float, q: float):
    """balanced_mean with zero importance where the discrepancy reaches its q-quantile;
    those entries are returned as the influence mask."""
    mean, disc = group_mean(norm), discrepancy(fishers)
    cut = np.quantile(np.concatenate([np.ravel(v) for v in disc.values()]), q)
    mask = {p: disc[p] >= cut for p in mean}
    return {p: np.where(mask[p], 0.0, mean[p]) for p in mean}, mask


def neutralize(
    fishers: dict[Any, Flat], option: str = "balanced_mean", lam: float = 1.0, q: float = 0.9
) -> tuple[Flat, Flat | None]:
    """(A2) (importance, influence mask or None) from the per-group Fishers, by the
    registered neutralizer `option` (balanced_mean, min, discrepancy_penalized, mask)."""
    neutralizer = NEUTRALIZERS.lookup(option)
    if len(fishers) < 2:
        raise ConfigError(
            f"config.fisher: neutralization needs two or more groups in the training data, "
            f"got only {list(fishers)}"
        )
    return neutralizer([normalized(f) for f in fishers.values()], fishers, lam, q)


def overlap_at_k(first: Flat, second: Flat, k: int) -> float:
    """|TopK(F_0) & TopK(F_1)| / k over all entries: small when the groups rely on
    different weights (the paper's motivating observation)."""
    a = np.concatenate([np.ravel(first[p]) for p in sorted(first)])
    b = np.concatenate([np.ravel(second[p]) for p in sorted(first)])
    top_a, top_b = set(np.argsort(-a)[:k].tolist()), set(np.argsort(-b)[:k].tolist())
    return len(top_a & top_b) / k


def ewc_penalty(current: Flat, anchor: Flat, importance: Flat, lam: float) -> jax.Array:
    """(A4) lam / 2 * sum_i I_i (theta_i - theta*_i)^2 over the given leaves."""
    total = sum(jnp.sum(importance[p] * jnp.square(current[p] - anchor[p])) for p in importance)
    return 0.5 * lam * total


def target_paths(params: dict, pattern: str) -> list[tuple[str, ...]]:
    """Leaves whose "/"-joined path fully matches `pattern` (e.g. the pooler kernel)."""
    regex = re.compile(pattern)
    found = [p for p in traverse_util.flatten_dict(params) if regex.fullmatch("/".join(p))]
    if not found:
        raise ConfigError(f"config.fisher.target {pattern!r} matches no parameter")
    return sorted(found)
