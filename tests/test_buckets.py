"""Length buckets fitted to the data: optimal for their count, and little padding on real
text (the Gab Hate Corpus and BiasBios bios, tokenized by the real all-MiniLM-L6-v2)."""

import csv
import itertools
from collections import Counter

import numpy as np
import pytest
from conftest import SHARED_DATA
from transformers import AutoTokenizer

from peftdebias_jax.data import pipeline


def bucket_of(buckets, n: int) -> int:
    return next(b for b in sorted(buckets) if b >= n)


def padded_tokens(lengths, buckets) -> int:
    return sum(bucket_of(buckets, n) for n in lengths)


def smallest_bucket(lengths, buckets) -> int:
    return min(Counter(bucket_of(buckets, n) for n in lengths).values())


@pytest.mark.parametrize("seed", range(8))
def test_fitted_buckets_pad_no_more_than_any_other_choice(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 100, size=rng.integers(5, 60)).tolist()
    count, min_rows = int(rng.integers(1, 5)), int(rng.choice([1, 4, 9]))
    fitted = pipeline.fitted_bucket_lengths(lengths, count, max_len=100, min_rows=min_rows)
    assert len(fitted) <= count and max(fitted) >= max(lengths)
    assert all(b % 8 == 0 or b == 100 for b in fitted)
    candidates = sorted({min(100, -(-n // 8) * 8) for n in lengths})
    choices = [[*chosen, candidates[-1]] for k in range(count)
               for chosen in itertools.combinations(candidates[:-1], k)]  # fmt: skip
    allowed = [c for c in choices if smallest_bucket(lengths, c) >= min_rows] or choices[:1]
    assert padded_tokens(lengths, fitted) == min(padded_tokens(lengths, c) for c in allowed)
    assert smallest_bucket(lengths, fitted) >= min(min_rows, len(lengths))


def test_given_lengths_are_kept_and_longer_sequences_go_to_max_len():
    seqs = [np.arange(n, dtype=np.int32) for n in (5, 20, 40, 90)]
    batches = pipeline.Batches(seqs, 2, 128, 0, lengths=[16, 48])
    assert batches.lengths == [16, 48, 128]
    assert {k: sorted(v) for k, v in batches.buckets.items()} == {16: [0], 48: [1, 2], 128: [3]}


def ghc_posts() -> list[str]:
    with (SHARED_DATA / "ghc" / "ghc_train.tsv").open(newline="") as f:
        return [row["text"] for row in csv.DictReader(f, delimiter="\t")]


def bios() -> list[str]:
    texts = []
    for path in sorted((SHARED_DATA / "bias_in_bios" / "samples").glob("*.csv")):
        with path.open(newline="") as f:
            texts += [row["hard_text"] for row in csv.DictReader(f)]
    return texts


def padding_fraction(batches: pipeline.Batches) -> float:
    """Pad tokens over all tokens of one training epoch as the steps see it."""
    real = total = 0
    for spec in batches.training_epoch(0):
        real += sum(len(batches.sequences[row]) for row in spec.rows)
        total += spec.length * len(spec.rows)
    return 1 - real / total


@pytest.mark.parametrize("corpus", [ghc_posts, bios])
def test_default_buckets_waste_at_most_15_percent_on_real_text(corpus, minilm_dir):
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    sequences = pipeline.encode(tokenizer, corpus(), 128)
    fitted = pipeline.Batches(sequences, 32, 128, tokenizer.pad_token_id)
    powers = pipeline.Batches(sequences, 32, 128, tokenizer.pad_token_id,
                              lengths=pipeline.bucket_lengths(128))  # fmt: skip
    assert len(fitted.buckets) <= 8
    assert padding_fraction(fitted) <= 0.15
    assert padding_fraction(fitted) < padding_fraction(powers) - 0.05
