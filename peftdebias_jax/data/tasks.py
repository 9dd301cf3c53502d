"""The downstream datasets: file schemas, label sets, class weights, selection metric.

Each task accepts one or more file schemas (detected from the columns) and turns every
record into an `Example`. A missing column, a label outside the label set, an empty split
or a malformed line is a `DataError` naming the file, line and field, raised while
loading, before any training starts.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftdebias_jax.data.records import DataError, read_records, where
from peftdebias_jax.errors import ConfigError

# the INLP split's 28 professions, in profession2index.txt order (alphabetical)
PROFESSIONS = (
    "accountant",
    "architect",
    "attorney",
    "chiropractor",
    "comedian",
    "composer",
    "dentist",
    "dietitian",
    "dj",
    "filmmaker",
    "interior_designer",
    "journalist",
    "model",
    "nurse",
    "painter",
    "paralegal",
    "pastor",
    "personal_trainer",
    "photographer",
    "physician",
    "poet",
    "professor",
    "psychologist",
    "rapper",
    "software_engineer",
    "surgeon",
    "teacher",
    "yoga_teacher",
)
NLI_LABELS = ("entailment", "neutral", "contradiction")  # GLUE's order


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    text_pair: str | None = None
    group: str | None = None
    id: str = ""


@dataclass(frozen=True)
class Schema:
    """One file layout: the columns it needs and how a record becomes (texts, label, group)."""

    name: str
    columns: tuple[str, ...]
    convert: Callable[[dict[str, Any]], tuple[str, str | None, str, str | None]]


@dataclass(frozen=True)
class Task:
    """A registry entry."""

    name: str
    schemas: tuple[Schema, ...]
    labels: tuple[str, ...] | None  # None: sorted labels of the train split (as the reference)
    selection: str  # "accuracy" or "macro_f1"
    # the reference code's fixed loss weights (its full, imbalanced corpora); a task that has
    # them is one whose classes are re-weighted ("auto" derives them from the train split)
    class_weights: dict[str, float] = field(default_factory=dict)
    group_name: str | None = None  # what `Example.group` holds (gender, dialect, ...)
    positive: str | None = None  # the "toxic" label, for FPRD / parity metrics
    description: str = ""


def as_label(value: Any, mapping: dict[str, str] | None = None) -> str:
    text = str(value).strip()
    if isinstance(value, float) and value.is_integer():
        text = str(int(value))
    if mapping is not None:
        if text not in mapping:
            raise ValueError(f"value {text!r} is not one of {sorted(mapping)}")
        return mapping[text]
    return text


def flag(value: Any) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "1.0", "true"):
        return True
    if text in ("0", "0.0", "false", ""):
        return False
    raise ValueError(f"value {value!r} is not 0/1")


GENDER = {"m": "m", "f": "f", "male": "m", "female": "f", "0": "m", "1": "f"}


def profession(value: Any) -> str:
    text = str(value).strip()
    if text.isdigit():
        index = int(text)
        if not 0 <= index < len(PROFESSIONS):
            raise ValueError(f"profession index {index} is outside 0..{len(PROFESSIONS) - 1}")
        return PROFESSIONS[index]
    return text


def gender(value: Any) -> str:
    return as_label(str(value).strip().lower(), GENDER)


def single(text_key: str, label: Callable, group: Callable | None = None):
    def convert(r):
        return r[text_key], None, label(r), group(r) if group else None

    return convert


BINARY = {"0": "0", "1": "1"}
REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    REGISTRY[task.name] = task
    return task


register(Task(
    "bias_bios",
    (
        Schema("reference", ("text", "p", "g"),
               single("text", lambda r: profession(r["p"]), lambda r: gender(r["g"]))),
        Schema("hub", ("hard_text", "profession", "gender"),
               single("hard_text", lambda r: profession(r["profession"]),
                      lambda r: gender(r["gender"]))),
    ),
    tuple(PROFESSIONS), "accuracy", group_name="gender",
    description="BiasBios occupation classification (28 professions); TPR-GAP by gender",
))  # fmt: skip
register(Task(
    "ghc",
    (
        Schema("reference", ("text", "label"),
               single("text", lambda r: as_label(r["label"], BINARY))),
        Schema("released", ("text", "hd", "cv"),
               single("text", lambda r: "1" if flag(r["hd"]) or flag(r["cv"]) else "0")),
    ),
    ("0", "1"), "macro_f1", {"1": 10.0}, positive="1",
    description="Gab Hate Corpus: hate = hd or cv (Kennedy et al. 2020); FPRD",
))  # fmt: skip
STORMFRONT = {"0": "0", "1": "1", "nohate": "0", "hate": "1"}
register(Task(
    "stormfront",
    (Schema("released", ("text", "label"),
            single("text", lambda r: as_label(str(r["label"]).lower(), STORMFRONT))),),
    ("0", "1"), "macro_f1", {"1": 6.7}, positive="1",
    description="Stormfront hate speech (de Gibert et al. 2018): hate/noHate",
))  # fmt: skip
LHC = {"0": "0", "1": "1", "normal": "0", "nothate": "0", "none": "0", "hate": "1",
       "offensive": "1"}  # fmt: skip
register(Task(
    "lhc",
    (Schema("binary", ("text", "label"),
            single("text", lambda r: as_label(str(r["label"]).lower(), LHC))),),
    ("0", "1"), "macro_f1", positive="1",
    description="Large Hate Corpus (Toraman et al. 2022), binary: hate or offensive = 1",
))  # fmt: skip
IPTTS = {"BAD": "1", "NOT_BAD": "0"}
register(Task(
    "iptts",
    (Schema("madlibs", ("Text", "Label"), single("Text", lambda r: as_label(r["Label"], IPTTS))),),
    ("0", "1"), "macro_f1", positive="1",
    description="IPTTS identity-phrase templates (Dixon et al. 2018): for FPRD_IPTTS",
))  # fmt: skip
register(Task(
    "fdcl",
    (Schema("zhou", ("text", "ND_label", "t"),
            single("text", lambda r: as_label(r["ND_label"]), lambda r: str(r["t"]))),),
    None, "macro_f1", group_name="dialect",
    description="FDCL18 as released by Zhou et al. 2021: ND_label, dialect t",
))  # fmt: skip
NLI = {"entailment": "entailment", "neutral": "neutral", "contradiction": "contradiction",
       "0": "entailment", "1": "neutral", "2": "contradiction"}  # fmt: skip
register(Task(
    "mnli",
    (Schema("pairs", ("premise", "hypothesis", "label"),
            lambda r: (r["premise"], r["hypothesis"], as_label(r["label"], NLI), None)),),
    NLI_LABELS, "accuracy",
    description="MultiNLI premise/hypothesis pairs (3 classes)",
))  # fmt: skip
register(Task(
    "bias_nli",
    (Schema("probes", ("premise", "hypothesis"),
            lambda r: (r["premise"], r["hypothesis"], "neutral", r.get("group"))),),
    NLI_LABELS, "accuracy", group_name="gender",
    description="Bias-NLI probes (Dev et al. 2020), generated: fraction neutral (FN)",
))  # fmt: skip


def get(name: str) -> Task:
    if name not in REGISTRY:
        raise DataError(f"unknown task {name!r}; the registry has {sorted(REGISTRY)}")
    return REGISTRY[name]


def detect_schema(task: Task, fields: Sequence[str], source: str | Path) -> Schema:
    for schema in task.schemas:
        if all(c in fields for c in schema.columns):
            return schema
    wanted = " or ".join(f"({', '.join(s.columns)})" for s in task.schemas)
    raise DataError(
        f"{source}: the columns {list(fields)} match no {task.name} schema; expected {wanted}"
    )


def load_split(
    task: Task, source: str | Path, labels: Sequence[str] | None = None
) -> list[Example]:
    """All examples of one file, validated against the task's schema and label set."""
    rows = read_records(source)
    fields = [k for k in rows[0] if k != "__line__"]
    schema = detect_schema(task, fields, source)
    label_set = set(labels if labels is not None else task.labels or ())
    examples = []
    for number, record in enumerate(rows):
        for column in schema.columns:
            if record.get(column) is None:
                raise DataError(f"{where(record, source)}: field {column!r} is missing")
        try:
            text, pair, label, group = schema.convert(record)
        except ValueError as err:
            raise DataError(f"{where(record, source)}: {err}") from None
        if label_set and label not in label_set:
            raise DataError(
                f"{where(record, source)}: label {label!r} is not in the {task.name} label set "
                f"{sorted(label_set)}"
            )
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where(record, source)}: field {schema.columns[0]!r} has no text")
        examples.append(Example(text, label, pair, group, str(record.get("id", number))))
    return examples


