"""Map Hugging Face state dicts onto the Flax parameter tree (and back).

A Flax path maps to its checkpoint key mechanically: `/` -> `.`, `layer_3` -> `layer.3`,
and the leaf `kernel` (transposed) / `embedding` / `scale` -> `weight`. Base-model
checkpoints without the `bert.`/`roberta.` prefix and legacy `gamma`/`beta` LayerNorm
names are accepted.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable

import jax
import numpy as np

from peftdebias_jax.errors import CheckpointError
from peftdebias_jax.models.weight_files import ALIGNMENT, aligned_empty

log = logging.getLogger(__name__)

LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
_LAYER = re.compile(r"layer_(\d+)")


def path_str(path: tuple[str, ...]) -> str:
    return "/".join(path)


def hf_key(path: tuple[str, ...]) -> str:
    """Flax parameter path -> Hugging Face state-dict key."""
    parts = [_LAYER.sub(r"layer.\1", p) for p in path[:-1]]
    leaf = path[-1]
    parts.append(LEAF_TO_HF.get(leaf, leaf))
    return ".".join(parts)


def candidate_keys(key: str, base_name: str) -> list[str]:
    """Keys under which a checkpoint may store `key` (prefix-less base models, legacy names)."""
    keys = [key]
    if key.startswith(base_name + "."):
        keys.append(key[len(base_name) + 1 :])
    if key.endswith(("predictions.bias", "lm_head.bias")):  # older checkpoints keep only this
        keys.append(key[: -len("bias")] + "decoder.bias")
    legacy = []
    for k in keys:
        if "LayerNorm" in k or "layer_norm" in k:
            if k.endswith(".weight"):
                legacy.append(k[: -len("weight")] + "gamma")
            elif k.endswith(".bias"):
                legacy.append(k[: -len("bias")] + "beta")
    return keys + legacy


def is_ignorable(key: str, tied: bool) -> bool:
    """Keys that are buffers or tied copies, not weights of their own."""
    tied_copies = ("decoder.weight", "decoder.bias") if tied else ()
    return key.endswith(("position_ids", *tied_copies))


def leaf_paths(tree: dict) -> list[tuple[tuple[str, ...], object]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(tuple(k.key for k in path), leaf) for path, leaf in flat]


def is_base_path(path: tuple[str, ...], base_name: str) -> bool:
    """Weights every checkpoint of the architecture must hold (the encoder, not pooler/heads)."""
    return path[0] == base_name and path[1] != "pooler"


@dataclasses.dataclass
class LoadReport:
    """What loading did: keys read, parameters freshly initialised, checkpoint keys unused."""

    loaded: list[str]
    initialised: list[str]
    unused: list[str]


def to_flax_leaf(array: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    """float32 (kernels transposed to [in, out]) in an aligned array that JAX can use in
    place (see weight_files.aligned_empty); `array` itself when it already is one."""
    source = np.asarray(array)
    source = source.T if path[-1] == "kernel" else source
    if (
        source.dtype == np.float32
        and source.flags.c_contiguous
        and source.ctypes.data % ALIGNMENT == 0
    ):
        return source
    out = aligned_empty(source.shape, np.float32)
    np.copyto(out, source, casting="same_kind")
    return out


def hf_shape(shape: tuple[int, ...], path: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(reversed(shape)) if path[-1] == "kernel" else tuple(shape)


def fill_params(
    abstract: dict,
    state: dict[str, np.ndarray],
    base_name: str,
    source: str,
    initialise: Callable[[list[tuple[str, ...]]], dict],
    skip: set[tuple[str, ...]] = frozenset(),
    tied: bool = True,
) -> tuple[dict, LoadReport]:
    """The parameters of the tree of shapes `abstract`, from checkpoint tensors.

    Missing encoder weights are an error; missing heads (and paths in `skip`, e.g. patch
    leaves) are freshly initialised by `initialise(paths)` -> {path: array} and reported.
    Each tensor used is released from `state` (its entry set to None) once converted.
    """
    consumed: set[str] = set()
    missing: list[str] = []
    mismatched: list[str] = []
    loaded: list[str] = []
    initialised: list[str] = []
    leaves = {}
    for path, leaf in leaf_paths(abstract):
        if path in skip:
            initialised.append(path_str(path))
            leaves[path] = None
            continue
        key = hf_key(path)
        found = next((k for k in candidate_keys(key, base_name) if k in state), None)
        if found is None:
            if is_base_path(path, base_name):
                missing.append(key)
            else:
                initialised.append(path_str(path))
            leaves[path] = None
            continue
        tensor = state[found]
        expected = hf_shape(leaf.shape, path)
        if tuple(tensor.shape) != expected:
            mismatched.append(
                f"{found!r} has shape {tuple(tensor.shape)}, config implies {expected}"
            )
            continue
        leaves[path] = to_flax_leaf(tensor, path)
        state[found] = None  # the raw tensor can go now: no second copy of the model
        consumed.add(found)
        loaded.append(found)
    if mismatched:
        raise CheckpointError(
            f"{source}: {len(mismatched)} tensors disagree with the model config: "
            + "; ".join(mismatched[:8])
            + (f"; and {len(mismatched) - 8} more" if len(mismatched) > 8 else "")
        )
    if missing:
        sample = sorted(state)[:5]
        raise CheckpointError(
            f"{source}: missing base weights {missing[:10]}"
            + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            + f"; the checkpoint's keys look like {sample}"
        )
    unused = sorted(k for k in state if k not in consumed and not is_ignorable(k, tied))
    leaves.update(initialise([path for path, leaf in leaves.items() if leaf is None]))
    params = unflatten(leaves)
    return params, LoadReport(loaded, initialised, unused)


def unflatten(leaves: dict[tuple[str, ...], object]) -> dict:
    tree: dict = {}
    for path, leaf in leaves.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = leaf
    return tree


def to_state_dict(params: dict) -> dict[str, np.ndarray]:
    """Flax params -> Hugging Face state dict (kernels transposed back)."""
    return {
        hf_key(path): np.ascontiguousarray(np.asarray(leaf).T if path[-1] == "kernel" else leaf)
        for path, leaf in leaf_paths(params)
    }
