"""BitFit and BEFT (MASKS.md Part B): which additive bias terms of the encoder to fine-tune.

Bias types of a BERT/RoBERTa layer: b_q, b_k, b_v (attention.self), b_m1 (attention output
dense), b_LN1, b_m2 (intermediate), b_m3 (output dense), b_LN2. BitFit trains every bias;
BEFT v2 trains b_v only; BEFT v1 ranks the types after an all-bias probe run by the BEFT
score (B1) or the magnitude of change (B2), or at the pre-trained weights by the empirical
Fisher of mini-batch gradients (B3), and trains the top type among the candidates. Every
mode also trains the pooler bias and the classifier, as the BEFT code does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from peftdebias_jax import processes
from peftdebias_jax.errors import ConfigError
from peftdebias_jax.registry import Registry

BIAS_TYPES = {
    "b_q": r"encoder/layer_(\d+)/attention/self/query/bias",
    "b_k": r"encoder/layer_(\d+)/attention/self/key/bias",
    "b_v": r"encoder/layer_(\d+)/attention/self/value/bias",
    "b_m1": r"encoder/layer_(\d+)/attention/output/dense/bias",
    "b_LN1": r"encoder/layer_(\d+)/attention/output/LayerNorm/bias",
    "b_m2": r"encoder/layer_(\d+)/intermediate/dense/bias",
    "b_m3": r"encoder/layer_(\d+)/output/dense/bias",  # layer_N/output: not attention/output
    "b_LN2": r"encoder/layer_(\d+)/output/LayerNorm/bias",
}
HEAD_RULES = [(r"classifier/.*", "train"), (r".*/pooler/dense/bias", "train")]
ALL_BIASES = r".*/bias"  # BitFit: every bias of the encoder (embeddings LayerNorm included)
CANDIDATES = ("b_q", "b_k", "b_v")
# Scores of a bias vector's change in the all-bias probe run, f(b, b0, where) -> float, by
# `beft.criterion`; "fisher" (gradients at the pre-trained weights) is `fisher_scores`.
CHANGE_SCORES = Registry(
    "bias change score", "config.beft.criterion",
    "peftdebias_jax.importance.bias_scores.CHANGE_SCORES",
)  # fmt: skip
FISHER = "fisher"


def criteria() -> tuple[str, ...]:
    """Every `beft.criterion`: the registered change scores and "fisher"."""
    return (*sorted(CHANGE_SCORES), FISHER)


def rules(types: Iterable[str] | None) -> list[tuple[str, str]]:
    """Mask rules that train the given bias types (None: every bias, BitFit) and the head."""
    if types is None:
        chosen = [(ALL_BIASES, "train")]
    else:
        unknown = [t for t in types if t not in BIAS_TYPES]
        if unknown:
            raise ConfigError(f"unknown bias types {unknown}; known: {list(BIAS_TYPES)}")
        chosen = [(rf".*/{BIAS_TYPES[t]}".replace(r"(\d+)", r"\d+"), "train") for t in types]
    return [*chosen, *HEAD_RULES, (".*", "freeze")]


def by_type(params: dict) -> dict[str, dict[int, np.ndarray]]:
    """{bias type: {layer: vector}} of a parameter tree (the encoder's layers only)."""
    out: dict[str, dict[int, np.ndarray]] = {t: {} for t in BIAS_TYPES}
    for path, value in traverse_util.flatten_dict(params).items():
        key = "/".join(path)
        for name, pattern in BIAS_TYPES.items():
            match = re.search(pattern + "$", key)
            if match:
                out[name][int(match.group(1))] = np.asarray(value, np.float64)
    return {t: layers for t, layers in out.items() if layers}


@CHANGE_SCORES.register("beft")
def beft_score(b: np.ndarray, b0: np.ndarray, where: str = "") -> float:
    """(B1) 1 - <b, b0> / max(|b|^2, |b0|^2): 0 when b is unchanged, growing with changes in
    magnitude and direction. Undefined for a zero vector (a bias-free or zero-initialised
    layer): that raises, naming the leaf; use criterion "magnitude" there."""
    b, b0 = np.asarray(b, np.float64).ravel(), np.asarray(b0, np.float64).ravel()
    largest = max(float(b @ b), float(b0 @ b0))
    if largest == 0.0 or min(float(b @ b), float(b0 @ b0)) == 0.0:
        raise ValueError(
            f"BEFT score undefined for {where or 'a bias vector'}: a norm is zero (bias-free "
            "or zero-initialised); rank by criterion 'magnitude' or 'fisher' instead"
        )
    return 1.0 - float(b @ b0) / largest


@CHANGE_SCORES.register("magnitude")
def magnitude_score(b: np.ndarray, b0: np.ndarray, where: str = "") -> float:
    """(B2) mean |b - b0|: BitFit's amount of change."""
    return float(np.mean(np.abs(np.asarray(b, np.float64) - np.asarray(b0, np.float64))))


def change_scores(probe: dict, initial: dict, criterion: str) -> dict[str, np.ndarray]:
    """{type: per-layer scores} comparing a probe run's biases with the pre-trained ones."""
    score = CHANGE_SCORES.lookup(criterion)
    after, before = by_type(probe), by_type(initial)
    out = {}
    for name, layers in before.items():
        values = []
        for layer in sorted(layers):
            values.append(score(after[name][layer], layers[layer], f"{name} of layer {layer}"))
        out[name] = np.asarray(values)
    return out


def fisher_scores(
    loss_fn: Callable[[dict, dict], jax.Array],
    params: dict,
    trainable: Callable[[dict], dict],
    batches: Iterable[dict],
) -> dict[str, np.ndarray]:
    """(B3) at the given (pre-trained) weights: for each mini-batch, the gradient of the
    batch-mean loss w.r.t. the biases and head, clipped to global norm 1; then the mean of
    its squared entries per tensor, averaged over batches. `trainable(params)` picks the
    differentiated subtree; the rest of `params` is held fixed inside `loss_fn`."""

    @jax.jit
    def squared(params: dict, batch: dict) -> dict:
        grads = jax.grad(lambda sub: loss_fn(sub, batch))(trainable(params))
        clipped, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
        return jax.tree_util.tree_map(lambda g: jnp.mean(jnp.square(g)), clipped)

    total, count = None, 0
    for batch in batches:
        value = jax.device_get(squared(params, batch))
        total = value if total is None else jax.tree_util.tree_map(np.add, total, value)
        count += 1
    if not count:
        raise ConfigError("the Fisher criterion needs at least one training batch")
    mean = jax.tree_util.tree_map(lambda x: np.asarray(x) / count, total)
    return {t: np.asarray([float(v) for _, v in sorted(layers.items())])
            for t, layers in by_type(mean).items()}  # fmt: skip


def select(scores: dict[str, np.ndarray], candidates: Iterable[str] = CANDIDATES) -> str:
    """The candidate type with the highest layer-mean score."""
    pool = [c for c in candidates if c in scores]
    if not pool:
        raise ConfigError(f"no scored bias type among the candidates {list(candidates)}")
    return max(pool, key=lambda t: float(np.mean(scores[t])))


def summary(
    scores: dict[str, np.ndarray], criterion: str, chosen: str, candidates: Iterable[str]
) -> dict[str, Any]:
    """What bias_scores.json holds: per-layer scores, layer means, ranking, the candidates
    the choice was allowed among, and the choice."""
    means = {t: float(np.mean(v)) for t, v in scores.items()}
    return {
        "criterion": criterion,
        "candidates": list(candidates),
        "per_layer": {t: [float(x) for x in v] for t, v in scores.items()},
        "mean": means,
        "ranking": sorted(means, key=lambda t: -means[t]),
        "selected": chosen,
    }


def plot(record: dict[str, Any], path) -> None:
    """A heat map of the per-layer scores (types x layers), the choice marked in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = record["ranking"]
    grid = np.asarray([record["per_layer"][t] for t in types])
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * grid.shape[1], 0.5 + 0.4 * len(types)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(types)), types)
    ax.set_xticks(range(grid.shape[1]), [str(i) for i in range(grid.shape[1])])
    ax.set_xlabel("layer")
    ax.set_title(f"{record['criterion']} scores; selected {record['selected']}")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    if processes.is_writer():
        fig.savefig(path, dpi=100)
    plt.close(fig)
