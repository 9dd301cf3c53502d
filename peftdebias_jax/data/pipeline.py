"""Text -> clean text -> CDA -> token ids -> bucketed, fixed-shape batches.

Every batch of a bucket has the same shape [batch_size, bucket_length], so a jitted step
compiles once per bucket; the bucket lengths are fitted to the data's own lengths to waste
the fewest pad tokens (`fitted_bucket_lengths`). The order of training batches is a pure
function of (seed, epoch): shuffled runs of up to `run_length` batches of one bucket, so that a
compiled call of several steps (`next_call`) stacks batches of one shape; a run resumes at
(epoch, index) with exactly the batches it would have seen. Each batch row carries its
position in the global batch (`index`, which seeds its training masks), its dataset row
(`row`, which seeds its fixed evaluation masks) and a `weight` (0 for filler rows of a
last, short eval batch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Batch = dict[str, np.ndarray]


def normalize(tokenizer, texts: Sequence[str], max_len: int) -> list[str]:
    """Texts as the tokenizer sees them: lower-cased, accents stripped, punctuation spaced
    and cleaned up as `decode` does, truncated to `max_len` tokens with [CLS]/[SEP]."""
    ids = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_len - 2)[
        "input_ids"
    ]
    return tokenizer.batch_decode(ids, clean_up_tokenization_spaces=True)


def augment_all(texts: Sequence[str], augmenter: Callable[[str], list[str]]) -> list[str]:
    return [out for text in texts for out in augmenter(text)]


def encode(tokenizer, texts: Sequence[str], max_len: int) -> list[np.ndarray]:
    """[CLS] text [SEP] token ids, truncated to max_len, no padding."""
    ids = tokenizer(list(texts), truncation=True, max_length=max_len)["input_ids"]
    return [np.asarray(row, np.int32) for row in ids]


def encode_pairs(
    tokenizer, texts: Sequence[str], pairs: Sequence[str | None], max_len: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Token ids and token types of single texts or (premise, hypothesis) pairs."""
    if any(p is not None for p in pairs):
        enc = tokenizer(list(texts), [p or "" for p in pairs], truncation=True, max_length=max_len)
    else:
        enc = tokenizer(list(texts), truncation=True, max_length=max_len)
    ids = [np.asarray(row, np.int32) for row in enc["input_ids"]]
    types = enc.get("token_type_ids") or [[0] * len(row) for row in ids]
    return ids, [np.asarray(row, np.int32) for row in types]


def bucket_lengths(max_len: int, smallest: int = 16) -> list[int]:
    """Powers of two from `smallest` up to `max_len` (always included)."""
    lengths = []
    length = smallest
    while length < max_len:
        lengths.append(length)
        length *= 2
    return [*lengths, max_len]


