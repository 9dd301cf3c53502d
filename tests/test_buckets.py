"""Length buckets fitted to the data: optimal for their count, and little padding on real
text (the Gab Hate Corpus and BiasBios bios, tokenized by the real all-MiniLM-L6-v2)."""

import csv
import itertools
from collections import Counter

import numpy as np
import pytest
from config_fixtures import load_config
from conftest import SHARED_DATA
from transformers import AutoTokenizer

from peftdebias_jax.data import pipeline
from peftdebias_jax.phases import common


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


def bucket_cost(lengths, buckets, passes: float, compile_tokens: float) -> float:
    rounded = [min(100, -(-n // 8) * 8) for n in lengths]
    return passes * padded_tokens(rounded, buckets) + compile_tokens * len(buckets)


@pytest.mark.parametrize("seed", range(8))
def test_the_bucket_count_weighs_padding_over_the_phase_against_compiles(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 100, size=rng.integers(20, 200)).tolist()
    count = int(rng.integers(2, 8))
    passes, compile_tokens = float(rng.uniform(0.05, 3)), float(rng.uniform(50, 2000))
    chosen = pipeline.fitted_bucket_lengths(
        lengths, count, 100, min_rows=4, compile_tokens=compile_tokens, passes=passes
    )
    best_of = [pipeline.fitted_bucket_lengths(lengths, k, 100, min_rows=4)
               for k in range(1, count + 1)]  # fmt: skip
    costs = [bucket_cost(lengths, b, passes, compile_tokens) for b in best_of]
    assert bucket_cost(lengths, chosen, passes, compile_tokens) == pytest.approx(min(costs))
    assert pipeline.fitted_bucket_lengths(lengths, count, 100, 4, passes=passes) == best_of[-1]


def test_a_short_phase_on_real_text_compiles_fewer_buckets_and_a_long_one_all(minilm_dir):
    """The configs' defaults on Gab Hate Corpus posts: a 20-update phase on 640 of them
    (the benchmark's) uses few buckets; an epoch of the whole file still uses all 8."""
    section = load_config("race_adapter").downstream
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    sequences = pipeline.encode(tokenizer, ghc_posts(), 128)
    sample = [sequences[i] for i in np.random.default_rng(0).permutation(len(sequences))[:640]]
    short = pipeline.Batches(sample, 32, 128, 0, bucket_count=section.bucket_count,
                             **common.bucket_costs(section, sample, 20))  # fmt: skip
    full = pipeline.Batches(sample, 32, 128, 0, bucket_count=section.bucket_count)
    assert 2 <= len(short.lengths) <= 4 < len(full.lengths)
    per_epoch = -(-len(sequences) // 32)
    whole = pipeline.Batches(sequences, 32, 128, 0, bucket_count=section.bucket_count,
                             **common.bucket_costs(section, sequences, per_epoch))  # fmt: skip
    assert len(whole.lengths) == section.bucket_count
    assert padding_fraction(whole) <= 0.15


def test_a_small_scored_set_gets_fewer_rows_a_batch_and_less_padding(minilm_dir):
    assert pipeline.evaluation_rows(10_000, 128, 8) == 128
    assert pipeline.evaluation_rows(128, 128, 3) == 43
    assert pipeline.evaluation_rows(128, 128, 3, multiple=8) == 48
    assert pipeline.evaluation_rows(3, 128, 8, multiple=4) == 4
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    posts = pipeline.encode(tokenizer, ghc_posts()[:768], 128)
    lengths = pipeline.Batches(posts[128:], 32, 128, 0, bucket_count=3).lengths
    scored = posts[:128]
    rows = pipeline.evaluation_rows(len(scored), 128, len(lengths))
    cut, whole = (pipeline.Batches(scored, n, 128, 0, lengths=lengths) for n in (rows, 128))
    seen = [r for spec in cut.evaluation() for r in spec.rows[: spec.real]]
    assert sorted(seen) == list(range(len(scored)))

    def padded(batches):
        return sum(spec.length * batches.batch_size for spec in batches.evaluation())

    assert padded(cut) < 0.8 * padded(whole)


def scoring_cost(lengths, chosen, passes, compile_tokens) -> float:
    return passes * padded_tokens(lengths, chosen) + compile_tokens * len(chosen)


@pytest.mark.parametrize("seed", range(8))
def test_scoring_lengths_are_training_lengths_worth_their_compile(seed):
    """A scored set is padded to a subset of the training lengths (no shapes training did
    not have): the subset with the fewest padded tokens over its passes plus a compile per
    length, found against every subset by brute force."""
    rng = np.random.default_rng(seed)
    allowed = sorted(set(rng.choice(np.arange(8, 129, 8), size=int(rng.integers(2, 7))).tolist()))
    allowed = sorted({*allowed, 128})
    lengths = rng.integers(3, 129, size=rng.integers(5, 150)).tolist()
    passes, compile_tokens = float(rng.uniform(0.5, 10)), float(rng.uniform(0, 3000))
    chosen = pipeline.scoring_lengths(lengths, allowed, compile_tokens, passes)
    assert set(chosen) <= set(allowed) and max(chosen) >= max(lengths)
    needed = bucket_of(allowed, max(lengths))
    subsets = [
        [*subset, needed]
        for k in range(len(allowed))
        for subset in itertools.combinations([a for a in allowed if a < needed], k)
    ]
    best = min(scoring_cost(lengths, s, passes, compile_tokens) for s in subsets)
    assert scoring_cost(lengths, chosen, passes, compile_tokens) == pytest.approx(best)
    free = pipeline.scoring_lengths(lengths, allowed)
    assert set(free) == {bucket_of(allowed, n) for n in lengths}
    assert pipeline.scoring_lengths(lengths, allowed, 1e12) == [needed]


def test_a_scored_set_on_real_text_compiles_fewer_programs(minilm_dir):
    """The benchmark's upstream phase (config defaults, 20 updates on 640 Gab Hate Corpus
    posts, evaluated once on 128 others): its validation set used every training length,
    a program each; priced against their compiles it uses fewer, and every row is scored."""
    up = load_config("race_adapter").upstream
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    sequences = pipeline.encode(tokenizer, ghc_posts(), up.max_len)
    order = np.random.default_rng(0).permutation(len(sequences))
    train = [sequences[i] for i in order[:640]]
    scored = [sequences[i] for i in order[640:768]]
    lengths = pipeline.Batches(train, up.batch_size, up.max_len, 0, bucket_count=up.bucket_count,
                               **common.bucket_costs(up, train, 20)).lengths  # fmt: skip
    before = pipeline.Batches(scored, up.eval_batch_size, up.max_len, 0, lengths=lengths)
    chosen = common.scoring_lengths(up, scored, lengths, up.eval_batch_size, 1)
    after = pipeline.Batches(scored, up.eval_batch_size, up.max_len, 0, lengths=chosen)
    used = {spec.length for spec in after.evaluation()}
    assert used < {spec.length for spec in before.evaluation()}, (lengths, chosen)
    seen = [r for spec in after.evaluation() for r in spec.rows[: spec.real]]
    assert sorted(seen) == list(range(len(scored)))
