"""Small, self-made data for offline smoke runs and demos (no downloads, no shared files).

`WORD_LISTS` is a short word list in the `bias_attribute_words.json` format; `corpus`
renders templated sentences that mention those words, so CDA has work to do.
"""

from __future__ import annotations

import numpy as np

WORD_LISTS = {
    "gender": [
        ["he", "she"],
        ["his", "her"],
        ["him", "her"],
        ["man", "woman"],
        ["men", "women"],
        ["father", "mother"],
        ["son", "daughter"],
        ["brother", "sister"],
        ["husband", "wife"],
        ["boy", "girl"],
    ],
    "group": [
        ["black", "white", "asian"],
        ["christian", "muslim", "jewish"],
        ["church", "mosque", "synagogue"],
        ["gay", "straight"],
    ],
    "race": [["black", "white", "asian"], ["african", "european", "asian"]],
    "religion": [["christian", "muslim", "jewish"], ["church", "mosque", "synagogue"]],
}

PEOPLE = {
    "gender": ["he", "she", "the man", "the woman", "his brother", "her sister", "my father",
               "my mother", "the boy", "the girl", "her husband", "his wife"],
    "race": ["the black man", "the white woman", "an asian student", "a christian family",
             "a muslim teacher", "the jewish doctor", "a gay couple", "the straight couple",
             "people at the church", "people at the mosque"],
}  # fmt: skip
ACTIONS = [
    "works as a {job}",
    "wants to become a {job}",
    "was hired as a {job}",
    "trained for years to be a {job}",
    "talked to the {job} about the weather",
    "met a {job} at the market",
]
JOBS = ["nurse", "doctor", "engineer", "teacher", "pilot", "dancer", "chef", "lawyer", "farmer",
        "writer", "surgeon", "secretary"]  # fmt: skip
ENDINGS = ["", " last year", " in the city", " and loves it", " every morning", " with friends"]


def corpus(axis: str, count: int, seed: int = 0) -> list[str]:
    """`count` templated sentences that mention the axis's attribute words."""
    people = PEOPLE["gender" if axis == "gender" else "race"]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        action = ACTIONS[rng.integers(len(ACTIONS))].format(job=JOBS[rng.integers(len(JOBS))])
        person = people[rng.integers(len(people))]
        out.append(f"{person.capitalize()} {action}{ENDINGS[rng.integers(len(ENDINGS))]}.")
    return out
