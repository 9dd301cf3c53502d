"""Importance-weighted low-rank factorization (MASKS.md Part A; RECONSTRUCTED): the
row-weighted SVD of a kernel (FWSVD) and the weighted reconstruction error it minimizes."""

from __future__ import annotations

import numpy as np

from peftdebias_jax.errors import ConfigError


def fwsvd(kernel: np.ndarray, importance: np.ndarray, rank: int, eps: float = 1e-8):
    """(A3) rank-`rank` factors of a Flax kernel W^T [d_in, d_out] minimising
    ||D (W - A B)||_F with D = diag(sqrt(sum over inputs of the importance + eps)), one
    weight per output unit: (down [d_in, r], up [r, d_out]) with kernel ~ down @ up."""
    kernel = np.asarray(kernel, np.float64)
    if not 1 <= rank <= min(kernel.shape):
        raise ConfigError(f"rank must be in 1..{min(kernel.shape)}, got {rank}")
    weights = np.sqrt(np.asarray(importance, np.float64).sum(axis=0) + eps)  # [d_out]
    u, s, vt = np.linalg.svd(weights[:, None] * kernel.T, full_matrices=False)  # D W
    a = (u[:, :rank] * s[:rank]) / weights[:, None]  # D^-1 U_r S_r   [d_out, r]
    b = vt[:rank]  # V_r^T   [r, d_in]
    return b.T.astype(np.float32), a.T.astype(np.float32)


def weighted_error(kernel: np.ndarray, importance: np.ndarray, down, up, eps: float = 1e-8):
    """||D (W - A B)||_F^2 of a factorization, with fwsvd's row weights."""
    weights = np.sqrt(np.asarray(importance, np.float64).sum(axis=0) + eps)
    residual = np.asarray(kernel, np.float64) - np.asarray(down, np.float64) @ up
    return float(np.sum((weights[None, :] * residual) ** 2))
