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

from peftdebias_jax.data import pipeline


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


def per_slot(values: np.ndarray, example: np.ndarray) -> np.ndarray:
    """`values` of each slot's example (`example`: indices, -1 in empty slots), 0 in empty
    slots, in `values`' dtype."""
    real = example >= 0
    return np.where(real, values[np.where(real, example, 0)], 0).astype(values.dtype)


def length_stratified_batches(
    sizes: Sequence[int], batch_size: int, rng: np.random.Generator
) -> list[tuple[int, ...]]:
    """One epoch's batches of indices into `sizes`, each drawing one example from each of
    `batch_size` length strata (the examples sorted by length, ties in a random order, cut
    into that many runs; each run shuffled): every batch is a random sample spread over the
    lengths, so its token total, and the packed rows it needs, varies little from batch to
    batch. Each example comes once; to fill the last strata the shortest come again."""
    order = rng.permutation(len(sizes))
    count = -(-len(sizes) // batch_size)
    by_length = order[np.argsort(np.asarray(sizes)[order], kind="stable")]
    strata = rng.permuted(
        np.resize(by_length, count * batch_size).reshape(batch_size, count), axis=1
    )
    return [tuple(int(i) for i in strata[:, k]) for k in range(count)]


class PackedBatches(pipeline.Batches):
    """Training batches of `batch_size` examples each, packed into rows of `width` tokens
    instead of padded to a length bucket: a batch's shape is [row count, width], its row
    count the fewest of a few fitted `row_counts` that holds it. The epoch order is a pure
    function of (seed, epoch), as `pipeline.Batches`': length-stratified random batches
    (`length_stratified_batches`: few row counts fit them all), in shuffled runs of up to
    `run_length` batches of one row count. Labels and weights come per slot [rows,
    max_segments] (weight 0 in empty slots); without labels (masked LM) a row's weight
    says whether it holds an example and its `index` seeds its masks. Every process packs
    every batch alike and takes its share of the rows (`share`)."""

    def __init__(
        self,
        sequences: Sequence[np.ndarray],
        batch_size: int,
        width: int,
        pad_id: int,
        seed: int,
        token_types: Sequence[np.ndarray] | None,
        labels: Sequence[int] | None,
        updates: int,
        run_length: int = 1,
        max_segments: int = 16,
        row_count_limit: int = 8,
        rows_multiple: int = 1,
        compile_steps: float = 0.0,
        weights: Sequence[float] | None = None,
        lengths: Sequence[int] | None = None,
    ) -> None:
        """`updates`: the batches the run draws (the row counts hold every batch of the
        epochs they fall in); `compile_steps`: a row count's compile priced as that many
        steps of the mean row need, so a row count is added only where the rows it saves
        over the run outweigh it; `rows_multiple`: the devices a batch's rows split over.
        `lengths`: the buckets scoring reuses (`pipeline.Batches`' own otherwise)."""
        super().__init__(sequences, batch_size, width, pad_id, seed, token_types, labels,
                         run_length, lengths=lengths, weights=weights)  # fmt: skip
        self.width, self.max_segments = width, max_segments
        self.sizes = [len(seq) for seq in self.sequences]
        per_epoch = -(-len(self.sequences) // batch_size)
        # every batch of every epoch the run touches: an epoch's order (its runs of one row
        # count) is built whole, so its later batches need a row count too
        needs = [
            len(self.packed(batch))
            for epoch in range(-(-max(1, updates) // per_epoch))
            for batch in self._epoch_batches(epoch)
        ]
        # the epoch order groups batches by these fitted counts, whatever the devices, so
        # that it is the same on any number of them; a batch's shape rounds its count up
        self.fitted = pipeline.fitted_bucket_lengths(
            needs, row_count_limit, max(needs), multiple=1,
            compile_tokens=compile_steps * float(np.mean(needs)),
        )  # fmt: skip
        self.rows_multiple = rows_multiple
        self.row_counts = sorted({self.rows_for(count) for count in self.fitted})
        self.buckets = {count: [] for count in self.row_counts}

    def rows_for(self, count: int) -> int:
        """The rows of a batch of `count` packed rows: a multiple of the devices."""
        return -(-count // self.rows_multiple) * self.rows_multiple

    def packed(self, batch: Sequence[int]) -> list[list[int]]:
        """The rows of one batch of example indices (`pack`), as indices into sequences."""
        rows = pack([self.sizes[i] for i in batch], self.width, self.max_segments)
        return [[batch[i] for i in row] for row in rows]

    def share(self, row_count: int, rows: slice) -> slice:
        """The packed rows of a process's `rows` of the batch's positions: the same fraction
        of the `row_count` (a multiple of the devices, so of the processes)."""
        start, stop, _ = rows.indices(self.batch_size)
        if (start * row_count) % self.batch_size or (stop * row_count) % self.batch_size:
            raise ValueError(f"rows {start}:{stop} of {self.batch_size} do not split "
                             f"{row_count} packed rows evenly")  # fmt: skip
        return slice(start * row_count // self.batch_size, stop * row_count // self.batch_size)

    def _epoch_batches(self, epoch: int) -> list[tuple[int, ...]]:
        return length_stratified_batches(self.sizes, self.batch_size,
                                         np.random.default_rng([self.seed, epoch, 1]))  # fmt: skip

    def training_epoch(self, epoch: int) -> list[pipeline.BatchSpec]:
        """The epoch's batches, each a spec whose `length` is its row count, in shuffled
        runs of up to `run_length` batches of one fitted row count."""
        if self._epoch is not None and self._epoch[0] == epoch:
            return self._epoch[1]
        by_count: dict[int, list[pipeline.BatchSpec]] = {}
        for batch in self._epoch_batches(epoch):
            need = len(self.packed(batch))
            count = next((c for c in self.fitted if c >= need), None)
            if count is None:  # an epoch past the run's `updates`
                raise ValueError(f"a batch of epoch {epoch} needs {need} packed rows: more "
                                 f"than the {self.fitted[-1]} fitted for the run")  # fmt: skip
            spec = pipeline.BatchSpec(self.rows_for(count), batch, self.batch_size)
            by_count.setdefault(count, []).append(spec)
        groups = [by_count[count] for count in sorted(by_count)]
        rng = np.random.default_rng([self.seed, epoch, 2])
        self._epoch = (epoch, pipeline.in_shuffled_runs(groups, self.run_length, rng))
        return self._epoch[1]

    def evaluation(self) -> list[pipeline.BatchSpec]:
        raise NotImplementedError("packed batches are for training; score with PackedScoring")

    def materialize(self, spec: pipeline.BatchSpec, rows: slice = slice(None)) -> pipeline.Batch:
        """The packed arrays of one batch (`packed_arrays`), with its examples' labels and
        weights per slot; `rows`, a process's share of the batch's `batch_size` positions
        (`Runner.local_rows`), takes that share of the packed rows."""
        arrays = packed_arrays(self.sequences, self.packed(list(spec.rows)), self.width,
                               self.max_segments, self.pad_id, self.token_types,
                               spec.length)  # fmt: skip
        share = self.share(spec.length, rows)
        arrays = {key: value[share] for key, value in arrays.items()}
        example = arrays.pop("example")
        real = example >= 0
        if self.labels is None:  # masked LM: a row's weight and mask seed, as unpacked rows'
            arrays.pop("segment_starts")
            index = np.arange(spec.length, dtype=np.int32)[share]
            return {**arrays, "index": index, "weight": real.any(axis=1).astype(np.float32)}
        weight = real.astype(np.float32)
        if self.weights is not None:
            weight = weight * per_slot(self.weights, example)
        return {**arrays, "label": per_slot(self.labels, example), "weight": weight}


class PackedScoring:
    """A scored set (evaluation, prediction) packed: every sequence once, the whole set
    packed into rows of `width` tokens (`pack`), the rows cut into batches of one row count
    (one compiled program) of at most `row_limit` rows, a multiple of `rows_multiple` (the
    devices). A batch of `row_limit` packed rows takes the memory of `row_limit` sequences
    padded to `width`. Its arrays are `packed_arrays`' with the examples' labels per slot,
    each row's index in the set (`row`, a masked-LM eval's mask seed) and its example count
    (`weight`: 0 for filler rows)."""

    def __init__(
        self,
        sequences: Sequence[np.ndarray],
        row_limit: int,
        width: int,
        pad_id: int,
        token_types: Sequence[np.ndarray] | None = None,
        labels: Sequence[int] | None = None,
        max_segments: int = 16,
        rows_multiple: int = 1,
    ) -> None:
        if not sequences:
            raise ValueError("no sequences to score")
        if row_limit < rows_multiple:
            raise ValueError(f"{row_limit} rows a batch do not split over {rows_multiple} devices")
        self.sequences = list(sequences)
        self.token_types = list(token_types) if token_types is not None else None
        self.labels = np.asarray(labels, np.int32) if labels is not None else None
        self.width, self.pad_id, self.max_segments = width, pad_id, max_segments
        self.rows = pack([len(seq) for seq in self.sequences], width, max_segments)
        batches = -(-len(self.rows) // row_limit)
        per_batch = -(-len(self.rows) // batches)
        self.batch_size = -(-per_batch // rows_multiple) * rows_multiple
        self.lengths = (width,)  # the one row width: other scored sets share its program

    def evaluation(self) -> list[pipeline.BatchSpec]:
        """The batches, each `batch_size` row indices (past the set's rows: filler)."""
        starts = range(0, len(self.rows), self.batch_size)
        return [
            pipeline.BatchSpec(
                self.width,
                tuple(range(start, start + self.batch_size)),
                min(self.batch_size, len(self.rows) - start),
            )
            for start in starts
        ]

    def examples(self, spec: pipeline.BatchSpec) -> np.ndarray:
        """[batch_size, max_segments] the index of the example in each slot; -1 if empty."""
        example = np.full((self.batch_size, self.max_segments), -1, np.int32)
        for r, row in enumerate(spec.rows[: spec.real]):
            example[r, : len(self.rows[row])] = self.rows[row]
        return example

    def per_example(self, spec: pipeline.BatchSpec, outputs: np.ndarray):
        """(example indices, their rows of `outputs` [batch_size, max_segments, ...], the
        whole batch's per-slot outputs) of one batch."""
        example = self.examples(spec)
        return example[example >= 0], outputs[example >= 0]

    def materialize(self, spec: pipeline.BatchSpec, rows: slice = slice(None)) -> pipeline.Batch:
        """The arrays of one batch (of this process's `rows` of it, `Runner.local_rows`)."""
        members = [self.rows[row] for row in spec.rows[: spec.real]]
        arrays = packed_arrays(self.sequences, members, self.width, self.max_segments,
                               self.pad_id, self.token_types, self.batch_size)  # fmt: skip
        arrays = {key: value[rows] for key, value in arrays.items()}
        example = arrays.pop("example")
        real = example >= 0
        out = {**arrays, "row": np.asarray(spec.rows, np.int32)[rows],
               "weight": real.sum(axis=1).astype(np.float32)}  # fmt: skip
        if self.labels is not None:
            out["label"] = per_slot(self.labels, example)
        return out
