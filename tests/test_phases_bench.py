"""The whole-phase benchmark's PyTorch sides prepare the same examples as ours: the same CDA
outputs on real Gab Hate Corpus posts and BiasBios bios, every row once an epoch, grouped
batches sorted; its rounds alternate the sides and pair their ratios in time."""

import csv
import sys
from pathlib import Path

import numpy as np
from conftest import SHARED_DATA

from peftdebias_jax.data import cda

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import phases_bench
import torch_phases

WORDS = SHARED_DATA / "bias_attribute_words.json"


def test_reference_cda_matches_ours_on_real_posts():
    with (SHARED_DATA / "ghc" / "ghc_train.tsv").open(newline="") as f:
        posts = [row["text"].lower() for row in csv.DictReader(f, delimiter="\t")][:3000]
    theirs = torch_phases.GroupCda(WORDS, "group")
    ours = cda.Augmenter.from_word_lists(cda.load_word_lists(WORDS), "group", "reference")
    assert [theirs(p) for p in posts] == [ours(p) for p in posts]
    assert sum(len(ours(p)) > 1 for p in posts) > 100, "many posts are augmented"


def test_reference_gender_cda_matches_ours_on_real_bios():
    bios = []
    for path in sorted((SHARED_DATA / "bias_in_bios" / "samples").glob("*.csv")):
        with path.open(newline="") as f:
            bios += [row["hard_text"].lower() for row in csv.DictReader(f)]
    theirs = torch_phases.GenderCda(WORDS, "gender")
    ours = cda.Augmenter.from_word_lists(cda.load_word_lists(WORDS), "gender", "reference")
    assert [theirs(b) for b in bios] == [ours(b) for b in bios]
    assert sum(len(ours(b)) == 2 for b in bios) > 200 and any(not ours(b) for b in bios)
    assert torch_phases.Corpus("biasbios").label({"p": "yoga_teacher"}) == 27


def test_batches_cover_each_epoch_and_groups_are_sorted():
    lengths = np.random.default_rng(0).integers(5, 120, size=500).tolist()
    for grouped in (False, True):
        order = torch_phases.batch_order(lengths, 8, 63, grouped, seed=1)  # 500 / 8 = 63
        assert len(order) == 63 and sorted(i for b in order for i in b) == list(range(500))
    mega = [i for batch in order[:50] for i in batch]  # the first megabatch: 50 batches
    assert [lengths[i] for i in mega] == sorted((lengths[i] for i in mega), reverse=True)


def test_tuned_batches_pad_to_their_longest_row_rounded_to_8():
    sequences = [[1] * n for n in (3, 17, 9)]
    ids, mask = torch_phases.collate(sequences, [0, 1, 2], 0, 8)
    assert ids.shape == (3, 24) and mask.sum(axis=1).tolist() == [3, 17, 9]


def test_rounds_alternate_the_sides_and_warm_follows_ours():
    sides = ["ours", "ours_warm", "tuned", "reference"]
    assert phases_bench.round_order(sides, 0) == sides
    assert phases_bench.round_order(sides, 1) == ["reference", "tuned", "ours", "ours_warm"]
    assert phases_bench.round_order(["tuned", "ours"], 3) == ["ours", "tuned"]


def test_a_side_reports_its_median_round_and_ratios_pair_rounds():
    def run(wall: float) -> dict:
        return {"wall_s": wall, "examples_per_s": 640 / wall, "padding": wall / 1000}

    ours = phases_bench.combine_rounds([run(180.0), run(150.0), run(170.0)])
    tuned = phases_bench.combine_rounds([run(240.0), run(300.0), run(200.0)])
    assert ours["wall_s"] == 170.0 and ours["padding"] == 0.17  # the median round's figures
    assert [r["wall_s"] for r in ours["rounds"]] == [180.0, 150.0, 170.0]
    assert phases_bench.combine_rounds([run(2.0), run(1.0)])["wall_s"] == 1.0
    values = phases_bench.ratios(ours, tuned)
    assert np.allclose(values, [240 / 180, 2.0, 200 / 170])
    assert phases_bench.ratio_text(values) == "1.33x (1.18-2.00x)"
    assert phases_bench.ratio_text(values[:1]) == "1.33x"
