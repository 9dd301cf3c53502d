"""Several whole examples per row (sequence packing): far fewer pad tokens than padding
each example to its length bucket.

A packed row holds examples back to back. Its `segment_ids` number them 1, 2, ... (0 for
padding): the encoder restarts positions at each one and lets a token attend only within
its own example (`models.encoder.segment_mask`), so each example's states are those it
gets alone in a row. `segment_starts` point a classifier at each example's first token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pack(lengths: Sequence[int], width: int, max_segments: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of at most `width` tokens and `max_segments`
    examples: first-fit decreasing (longest first, ties by index), a pure function of the
    lengths. Rows come in the order they were opened, examples in the order placed."""
    if width < 1 or max_segments < 1:
        raise ValueError(f"width and max_segments must be positive, got {width}, {max_segments}")
    too_long = [i for i, n in enumerate(lengths) if n > width]
    if too_long:
        raise ValueError(
            f"example {too_long[0]} has {lengths[too_long[0]]} tokens: more than a packed "
            f"row's width {width}; truncate to the width or widen the rows"
        )
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = (r for r, room in enumerate(free)
                if room >= lengths[i] and len(rows[r]) < max_segments)  # fmt: skip
        slot = next(fits, None)
        if slot is None:
            rows.append([])
            free.append(width)
            slot = len(rows) - 1
        rows[slot].append(i)
        free[slot] -= lengths[i]
    return rows


def packed_arrays(
    sequences: Sequence[np.ndarray],
    rows: Sequence[Sequence[int]],
    width: int,
    max_segments: int,
    pad_id: int,
    token_types: Sequence[np.ndarray] | None = None,
    row_count: int | None = None,
) -> dict[str, np.ndarray]:
    """The arrays of packed `rows` (lists of indices into `sequences`), padded to
    `row_count` rows (default: as many as given) of `width` tokens: input_ids,
    attention_mask, token_type_ids, segment_ids, segment_starts [R, max_segments] (each
    example's first token; 0 in empty slots) and example [R, max_segments] (its index in
    `sequences`; -1 in empty slots)."""
    count = len(rows) if row_count is None else row_count
    if len(rows) > count:
        raise ValueError(f"{len(rows)} packed rows do not fit in {count}")
    ids = np.full((count, width), pad_id, np.int32)
    types = np.zeros((count, width), np.int32)
    segments = np.zeros((count, width), np.int32)
    starts = np.zeros((count, max_segments), np.int32)
    example = np.full((count, max_segments), -1, np.int32)
    for r, members in enumerate(rows):
        if len(members) > max_segments:
            raise ValueError(f"row {r} holds {len(members)} examples: more than {max_segments}")
        at = 0
        for s, i in enumerate(members):
            seq = np.asarray(sequences[i])
            end = at + len(seq)
            if end > width:
                raise ValueError(f"row {r} holds {end} tokens: more than the width {width}")
            ids[r, at:end] = seq
            if token_types is not None:
                types[r, at:end] = token_types[i]
            segments[r, at:end] = s + 1
            starts[r, s], example[r, s] = at, i
            at = end
    return {
        "input_ids": ids,
        "attention_mask": (segments > 0).astype(np.int32),
        "token_type_ids": types,
        "segment_ids": segments,
        "segment_starts": starts,
        "example": example,
    }
