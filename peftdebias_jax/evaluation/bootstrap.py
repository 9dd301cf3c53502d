"""Seeded percentile-bootstrap intervals over examples.

A statistic is written as a function of resampling weights: it maps a (resamples, n) array
of per-example counts to one value per resample, so every resample of a metric is a few
matrix products, and a plain score is the statistic at weight 1 everywhere. Paired
intervals (two runs scored on the same examples) apply the same resamples to both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

# (resamples, n) counts -> (resamples,) values; NaN where a resample leaves it undefined
Statistic = Callable[[np.ndarray], np.ndarray]

RESAMPLES = 1000
LEVEL = 0.95
BLOCK = 100  # resamples drawn at once: memory is BLOCK x n whatever `resamples` is


@dataclass(frozen=True)
class Settings:
    """How intervals are drawn (`config.bootstrap`): the same seed gives the same intervals
    for the same predictions, whatever run produced them."""

    resamples: int = RESAMPLES
    level: float = LEVEL
    seed: int = 0

    def __post_init__(self) -> None:
        if self.resamples < 10:
            raise ValueError(f"bootstrap resamples must be at least 10, got {self.resamples}")
        if not 0 < self.level < 1:
            raise ValueError(f"bootstrap level must be in (0, 1), got {self.level}")

    def record(self) -> dict[str, float | int]:
        return {"resamples": self.resamples, "level": self.level, "seed": self.seed}


DEFAULT = Settings()


def resample_counts(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of (rows, n) counts: row r counts how often each example was drawn in the
    r-th resample of n draws with replacement."""
    if n < 1:
        raise ValueError("no examples to resample")
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, BLOCK):
        rows = min(BLOCK, resamples - start)
        drawn = rng.integers(0, n, (rows, n)) + n * np.arange(rows)[:, None]
        yield np.bincount(drawn.ravel(), minlength=rows * n).reshape(rows, n).astype(np.float64)


def replicates(statistic: Statistic, n: int, settings: Settings = DEFAULT) -> np.ndarray:
    """The statistic on each of `settings.resamples` resamples of the n examples."""
    return np.concatenate(
        [statistic(w) for w in resample_counts(n, settings.resamples, settings.seed)]
    )


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float] | None:
    """The central `level` percentile interval of the defined replicates; None when fewer
    than half of them are defined (the statistic mostly has no value on a resample)."""
    defined = values[np.isfinite(values)]
    if len(defined) < max(1, len(values) // 2):
        return None
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(defined, [tail, 100 - tail])
    return float(low), float(high)


def interval(
    statistic: Statistic, n: int, settings: Settings = DEFAULT
) -> tuple[float, float] | None:
    """Percentile-bootstrap interval of one statistic over n examples."""
    return percentile_interval(replicates(statistic, n, settings), settings.level)


def point(statistic: Statistic, n: int) -> float:
    """The statistic on the examples themselves (weight 1 each)."""
    return float(statistic(np.ones((1, n)))[0])


def rate(w: np.ndarray, hits: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """sum_i w_i hits_i / sum_i w_i pool_i per resample, NaN where the pool is empty: the
    weighted form of a proportion. hits and pool may carry a leading axis of k rows, giving
    (resamples, k)."""
    num, den = w @ np.asarray(hits, float).T, w @ np.asarray(pool, float).T
    return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def mean_of(statistics: Sequence[Statistic]) -> Statistic:
    """The mean of several statistics over the same examples (e.g. one per seed)."""
    if not statistics:
        raise ValueError("mean_of needs at least one statistic")
    return lambda w: np.mean([s(w) for s in statistics], axis=0)


def difference(a: Statistic, b: Statistic) -> Statistic:
    """a - b on the same resamples: its interval is the paired interval of the change."""
    return lambda w: a(w) - b(w)
