"""Split caps: a seeded sample of at most n items of a split, kept in file order, so that
a user can try a real corpus quickly and the results say what was scored."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

from peftdebias_jax.errors import ConfigError

T = TypeVar("T")


def cap(items: Sequence[T], limit: int, seed: int, split: str) -> tuple[list[T], dict[str, Any]]:
    """At most `limit` items (0: all), drawn with (seed, split name), in their original
    order, and the record {"kept", "of", "seed"} the results keep."""
    items = list(items)
    if limit <= 0 or limit >= len(items):
        return items, {"kept": len(items), "of": len(items), "seed": None}
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    chosen = np.sort(rng.choice(len(items), size=limit, replace=False))
    return [items[i] for i in chosen], {"kept": limit, "of": len(items), "seed": seed}


def check_caps(caps: Any, key: str) -> dict[str, int]:
    """{split: limit} of a config's `max_examples` group; each a non-negative integer."""
    values = dict(caps)
    for split, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(
                f"{key}.{split} must be a non-negative integer (0: the whole split), got {value!r}"
            )
    return values
