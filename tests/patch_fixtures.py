"""Helpers for patch tests: non-trivial patch values, so parity cannot pass on zero-init."""

from __future__ import annotations

import jax
import numpy as np
from flax import traverse_util

from peftdebias_jax import masks


def randomize_patch(params: dict, name: str, seed: int = 0, scale: float = 0.3) -> dict:
    """`params` with every leaf of patch `name` replaced by N(0, scale^2) values."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(params)
    out = {}
    for path, leaf in sorted(flat.items()):
        if masks.patch_name(path) == name:
            leaf = jax.numpy.asarray(rng.normal(0.0, scale, np.shape(leaf)), np.float32)
        out[path] = leaf
    return traverse_util.unflatten_dict(out)


def patch_paths(params: dict, name: str) -> list[str]:
    flat = traverse_util.flatten_dict(params)
    return sorted("/".join(p) for p in flat if masks.patch_name(p) == name)
