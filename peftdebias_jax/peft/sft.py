"""Sparse fine-tuning (lottery-ticket SFT, METHOD.md §3.6): the top-k |delta| entry mask,
the sparse diff a patch directory stores (saved and loaded by `checkpoint`), and the
entry masks that train or freeze it.

A dense phase (the Full-Debias model) moves every maskable weight; `select_top_k` keeps
the k entries that moved most; the sparse phase restarts from the pre-trained weights and
trains only those entries (`masks.entry_mask`); the patch is the diff theta - theta_0 on
them, stored as flat indices + values per leaf, never as a dense copy. Downstream the diff
is added to the base and its entries are frozen through a gradient mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from peftdebias_jax.errors import CheckpointError

METHOD = "sft"

ZERO_TOLERANCE = 1e-7  # |delta| at or below this is not stored (as the reference)

Flat = dict[tuple[str, ...], Any]


def maskable_paths(params: dict, label_tree: dict, base_name: str) -> list[tuple[str, ...]]:
    """Trainable leaves of the encoder (`bert/...`): the entries SFT may select. Trainable
    head leaves (the MLM transform and bias) train densely and are not part of the mask."""
    labels = traverse_util.flatten_dict(label_tree)
    return sorted(
        p for p in traverse_util.flatten_dict(params) if p[0] == base_name and labels[p] == "train"
    )


def k_of(fraction: float, params: dict, paths: list[tuple[str, ...]]) -> int:
    """k = floor(fraction x number of maskable scalars), as the reference computes it."""
    flat = traverse_util.flatten_dict(params)
    total = sum(int(np.size(flat[p])) for p in paths)
    return int(fraction * total)


def select_top_k(delta: Flat, k: int) -> Flat:
    """{path: bool mask} of the k entries with the largest |delta| over all leaves together;
    entries tied with the k-th largest are kept too (`>=` threshold, as the reference)."""
    if k <= 0:
        raise ValueError(f"SFT needs k > 0 entries to train, got k={k}")
    magnitudes = np.concatenate([np.abs(np.asarray(d, np.float32)).ravel() for d in delta.values()])
    if k >= magnitudes.size:
        return {p: np.ones(np.shape(d), bool) for p, d in delta.items()}
    threshold = np.partition(magnitudes, magnitudes.size - k)[magnitudes.size - k]
    return {p: np.abs(np.asarray(d, np.float32)) >= threshold for p, d in delta.items()}


def sparse_diff(params: Flat, base: Flat) -> dict[str, dict[str, np.ndarray]]:
    """{"a/b/kernel": {"indices", "values"}}: the nonzero entries (|d| > 1e-7) of
    params - base, as flat indices into the leaf and their values; leaves that did not
    change are left out."""
    out = {}
    for path, value in params.items():
        delta = (np.asarray(value, np.float32) - np.asarray(base[path], np.float32)).ravel()
        keep = np.nonzero(np.abs(delta) > ZERO_TOLERANCE)[0]
        if keep.size:
            out["/".join(path)] = {"indices": keep.astype(np.int64), "values": delta[keep]}
    return out


def apply_diff(params: dict, diff: dict[str, dict[str, np.ndarray]], source: str | Path) -> dict:
    """`params` with the sparse diff added (a leaf the model lacks, or an index out of its
    range, is an error that names the leaf)."""
    flat = dict(traverse_util.flatten_dict(params))
    for key, entry in diff.items():
        path = tuple(key.split("/"))
        if path not in flat:
            raise CheckpointError(f"{source}: leaf {key} does not exist in the model")
        leaf = np.array(flat[path], np.float32)
        indices = np.asarray(entry["indices"], np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= leaf.size):
            raise CheckpointError(f"{source}: leaf {key} indexes past its {leaf.size} values")
        leaf.reshape(-1)[indices] += np.asarray(entry["values"], np.float32)
        flat[path] = jnp.asarray(leaf, dtype=flat[path].dtype)
    return traverse_util.unflatten_dict(flat)


def support(diff: dict[str, dict[str, np.ndarray]], params: dict) -> Flat:
    """{path: bool array}: True at the entries the diff changes."""
    flat = traverse_util.flatten_dict(params)
    out = {}
    for key, entry in diff.items():
        path = tuple(key.split("/"))
        mask = np.zeros(np.size(flat[path]), bool)
        mask[np.asarray(entry["indices"], np.int64)] = True
        out[path] = mask.reshape(np.shape(flat[path]))
    return out