def fitted_bucket_lengths(
    lengths: Sequence[int],
    count: int,
    max_len: int,
    min_rows: int = 1,
    multiple: int = 8,
    compile_tokens: float = 0.0,
    passes: float = 1.0,
) -> list[int]:
    """At most `count` bucket lengths (multiples of `multiple`, or `max_len`) that cover every
    length and pad the fewest tokens in all, each bucket holding at least `min_rows` of them
    (a batch: no bucket whose only batch is mostly repeated rows, nor a compile for it): an
    exact dynamic programme over the distinct rounded lengths, so few buckets (few compiles)
    still waste little on real text. The number of buckets minimises `passes` (how often a
    phase draws these rows) times the padded tokens plus `compile_tokens` per bucket (its
    compile, priced as that many padded tokens of work): a short phase compiles fewer."""
    if count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    rounded = np.minimum(-(-np.asarray(lengths, np.int64) // multiple) * multiple, max_len)
    values, counts = np.unique(rounded, return_counts=True)
    if len(lengths) < 2 * min_rows:
        return [int(values[-1])]
    before = np.concatenate([[0], np.cumsum(counts)])
    n, k = len(values), min(count, len(values))
    # cost[b, j]: fewest padded tokens covering values[:j] with b buckets; last[b, j]: where
    # the last of those buckets starts
    cost = np.full((k + 1, n + 1), np.inf)
    last = np.zeros((k + 1, n + 1), np.int64)
    cost[0, 0] = 0.0
    for b in range(1, k + 1):
        for j in range(1, n + 1):
            rows = before[j] - before[:j]
            options = np.where(rows >= min_rows, cost[b - 1, :j] + rows * values[j - 1], np.inf)
            last[b, j] = int(np.argmin(options))
            cost[b, j] = options[last[b, j]]
    totals = passes * cost[1:, n] + compile_tokens * np.arange(1, k + 1)
    b, j, chosen = int(np.argmin(totals)) + 1, n, []
    while j > 0:
        chosen.append(int(values[j - 1]))
        j, b = int(last[b, j]), b - 1
    return sorted(chosen)


def scoring_lengths(
    lengths: Sequence[int],
    allowed: Sequence[int],
    compile_tokens: float = 0.0,
    passes: float = 1.0,
) -> list[int]:
    """The few of the `allowed` lengths (the training buckets': no new shapes) that a scored
    set of these `lengths`, scored `passes` times, is padded to: fewer where a length's
    compile (`compile_tokens`, its own program: scoring is not training) outweighs the
    padding it saves. `fitted_bucket_lengths` over the lengths rounded up to allowed ones."""
    allowed = sorted({int(n) for n in allowed})
    rounded = [next((a for a in allowed if a >= n), allowed[-1]) for n in lengths]
    return fitted_bucket_lengths(rounded, len(allowed), allowed[-1], multiple=1,
                                 compile_tokens=compile_tokens, passes=passes)  # fmt: skip


def evaluation_rows(count: int, limit: int, buckets: int, multiple: int = 1) -> int:
    """Rows per evaluation batch for a scored set of `count` rows: `limit`, or fewer when the
    set cannot fill one batch per bucket length (about count / buckets, a multiple of
    `multiple`, e.g. the devices), so a small set is not padded to its longest row."""
    rows = -(-count // max(1, buckets))
    rows = -(-rows // multiple) * multiple
    return max(multiple, min(limit, rows))


def full_batches(rows: np.ndarray, batch_size: int) -> list[tuple[int, ...]]:
    """`rows` cut into batches of `batch_size`, the last one filled by wrapping around to
    the first rows."""
    count = -(-len(rows) // batch_size)
    padded = np.resize(rows, count * batch_size)
    return [
        tuple(int(r) for r in padded[s : s + batch_size]) for s in range(0, len(padded), batch_size)
    ]


def in_shuffled_runs(groups: Sequence[Sequence], run_length: int, rng: np.random.Generator) -> list:
    """The items of `groups` (e.g. the batches of one shape each) cut into runs of up to
    `run_length` consecutive items of one group, the runs in an order drawn from `rng`."""
    runs = [group[i : i + run_length] for group in groups for i in range(0, len(group), run_length)]
    return [item for i in rng.permutation(len(runs)) for item in runs[i]]


@dataclass(frozen=True)
class BatchSpec:
    """Which rows form one batch, padded to `length`."""

    length: int
    rows: tuple[int, ...]
    real: int  # the first `real` rows count; the rest are filler


class Batches:
    """Bucketed batches over tokenized sequences."""

    def __init__(
        self,
        sequences: Sequence[np.ndarray],
        batch_size: int,
        max_len: int,
        pad_id: int,
        seed: int = 0,
        token_types: Sequence[np.ndarray] | None = None,
        labels: Sequence[int] | None = None,
        run_length: int = 1,
        bucket_count: int = 8,
        lengths: Sequence[int] | None = None,
        compile_tokens: float = 0.0,
        passes: float = 1.0,
        weights: Sequence[float] | None = None,
    ) -> None:
        """Buckets: `lengths` when given (e.g. the training set's, so that evaluation reuses
        its compiled shapes; longer sequences go to `max_len`), else at most `bucket_count`
        lengths fitted to these sequences (fewer where a bucket's compile, `compile_tokens`,
        outweighs the padding it saves over `passes` passes: `fitted_bucket_lengths`).
        `weights`: each sequence's weight in a batch's "weight" (e.g. its label's class
        weight: data, not a constant compiled into the step); 1 when None, 0 for filler."""
        if not sequences:
            raise ValueError("no sequences to batch")
        if run_length < 1:
            raise ValueError(f"run_length must be a positive integer, got {run_length!r}")
        self.run_length = run_length
        self._epoch: tuple[int, list[BatchSpec]] | None = None  # the last epoch's order
        self.sequences = list(sequences)
        self.token_types = list(token_types) if token_types is not None else None
        self.labels = np.asarray(labels, np.int32) if labels is not None else None
        self.weights = np.asarray(weights, np.float32) if weights is not None else None
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        if lengths is None:
            lengths = fitted_bucket_lengths([len(seq) for seq in self.sequences], bucket_count,
                                            max_len, min_rows=batch_size,
                                            compile_tokens=compile_tokens,
                                            passes=passes)  # fmt: skip
        self.lengths = sorted({*(int(n) for n in lengths), max_len})
        self.buckets: dict[int, list[int]] = {}
        for i, seq in enumerate(self.sequences):
            length = next(b for b in self.lengths if b >= len(seq))
            self.buckets.setdefault(length, []).append(i)

    def training_epoch(self, epoch: int) -> list[BatchSpec]:
        """Shuffled full batches (a bucket's last batch wraps around to its first rows) in
        shuffled runs of up to `run_length` consecutive batches of one bucket."""
        if self._epoch is not None and self._epoch[0] == epoch:
            return self._epoch[1]
        rng = np.random.default_rng([self.seed, epoch])
        groups = [
            [BatchSpec(length, batch, self.batch_size)
             for batch in full_batches(rng.permutation(self.buckets[length]), self.batch_size)]
            for length in sorted(self.buckets)
        ]  # fmt: skip
        self._epoch = (epoch, in_shuffled_runs(groups, self.run_length, rng))
        return self._epoch[1]

    def next_call(
        self, epoch: int, index: int, limit: int
    ) -> tuple[list[BatchSpec], tuple[int, int]]:
        """The training batches of one compiled call from position (epoch, index): up to
        `limit` consecutive batches of one bucket within one epoch, and the position after
        them. Calls never change the order, only where it is cut."""
        specs = self.training_epoch(epoch)
        if index >= len(specs):
            epoch, index = epoch + 1, 0
            specs = self.training_epoch(epoch)
        end = index + 1
        while end < len(specs) and end - index < limit and specs[end].length == specs[index].length:
            end += 1
        return specs[index:end], (epoch, end)

    def first_of_each_length(self, epoch: int, index: int, count: int) -> list[BatchSpec]:
        """The first training batch of each bucket length among the `count` batches from
        position (epoch, index), in the order they come: what a run will compile next."""
        firsts: dict[int, BatchSpec] = {}
        while count > 0 and len(firsts) < len(self.buckets):
            specs = self.training_epoch(epoch)[index : index + count]
            for spec in specs:
                firsts.setdefault(spec.length, spec)
            count -= len(specs)
            epoch, index = epoch + 1, 0
        return list(firsts.values())

    def evaluation(self) -> list[BatchSpec]:
        """Every row once, shortest first, in batches padded to the bucket of their longest
        row: only the very last batch is short (filled with weight-0 rows), however many
        buckets there are, so a small scored set costs few rows."""
        order = sorted(range(len(self.sequences)), key=lambda i: (len(self.sequences[i]), i))
        specs = []
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            longest = len(self.sequences[chunk[-1]])
            length = next(b for b in self.lengths if b >= longest)
            real = len(chunk)
            specs.append(BatchSpec(length, tuple(chunk + [chunk[0]] * (self.batch_size - real)),
                                   real))  # fmt: skip
        return specs

    def per_example(self, spec: BatchSpec, outputs: np.ndarray):
        """(example indices, their rows of `outputs`, the whole batch's per-row outputs) of
        one scored batch: its first `real` rows."""
        return np.asarray(spec.rows)[: spec.real], outputs[: spec.real]

    def materialize(self, spec: BatchSpec, rows: slice = slice(None)) -> Batch:
        """The arrays of one batch (optionally only this process's `rows` of it)."""
        positions = np.arange(self.batch_size)[rows]
        rows_of = np.asarray([spec.rows[p] for p in positions], np.int32)
        ids = np.full((len(positions), spec.length), self.pad_id, np.int32)
        mask = np.zeros_like(ids)
        types = np.zeros_like(ids) if self.token_types is not None else None
        for out, row in enumerate(rows_of):
            seq = self.sequences[row]
            ids[out, : len(seq)] = seq
            mask[out, : len(seq)] = 1
            if types is not None:
                types[out, : len(seq)] = self.token_types[row]
        real = (positions < spec.real).astype(np.float32)
        extra = {}
        if types is not None:
            extra["token_type_ids"] = types
        if self.labels is not None:
            extra["label"] = self.labels[rows_of]
        return {
            **extra,
            "input_ids": ids,
            "attention_mask": mask,
            "index": positions.astype(np.int32),
            "row": rows_of,
            "weight": real if self.weights is None else real * self.weights[rows_of],
        }


def padded_examples(batches: Batches) -> dict:
    """Every row of `batches`, padded to the longest bucket, as one dict of arrays."""
    parts = [batches.materialize(spec) for spec in batches.evaluation()]
    width = max(p["input_ids"].shape[1] for p in parts)
    out: dict = {}
    for part in parts:
        real = part["weight"] > 0
        for key, value in part.items():
            value = np.asarray(value)[real]
            if value.ndim == 2:
                value = np.pad(value, ((0, 0), (0, width - value.shape[1])))
            out.setdefault(key, []).append(value)
    order = np.concatenate([np.asarray(spec.rows)[: spec.real] for spec in batches.evaluation()])
    return {k: np.concatenate(v)[np.argsort(order)] for k, v in out.items()}
