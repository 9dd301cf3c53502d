"""Masks are data: ordered (regex, "train"|"freeze") rules -> a label per parameter leaf.

Rules full-match `/`-joined parameter paths; the first match wins; every leaf must be
covered and at least one must train. The one label tree drives the optimizer partition
(frozen leaves get `optax.set_to_zero()` and no optimizer state), the gradient split
(frozen leaves are never differentiated) and patch export.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from peftdebias_jax.errors import ConfigError
from peftdebias_jax.models.seams import PATCH_KINDS

log = logging.getLogger(__name__)

TRAIN, FREEZE = "train", "freeze"
Rules = Sequence[tuple[str, str]]


def path_str(path: tuple[str, ...]) -> str:
    return "/".join(path)


def patch_regex(name: str) -> str:
    """A rule regex selecting every leaf of the patch called `name`, whatever its method."""
    return rf"(.*/)?({'|'.join(PATCH_KINDS)})_{re.escape(name)}/.*"


# Mask recipes shared by the phases and the benchmark.
LAYER_NORM_RULES = [(r".*/LayerNorm/.*", FREEZE), (r".*/layer_norm/.*", FREEZE)]
# Dense CDA training (Full-Debias, SFT's dense phase): all but the LayerNorms and the
# untied, frozen decoder.
DENSE_CDA_RULES = [
    *LAYER_NORM_RULES,
    (r"(cls/predictions|lm_head)/decoder/kernel", FREEZE),
    (r".*", TRAIN),
]


def mlm_head_rules(model_type: str) -> list[tuple[str, str]]:
    """The MLM head parts the reference trains upstream (then drops): transform + bias."""
    if model_type == "roberta":
        return [(r"lm_head/(dense|layer_norm)/.*", TRAIN), (r"lm_head/bias", TRAIN)]
    return [(r"cls/predictions/transform/.*", TRAIN), (r"cls/predictions/bias", TRAIN)]


def patch_name(path: tuple[str, ...]) -> str | None:
    """The name of the patch a leaf belongs to, from its scope (`adapter_race` -> "race")."""
    for part in path[:-1]:  # scopes only: leaf names such as lora_A are not patches
        kind, _, name = part.partition("_")
        if kind in PATCH_KINDS and name:
            return name
    return None


def labels(params: Any, rules: Rules) -> Any:
    """The label pytree ("train"/"freeze") of `params` under `rules`; logs matched counts."""
    compiled = []
    for i, rule in enumerate(rules):
        if len(rule) != 2 or rule[1] not in (TRAIN, FREEZE):
            raise ConfigError(f"mask rule {i} {rule!r} must be (regex, 'train'|'freeze')")
        try:
            compiled.append((re.compile(rule[0]), rule[1]))
        except re.error as err:
            raise ConfigError(f"mask rule {i} {rule[0]!r} is not a valid regex: {err}") from None
    flat = traverse_util.flatten_dict(params)
    leaf_counts = [0] * len(compiled)
    param_counts = [0] * len(compiled)
    out = {}
    uncovered = []
    for path, leaf in flat.items():
        name = path_str(path)
        for i, (regex, label) in enumerate(compiled):
            if regex.fullmatch(name):
                out[path] = label
                leaf_counts[i] += 1
                param_counts[i] += int(leaf.size)
                break
        else:
            uncovered.append(name)
    if uncovered:
        raise ConfigError(
            f"mask rules cover no rule for {len(uncovered)} leaves, e.g. {uncovered[:3]}; "
            "end the rules with ('.*', 'freeze') or ('.*', 'train')"
        )
    if TRAIN not in out.values():
        raise ConfigError("mask rules leave no parameter to train")
    for (regex, label), leaves, count in zip(compiled, leaf_counts, param_counts, strict=True):
        log.info("mask rule %r -> %s: %d leaves, %d params", regex.pattern, label, leaves, count)
    return traverse_util.unflatten_dict(out)


def optimizer(tx: optax.GradientTransformation, label_tree: Any) -> optax.GradientTransformation:
    """`tx` on the trainable leaves, `set_to_zero` (no state) on the frozen ones."""
    return optax.multi_transform({TRAIN: tx, FREEZE: optax.set_to_zero()}, label_tree)


class Trainable(NamedTuple):
    """What trains: mask `rules`, and optionally per-entry masks of some `train` leaves
    ({path: bool array}, True = may train; see `entry_mask`)."""

    rules: Rules
    entries: dict | None = None


class EntryMaskState(NamedTuple):
    """Bool arrays, one per masked leaf (in the order of the paths `entry_mask` holds)."""

    masks: tuple


def entry_mask(entries: dict) -> optax.GradientTransformation:
    """Zeroes the gradient of single entries: for each {path: bool array} only the True
    entries keep their gradient (SFT's top-k support; the frozen entries of a sparse patch
    downstream). Chain it before `optimizer(...)`; with AdamW and no weight decay a zeroed
    entry never moves. The masks live in the optimizer state, so they are arguments of the
    compiled step (not constants baked into it) and are checkpointed with the state."""
    paths = sorted(entries)

    def init(params: Any) -> EntryMaskState:
        del params
        return EntryMaskState(tuple(jnp.asarray(entries[p], bool) for p in paths))

    def update(updates: Any, state: EntryMaskState, params: Any = None):
        del params
        flat = dict(traverse_util.flatten_dict(updates))
        for path, mask in zip(paths, state.masks, strict=True):
            flat[path] = jnp.where(mask, flat[path], jnp.zeros_like(flat[path]))
        return traverse_util.unflatten_dict(flat), state

    return optax.GradientTransformation(init, update)


def split(params: Any, label_tree: Any) -> tuple[dict, dict]:
    """(trainable, frozen): two nested dicts that together hold every leaf once."""
    flat = traverse_util.flatten_dict(params)
    flat_labels = traverse_util.flatten_dict(label_tree)
    train = {p: v for p, v in flat.items() if flat_labels[p] == TRAIN}
    frozen = {p: v for p, v in flat.items() if flat_labels[p] != TRAIN}
    return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def merge(*trees: Any) -> dict:
    """The union of disjoint nested dicts (inverse of `split`)."""
    flat: dict = {}
    for tree in trees:
        flat.update(traverse_util.flatten_dict(tree))
    return traverse_util.unflatten_dict(flat)


def value_and_grad(
    loss_fn: Callable[..., Any], label_tree: Any, has_aux: bool = False
) -> Callable[..., tuple[Any, Any]]:
    """Like jax.value_and_grad(loss_fn) over params, differentiating trainable leaves only.

    Frozen leaves enter the loss as constants; their gradient is a zero tree (which XLA
    folds away in a jitted update), so the result plugs into `optimizer(...)`.
    """

    def wrapped(params: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        trainable, frozen = split(params, label_tree)

        def inner(train: Any) -> Any:
            return loss_fn(merge(train, frozen), *args, **kwargs)

        out, grads = jax.value_and_grad(inner, has_aux=has_aux)(trainable)
        return out, merge(grads, jax.tree_util.tree_map(jnp.zeros_like, frozen))

    return wrapped


def trainable_size(path: tuple[str, ...], leaf: Any, label: str, entries: dict | None) -> int:
    """Scalars of one leaf that train: none when frozen, the True entries of its entry mask
    when it has one (`entry_mask`), else all of them."""
    if label != TRAIN:
        return 0
    if entries is not None and path in entries:
        return int(np.sum(entries[path]))
    return int(np.size(leaf))


def counts(params: Any, label_tree: Any, entries: dict | None = None) -> tuple[int, int]:
    """(trainable, total) scalar counts; `entries` ({path: bool array}, as `entry_mask`
    takes) narrows masked leaves to the entries that may train."""
    flat, labels = traverse_util.flatten_dict(params), traverse_util.flatten_dict(label_tree)
    n_train = sum(trainable_size(p, leaf, labels[p], entries) for p, leaf in flat.items())
    return n_train, sum(int(np.size(leaf)) for leaf in flat.values())


def count_line(params: Any, label_tree: Any, entries: dict | None = None) -> str:
    """`trainable params: N || all params: M || trainable%: P`, as HF peft prints it."""
    n_train, total = counts(params, label_tree, entries)
    return (
        f"trainable params: {n_train:,} || all params: {total:,} || "
        f"trainable%: {100 * n_train / total:.4f}"
    )


def module_key(path: tuple[str, ...]) -> str:
    """A leaf's module with layer numbers folded ("encoder/layer_*/output/adapter_race")."""
    parts = ["layer_*" if re.fullmatch(r"layer_\d+", p) else p for p in path[:-1]]
    return "/".join(parts)