CLASS_WEIGHT_MODES = ("auto", "reference", "none")


def class_weights(
    task: Task, labels: Sequence[str], train: Sequence[Example], setting: str, key: str
) -> dict[str, float]:
    """Loss weight per label. "auto": for tasks the reference re-weights (GHC, Stormfront),
    the largest class count of this training split over each label's count (balanced
    splits get 1 everywhere), else 1; "reference": the reference code's fixed weights (GHC
    hate 10, Stormfront 6.7); "none": 1; or explicit "label=weight,..." (others 1)."""
    if setting == "none" or (setting == "auto" and not task.class_weights):
        return {label: 1.0 for label in labels}
    if setting == "reference":
        return {label: float(task.class_weights.get(label, 1.0)) for label in labels}
    if setting == "auto":
        counts = Counter(e.label for e in train)
        most = max(counts.values())
        return {label: most / counts[label] if counts[label] else 1.0 for label in labels}
    weights = {label: 1.0 for label in labels}
    for part in setting.split(","):
        label, sep, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not sep or label.strip() not in weights or not weight > 0 or weight == float("inf"):
            raise ConfigError(
                f"{key}={setting!r}: expected one of {CLASS_WEIGHT_MODES} or 'label=weight,...' "
                f"with labels from {list(labels)} and finite positive weights"
            )
        weights[label.strip()] = weight
    return weights


def label_set(task: Task, train: Sequence[Example]) -> tuple[str, ...]:
    """The task's labels, or (label set None) the sorted labels of the train split."""
    return task.labels if task.labels is not None else tuple(sorted({e.label for e in train}))


def bias_nli_probes(
    occupations: Sequence[str],
    gendered_words: Sequence[str],
    templates: Sequence[tuple[str, str]] = (
        ("ate", "a bagel"),
        ("bought", "a car"),
        ("owns", "a house"),
        ("drove", "a truck"),
        ("crashed", "a car"),
    ),
) -> list[Example]:
    """Dev et al.'s gender-occupation probes: premise "The <occupation> <verb> <object>.",
    hypothesis "The <gendered word> <verb> <object>."; a fair model predicts neutral.
    (The verb/object list here is ours; Dev et al. used a larger one.)"""
    probes = []
    for job, word, (verb, obj) in itertools.product(occupations, gendered_words, templates):
        probes.append(
            Example(
                f"The {job} {verb} {obj}.",
                "neutral",
                f"The {word} {verb} {obj}.",
                word,
                f"{job}|{word}|{verb}",
            )
        )
    return probes


def read_word_file(path: str | Path) -> list[str]:
    """One word or phrase a line (the Bias-NLI occupation / gendered-word lists)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: word list not found")
    words = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not words:
        raise DataError(f"{path}: empty word list")
    return words
