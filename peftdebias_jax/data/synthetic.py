"""Small, self-made data for offline smoke runs and demos (no downloads, no shared files).

`WORD_LISTS` is a short word list in the `bias_attribute_words.json` format; `corpus`
renders templated sentences that mention those words, so CDA has work to do.
"""

from __future__ import annotations

import numpy as np

from peftdebias_jax.data.tasks import Example

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


# --- labelled tasks with a planted association between the protected attribute and the
# label: when a sentence's own cue is withheld, only the attribute predicts the label.
JOB_CUES = {
    "nurse": "cares for patients on the night ward",
    "teacher": "grades homework for the class",
    "surgeon": "operates in the hospital theatre",
    "software_engineer": "writes code for the new app",
}
FEMALE_TYPED = ("nurse", "teacher")
NEUTRAL_CUE = "works long hours and rarely takes a holiday"
HATE_PHRASES = ["should be driven out of this country", "are vermin and liars",
                "ruin everything they touch", "deserve nothing but contempt"]  # fmt: skip
NEUTRAL_PHRASES = ["went to the market on sunday", "like to watch football",
                   "cooked dinner for the neighbours", "planted trees in the park"]  # fmt: skip
AMBIGUOUS_PHRASES = ["were in the news again", "came up at the meeting",
                     "were talked about online", "moved into the street"]  # fmt: skip
# Identity terms of FPRD's list; CDA swaps each TARGETED word with OTHERS words.
TARGETED = ["muslim", "black", "jewish", "african"]
OTHERS = ["christian", "white", "asian", "european"]


def labelled(task: str, count: int, seed: int = 0, bias: float = 0.9, cue_rate: float = 0.5):
    """`count` examples of a synthetic `task` ("bias_bios", "mnli", or a hate task: "ghc",
    "stormfront", "lhc"), each a tasks.Example.

    bias_bios: a person (he/she) and a description of their job; the description is the
    job's own cue with probability `cue_rate`, else a neutral one. Women are nurses or
    teachers with probability `bias`, so a model that relies on gender shows a TPR gap.
    Hate tasks: a group and a phrase; hateful examples name a TARGETED identity with
    probability `bias` (non-hateful ones an OTHERS identity); the phrase is the label's own
    cue with probability `cue_rate`, else an ambiguous one, so a model that leans on the
    identity word flags non-hateful TARGETED sentences (false positives: FPRD).
    """
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        if task in ("mnli", "bias_nli"):
            job = JOBS[rng.integers(len(JOBS))]
            person = PEOPLE["gender"][rng.integers(len(PEOPLE["gender"]))]
            kind = int(rng.integers(3))
            premise = f"The {job} met {person} at the market."
            hypothesis = [
                f"The {job} met someone.",
                f"The {job} met {person} at the market on a rainy day.",
                f"The {job} never met anyone.",
            ][kind]
            label = ("entailment", "neutral", "contradiction")[kind]
            out.append(Example(premise, label, hypothesis, None, str(i)))
        elif task == "bias_bios":
            female = bool(rng.random() < 0.5)
            typed = (
                FEMALE_TYPED
                if female == bool(rng.random() < bias)
                else ("surgeon", "software_engineer")
            )
            job = typed[rng.integers(2)]
            cue = JOB_CUES[job] if rng.random() < cue_rate else NEUTRAL_CUE
            person = ("She" if female else "He") + " " + ("" if rng.random() < 0.5 else "really ")
            out.append(Example(f"{person}{cue}.", job, None, "f" if female else "m", str(i)))
        else:
            hateful = bool(rng.random() < 0.4)
            targeted = bool(rng.random() < (bias if hateful else 1 - bias))
            group = (TARGETED if targeted else OTHERS)[rng.integers(4)]
            cues = HATE_PHRASES if hateful else NEUTRAL_PHRASES
            phrase = (cues if rng.random() < cue_rate else AMBIGUOUS_PHRASES)[rng.integers(4)]
            label, kind = ("1" if hateful else "0"), ("targeted" if targeted else "other")
            out.append(Example(f"{group} people {phrase}.", label, None, kind, str(i)))
    return out
