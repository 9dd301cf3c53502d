"""Every extrinsic metric on cases computed by hand."""

import math

import pytest

from peftdebias_jax import evaluation as ev


def test_accuracy_and_macro_f1():
    gold = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", "a"]
    assert ev.accuracy(gold, pred) == pytest.approx(3 / 5)
    # a: TP1 FP1 FN1 -> 2/4; b: TP2 FP1 FN0 -> 4/5; c: TP0 FP0 FN1 -> 0
    assert ev.macro_f1(gold, pred) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    with pytest.raises(ValueError, match="different lengths"):
        ev.accuracy([1], [1, 2])


def test_tpr_gap_rms_and_per_class_gaps():
    # nurse: m 1/2 correct, f 2/2 -> gap -0.5 ; surgeon: m 2/2, f 0/1 -> gap 1.0
    gold = ["nurse", "nurse", "nurse", "nurse", "surgeon", "surgeon", "surgeon"]
    pred = ["nurse", "surgeon", "nurse", "nurse", "surgeon", "surgeon", "nurse"]
    groups = ["m", "m", "f", "f", "m", "m", "f"]
    result = ev.tpr_gap(gold, pred, groups)
    assert result.gaps == {"nurse": pytest.approx(-0.5), "surgeon": pytest.approx(1.0)}
    assert result.rms == pytest.approx(100 * math.sqrt((0.25 + 1.0) / 2))
    assert result.skipped == []


def test_tpr_gap_skips_a_class_without_both_groups():
    result = ev.tpr_gap(["dj", "poet", "poet"], ["dj", "poet", "dj"], ["m", "m", "f"])
    assert result.skipped == ["dj"]
    assert result.gaps == {"poet": pytest.approx(1.0)}
    with pytest.raises(ValueError, match="no class has examples of both groups"):
        ev.tpr_gap(["dj"], ["dj"], ["m"])


TEXTS = ["a muslim man", "the black cat", "transport works", "my god", "a goddess", "plain text"]
GOLD = [0, 0, 0, 1, 0, 0]
PRED = [1, 0, 1, 1, 1, 0]


def test_fprd_reference_variant_uses_all_examples_and_substrings():
    terms = ("muslim", "black", "trans", "god", "sikh")
    result = ev.fprd(GOLD, PRED, TEXTS, terms=terms)
    # false positives: rows 0, 2, 4 -> F = 3/6 over ALL examples
    assert result.overall == pytest.approx(0.5)
    # "trans" matches "transport" and "god" matches "goddess" (substrings, case-sensitive)
    assert result.per_term == {"muslim": 1.0, "black": 0.0, "trans": 1.0, "god": 0.5}
    assert result.skipped == ["sikh"]
    assert result.value == pytest.approx(0.5 + 0.5 + 0.5 + 0.0)


def test_fprd_dixon_variant_uses_negatives_and_whole_words():
    terms = ("muslim", "black", "trans", "god")
    result = ev.fprd(GOLD, PRED, TEXTS, terms=terms, variant="dixon")
    # negatives: rows 0,1,2,4,5; false positives 0,2,4 -> FPR = 3/5
    assert result.overall == pytest.approx(0.6)
    # whole words only: "trans" and "god" match no negative ("my god" is positive)
    assert result.per_term == {"muslim": 1.0, "black": 0.0}
    assert sorted(result.skipped) == ["god", "trans"]
    assert result.value == pytest.approx(0.4 + 0.6)


def test_fprd_without_negatives_is_an_error():
    with pytest.raises(ValueError, match="no negative example"):
        ev.fprd([1, 1], [1, 0], ["a", "b"], variant="dixon")


def test_fraction_neutral():
    assert ev.fraction_neutral(["neutral", "entailment", "neutral", "contradiction"]) == 0.5


def test_demographic_parity_and_equalized_odds():
    gold = [1, 0, 1, 0, 1, 0]
    pred = [1, 1, 1, 0, 0, 0]
    groups = ["a", "a", "a", "b", "b", "b"]
    # P(pred=1 | a) = 3/3, P(pred=1 | b) = 0/3
    assert ev.demographic_parity_difference(pred, groups) == pytest.approx(1.0)
    # TPR a = 2/2, b = 0/1 -> 1.0 ; FPR a = 1/1, b = 0/2 -> 1.0
    assert ev.equalized_odds_difference(gold, pred, groups) == pytest.approx(1.0)
    assert ev.equalized_odds_difference([1, 0, 1, 0], [1, 0, 0, 0], ["a", "a", "b", "b"]) == 1.0


def test_reference_term_list():
    assert len(ev.GROUP_BIAS_WORDS) == 54
    assert {"trans", "christ", "asia", "god"} <= set(ev.GROUP_BIAS_WORDS)
