"""CDA: the reference code's exact behaviour, the fixed mode, and word-list errors."""

import json

import pytest
from conftest import SHARED_DATA

from peftdebias_jax.data import cda
from peftdebias_jax.errors import ConfigError

WORDS = SHARED_DATA / "bias_attribute_words.json"


def gender(text, mode="reference"):
    return cda.augment(text, "gender", mode, WORDS)


def race(text, mode="reference", key=None):
    return cda.augment(text, "race", mode, WORDS, key=key)


# --- METHOD.md §14 acceptance cases -------------------------------------------------
def test_method_gender_cases():
    assert gender("he is his own boss.") == ["she is her own boss.", "he is his own boss."]
    assert gender("her book") == ["his book", "her book"]  # last match wins: (his, her)
    assert gender("the weather is nice today") == []  # no attribute word: dropped


def test_method_group_cases():
    assert race("the black church") == ["the black church", "the white church", "the brown church"]
    assert race("nothing to see here") == ["nothing to see here"]  # kept unchanged


# --- gender: ambiguities, punctuation, titles, plurals ---------------------------------
@pytest.mark.parametrize(
    ("word", "swapped"),
    [
        ("lady", "lord"),
        ("ladies", "lords"),
        ("girl", "guy"),
        ("girls", "guys"),
        ("guy", "girl"),
        ("guys", "girls"),
        ("sir", "miss"),
        ("miss", "sir"),
        ("ma'am", "sir"),
        ("gal", "guy"),
        ("mr.", "ms."),
        ("mrs.", "mr."),
        ("ms.", "mr."),
        ("him", "her"),
        ("actresses", "actors"),
        ("spokesmen", "spokeswomen"),
    ],
)
def test_gender_last_match_wins(word, swapped):
    assert gender(f"ask the {word} now") == [f"ask the {swapped} now", f"ask the {word} now"]


@pytest.mark.parametrize("mark", [".", ",", "?", "!", ";", ":"])
def test_gender_punctuated_variants(mark):
    assert gender(f"call him{mark} please")[0] == f"call her{mark} please"


def test_gender_double_punctuation_and_contractions_are_left_in_reference_mode():
    # "him.." carries two marks (only one is matched) and "he's" is not a separate word
    assert gender("it was him.. he's late") == []
    assert gender("he's late") == []


def test_gender_fixed_mode_swaps_contractions_and_possessives():
    assert gender("he's late and he'll call", "fixed") == [
        "she's late and she'll call",
        "he's late and he'll call",
    ]
    assert gender("the king's crown.", "fixed")[0] == "the queen's crown."
    # words that already matched behave as in the reference mode
    assert gender("he is his own boss.", "fixed") == gender("he is his own boss.")


# --- group / race: one-to-many, first word only vs every word -------------------------
def test_two_group_words_reference_varies_only_the_first():
    text = "the jewish man went to the mosque"
    assert race(text) == [
        text,
        "the christian man went to the mosque",
        "the muslim man went to the mosque",
    ]


def test_two_group_words_fixed_varies_both_consistently():
    text = "the jewish man went to the mosque and the mosque was full"
    assert race(text, "fixed") == [
        text,
        "the christian man went to the synagogue and the synagogue was full",
        "the muslim man went to the church and the church was full",
    ]


def test_fixed_mode_cycles_shorter_tuples():
    # gay -> (straight,) has one alternative; black -> (white, brown) has two
    assert race("a gay black man", "fixed") == [
        "a gay black man",
        "a straight white man",
        "a straight brown man",
    ]


def test_group_word_owns_its_last_tuple_and_punctuation():
    assert race("asian food.") == ["asian food.", "black food.", "white food."]
    assert race("went to church.") == [
        "went to church.",
        "went to synagogue.",
        "went to mosque.",
    ]
    assert race("gay rights") == ["gay rights", "straight rights"]
    assert race("straight talk") == ["straight talk", "queer talk"]


def test_bias_bench_race_triples_are_selectable():
    assert race("the black church", key="race") == [
        "the black church",
        "the white church",
        "the asian church",
    ]


# --- errors --------------------------------------------------------------------------
def test_word_list_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        cda.load_word_lists(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"gender": [["he"]]}))
    with pytest.raises(ConfigError, match="entry 0 should be a list of 2\\+ words"):
        cda.load_word_lists(bad)
    with pytest.raises(ConfigError, match="no key 'caste'"):
        cda.augment("x", "race", "reference", {"gender": [["he", "she"]]}, key="caste")
    with pytest.raises(ConfigError, match="CDA mode"):
        cda.augment("x", "gender", "loose", WORDS)
