"""Counterfactual data augmentation (CDA) driven by a `bias_attribute_words.json` word list.

Text is split on whitespace; CDA works on clean, lower-cased text (the pipeline normalises
it through the tokenizer first), so no literal [CLS]/[PAD] ever reaches it. Each word
tuple is also matched with one trailing `. , ? ! ; :` (the reference code's punctuated
copies). Two modes:

`reference` reproduces the reference code (METHOD.md §3.2) exactly:
  - gender ("two-sided"): every attribute word is swapped for its counterpart; where a
    word occurs in several pairs the last pair wins (her -> his, lady -> lord,
    girl -> guy, sir -> miss, mr. -> ms.); the document yields [counterfactual,
    original], or nothing when it has no attribute word.
  - group/race/religion ("one-to-many"): a word belongs to the last tuple that holds it;
    only the FIRST matched word is varied (a bug of the reference code): the document
    yields [original] + one copy per alternative with every occurrence of that word
    replaced; a document without attribute words yields [original].

`fixed` keeps those outputs' shape but repairs the two defects:
  - gender also swaps words with an attached contraction or possessive ("he's" ->
    "she's", "him'll" -> "her'll"), which the reference leaves untouched;
  - group varies EVERY matched word, consistently: copy j replaces each matched word w
    (every occurrence) with its j-th alternative (cycling through shorter tuples), so
    "the black church" becomes "the white synagogue" and "the brown mosque".
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from peftdebias_jax.errors import ConfigError
from peftdebias_jax.files import read_json

MODES = ("reference", "fixed")
PUNCTUATION = (".", ",", "?", "!", ";", ":")
CONTRACTION = re.compile(r"^(?P<core>.+?)(?P<suffix>'(?:s|d|ll|re|ve|m)[.,?!;:]?)$")
WordLists = Mapping[str, Sequence[Sequence[str]]]


def load_word_lists(path: str | Path) -> dict[str, list[list[str]]]:
    """A `bias_attribute_words.json` file: {key: [[word, word, ...], ...]}, validated."""
    path = Path(path)
    raw = read_json(path, "CDA word-list file", ConfigError)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object of word lists")
    for key, tuples in raw.items():
        if not isinstance(tuples, list):
            raise ConfigError(f"{path}: key {key!r} should hold a list of word tuples")
        for i, words in enumerate(tuples):
            if (
                not isinstance(words, list)
                or len(words) < 2
                or not all(isinstance(w, str) and w for w in words)
            ):
                raise ConfigError(
                    f"{path}: key {key!r}, entry {i} should be a list of 2+ words, got {words!r}"
                )
    return raw


def with_punctuation(tuples: Sequence[Sequence[str]]) -> list[list[str]]:
    """The tuples, then one copy per punctuation mark with the mark appended to each word."""
    base = [[w.lower() for w in words] for words in tuples]
    return base + [[w + mark for w in words] for mark in PUNCTUATION for words in base]


@dataclass(frozen=True)
class Augmenter:
    """CDA for one word list (`key` of the file) in one mode; call it on a text."""

    tuples: tuple[tuple[str, ...], ...]
    two_sided: bool
    mode: str = "reference"

    @classmethod
    def from_word_lists(cls, word_lists: WordLists, key: str, mode: str) -> Augmenter:
        if mode not in MODES:
            raise ConfigError(f"CDA mode must be one of {MODES}, got {mode!r}")
        if key not in word_lists:
            raise ConfigError(f"the CDA word lists have no key {key!r}; keys: {sorted(word_lists)}")
        tuples = tuple(tuple(t) for t in with_punctuation(word_lists[key]))
        two_sided = key == "gender"
        if two_sided and any(len(t) != 2 for t in tuples):
            raise ConfigError(f"CDA word list {key!r} must hold (male, female) pairs")
        return cls(tuples, two_sided, mode)

    @functools.cached_property
    def counterpart(self) -> dict[str, str]:
        """Gender: word -> its swap, later pairs overriding earlier ones (last match wins)."""
        table: dict[str, str] = {}
        for male, female in self.tuples:
            table[male] = female
            table[female] = male
        return table

    @functools.cached_property
    def alternatives(self) -> dict[str, tuple[str, ...]]:
        """Group: word -> the other words of the last tuple that contains it."""
        owner: dict[str, tuple[str, ...]] = {}
        for words in self.tuples:
            for word in words:
                owner[word] = words
        return {w: tuple(a for a in t if a != w) for w, t in owner.items()}

    def __call__(self, text: str) -> list[str]:
        words = text.split()
        if self.two_sided:
            return self.swap_gender(words, text)
        return self.one_to_many(words, text)

    def swap_gender(self, words: list[str], text: str) -> list[str]:
        swapped = [self.swap_word(w) for w in words]
        if swapped == words and not any(w in self.counterpart for w in words):
            return []
        return [" ".join(swapped), text]

    def swap_word(self, word: str) -> str:
        if word in self.counterpart:
            return self.counterpart[word]
        if self.mode == "fixed":
            match = CONTRACTION.match(word)
            if match and match["core"] in self.counterpart:
                return self.counterpart[match["core"]] + match["suffix"]
        return word

    def one_to_many(self, words: list[str], text: str) -> list[str]:
        matched = list(dict.fromkeys(w for w in words if w in self.alternatives))
        if not matched:
            return [text]
        if self.mode == "reference":
            first = matched[0]
            return [text] + [
                " ".join(alt if w == first else w for w in words)
                for alt in self.alternatives[first]
            ]
        copies = max(len(self.alternatives[w]) for w in matched)
        out = [text]
        for j in range(copies):
            choice = {w: self.alternatives[w][j % len(self.alternatives[w])] for w in matched}
            out.append(" ".join(choice.get(w, w) for w in words))
        return out


@functools.lru_cache(maxsize=16)
def cached_augmenter(path: str, key: str, mode: str) -> Augmenter:
    return Augmenter.from_word_lists(load_word_lists(path), key, mode)


DEFAULT_KEYS = {"gender": "gender", "race": "group", "religion": "religion", "group": "group"}


def augment(
    text: str,
    axis: str = "gender",
    mode: str = "reference",
    word_lists: str | Path | WordLists = "data/bias_attribute_words.json",
    key: str | None = None,
) -> list[str]:
    """CDA outputs of one (clean, lower-cased) text.

    `axis` picks the word list: gender -> "gender", race -> "group" (the reference code's
    race axis; pass key="race" for bias-bench's race triples), religion -> "religion".
    `word_lists` is a path to a `bias_attribute_words.json` file or its parsed content.
    """
    if axis not in DEFAULT_KEYS:
        raise ConfigError(f"unknown CDA axis {axis!r}; expected one of {sorted(DEFAULT_KEYS)}")
    key = key or DEFAULT_KEYS[axis]
    if isinstance(word_lists, Mapping):
        return Augmenter.from_word_lists(word_lists, key, mode)(text)
    return cached_augmenter(str(word_lists), key, mode)(text)