def summary(params: Any, label_tree: Any, entries: dict | None = None) -> str:
    """A table: one row per (patch or base/head, module), with parameter counts (entry
    masks counted entry by entry, see `counts`)."""
    flat = traverse_util.flatten_dict(params)
    flat_labels = traverse_util.flatten_dict(label_tree)
    rows: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for path, leaf in flat.items():
        group = patch_name(path)
        group = f"patch {group}" if group else ("head" if is_head(path) else "base")
        row = rows[(group, module_key(path))]
        row[0] += int(leaf.size)
        row[1] += trainable_size(path, leaf, flat_labels[path], entries)
    lines = [f"{'group':<16} {'module':<60} {'params':>12} {'trainable':>12}"]
    lines.append("-" * len(lines[0]))
    for (group, module), (total, train) in sorted(rows.items()):
        lines.append(f"{group:<16} {module:<60} {total:>12,} {train:>12,}")
    lines.append("-" * len(lines[0]))
    lines.append(count_line(params, label_tree, entries))
    return "\n".join(lines)


def is_head(path: tuple[str, ...]) -> bool:
    return path[0] in ("cls", "lm_head", "classifier") or "pooler" in path[:2]


def leaves_of(params: Any, names: Iterable[str]) -> dict:
    """The sub-tree of the leaves that belong to the named patches."""
    wanted = set(names)
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({p: v for p, v in flat.items() if patch_name(p) in wanted})
