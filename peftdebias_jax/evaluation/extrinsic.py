"""Extrinsic (task) fairness metrics, each with its formula. Inputs are plain sequences.

A class or term that cannot be measured (no example of one group, no negative example)
is skipped and listed in the result's `skipped`, never divided by zero.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from peftdebias_jax.evaluation.bootstrap import Statistic, rate
from peftdebias_jax.registry import Registry

# The reference code's 54 identity terms for FPRD (METHOD.md §6.2).
GROUP_BIAS_WORDS = (
    "jewish",
    "christian",
    "muslim",
    "sikh",
    "buddhist",
    "hindu",
    "atheist",
    "torah",
    "bible",
    "quran",
    "gita",
    "synagogue",
    "church",
    "mosque",
    "temple",
    "monastery",
    "judaism",
    "christianity",
    "islam",
    "sikhism",
    "buddhism",
    "hinduism",
    "atheism",
    "allah",
    "god",
    "christ",
    "caucasian",
    "asian",
    "indian",
    "mexican",
    "american",
    "african",
    "european",
    "chinese",
    "hispanic",
    "black",
    "white",
    "brown",
    "africa",
    "america",
    "asia",
    "europe",
    "mexico",
    "india",
    "china",
    "gay",
    "lesbian",
    "straight",
    "homosexual",
    "asexual",
    "transgender",
    "trans",
    "queer",
    "bisexual",
)


def _check_lengths(*arrays: Sequence) -> int:
    lengths = {len(a) for a in arrays}
    if len(lengths) != 1:
        raise ValueError(f"inputs have different lengths: {sorted(lengths)}")
    (n,) = lengths
    if n == 0:
        raise ValueError("no examples to score")
    return n


def accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    """ACC = (1/N) sum_i 1[y_i = yhat_i]."""
    n = _check_lengths(y_true, y_pred)
    return sum(t == p for t, p in zip(y_true, y_pred, strict=True)) / n


def macro_f1(y_true: Sequence, y_pred: Sequence) -> float:
    """Macro-F1 as sklearn's f1_score(average="macro"): the mean over every class seen in
    y_true or y_pred of F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c) (0 when undefined)."""
    _check_lengths(y_true, y_pred)
    scores = []
    for c in sorted(set(y_true) | set(y_pred), key=str):
        tp = sum(t == c and p == c for t, p in zip(y_true, y_pred, strict=True))
        fp = sum(t != c and p == c for t, p in zip(y_true, y_pred, strict=True))
        fn = sum(t == c and p != c for t, p in zip(y_true, y_pred, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores)


@dataclass
class TprGap:
    """TPR-GAP = 100 * sqrt((1/|P|) sum_p Gap_p^2), Gap_p = TPR_{p,g0} - TPR_{p,g1}."""

    rms: float
    gaps: dict[Hashable, float]
    skipped: list[Hashable] = field(default_factory=list)


def tpr_gap(
    y_true: Sequence,
    y_pred: Sequence,
    groups: Sequence,
    pair: tuple[Hashable, Hashable] = ("m", "f"),
) -> TprGap:
    """Root-mean-square TPR gap between the two groups over the classes (METHOD.md §6.1):

        TPR_{p,g} = |{i: y_i = p, g_i = g, yhat_i = p}| / |{i: y_i = p, g_i = g}|
        Gap_p = TPR_{p,pair[0]} - TPR_{p,pair[1]}
        TPR-GAP = 100 * sqrt(mean_p Gap_p^2)

    Classes without an example of both groups are skipped and listed."""
    _check_lengths(y_true, y_pred, groups)
    gaps, skipped = {}, []
    for c in sorted(set(y_true), key=str):
        rates = []
        for g in pair:
            idx = [
                i
                for i, (t, gr) in enumerate(zip(y_true, groups, strict=True))
                if t == c and gr == g
            ]
            rates.append(sum(y_pred[i] == c for i in idx) / len(idx) if idx else None)
        if None in rates:
            skipped.append(c)
        else:
            gaps[c] = rates[0] - rates[1]
    if not gaps:
        raise ValueError(f"no class has examples of both groups {pair}")
    rms = 100.0 * math.sqrt(sum(g * g for g in gaps.values()) / len(gaps))
    return TprGap(rms, gaps, skipped)


@dataclass
class Fprd:
    """False-positive-rate difference: sum over terms of |F_term - F|."""

    value: float
    overall: float
    per_term: dict[str, float]
    counts: dict[str, int]
    skipped: list[str] = field(default_factory=list)


def fprd(
    y_true: Sequence,
    y_pred: Sequence,
    texts: Sequence[str],
    terms: Sequence[str] = GROUP_BIAS_WORDS,
    variant: str = "reference",
    negative: Hashable = 0,
    positive: Hashable = 1,
) -> Fprd:
    """FPRD in two variants (METHOD.md §6.2).

    variant="reference" (the reference code, reported by the paper):
        f_i = 1[y_i = negative and yhat_i = positive]
        F = (1/|D|) sum_i f_i over ALL examples;  D_t = {i: t is a substring of text_i}
        (case-sensitive, no word boundaries);  F_t = mean of f_i over D_t
        FPRD = sum over terms with |D_t| > 0 of |F_t - F|
    variant="dixon" (Dixon et al. 2018, FPED):
        FPR = FP / (FP + TN) over the negative examples;  D_t = negatives whose lower-cased
        text contains t as a whole word;  FPRD = sum_t |FPR_t - FPR|
    Terms with no example (no negative example for "dixon") are skipped and listed.
    """
    flags, pool, members = fprd_parts(y_true, y_pred, texts, terms, variant, negative, positive)
    overall = float(flags[pool].mean())
    per_term, counts, skipped = {}, {}, []
    for term, member in zip(terms, members, strict=True):
        if not member.any():
            skipped.append(term)
            continue
        per_term[term] = float(flags[member].mean())
        counts[term] = int(member.sum())
    value = sum(abs(rate - overall) for rate in per_term.values())
    return Fprd(value, overall, per_term, counts, skipped)


def fprd_parts(
    y_true: Sequence,
    y_pred: Sequence,
    texts: Sequence[str],
    terms: Sequence[str],
    variant: str,
    negative: Hashable,
    positive: Hashable,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-positive flag per example, the pool F is taken over, one row per term of the
    pool examples that count for it): what `fprd` and its bootstrap statistic share."""
    _check_lengths(y_true, y_pred, texts)
    if variant not in ("reference", "dixon"):
        raise ValueError(f"variant must be 'reference' or 'dixon', got {variant!r}")
    flags = np.array([t == negative and p == positive for t, p in zip(y_true, y_pred, strict=True)])
    if variant == "reference":
        pool = np.ones(len(flags), bool)
        members = np.array([[term in text for text in texts] for term in terms], bool)
    else:
        pool = np.array([t == negative for t in y_true], bool)
        lowered = [text.lower() for text in texts]
        patterns = [re.compile(rf"\b{re.escape(term.lower())}\b") for term in terms]
        members = np.array([[p.search(t) is not None for t in lowered] for p in patterns], bool)
        members &= pool
    if not pool.any():
        raise ValueError("no negative example: the false-positive rate is undefined")
    return flags, pool, members.reshape(len(terms), len(flags))


def fraction_neutral(y_pred: Sequence, neutral: Hashable = "neutral") -> float:
    """FN (Dev et al. 2020) = (1/M) sum_j 1[yhat_j = neutral] over the Bias-NLI probes."""
    n = _check_lengths(y_pred)
    return sum(p == neutral for p in y_pred) / n


def demographic_parity_difference(
    y_pred: Sequence, groups: Sequence, positive: Hashable = 1
) -> float:
    """DP = max_g P(yhat = positive | g) - min_g P(yhat = positive | g)."""
    _check_lengths(y_pred, groups)
    rates = []
    for g in sorted(set(groups), key=str):
        idx = [i for i, gr in enumerate(groups) if gr == g]
        rates.append(sum(y_pred[i] == positive for i in idx) / len(idx))
    return max(rates) - min(rates)


def equalized_odds_difference(
    y_true: Sequence,
    y_pred: Sequence,
    groups: Sequence,
    positive: Hashable = 1,
    variant: str = "max",
) -> float:
    """EO from the TPR and FPR spreads across groups, TPR_g = P(yhat = positive | y =
    positive, g), FPR_g = P(yhat = positive | y != positive, g): variant "max" (fairlearn)
    = max(TPR spread, FPR spread); "sum" = their sum (MASKS.md A.5); "half" = half the sum.
    Groups lacking positives (or negatives) are left out of that rate's spread."""
    if variant not in ("max", "sum", "half"):
        raise ValueError(f"variant must be 'max', 'sum' or 'half', got {variant!r}")
    _check_lengths(y_true, y_pred, groups)
    tprs, fprs = [], []
    for g in sorted(set(groups), key=str):
        pos = [
            i
            for i, (t, gr) in enumerate(zip(y_true, groups, strict=True))
            if gr == g and t == positive
        ]
        neg = [
            i
            for i, (t, gr) in enumerate(zip(y_true, groups, strict=True))
            if gr == g and t != positive
        ]
        if pos:
            tprs.append(sum(y_pred[i] == positive for i in pos) / len(pos))
        if neg:
            fprs.append(sum(y_pred[i] == positive for i in neg) / len(neg))
    spreads = [max(r) - min(r) for r in (tprs, fprs) if len(r) > 1]
    if not spreads:
        return 0.0
    return {"max": max(spreads), "sum": sum(spreads), "half": sum(spreads) / 2}[variant]


# --- bootstrap statistics: each metric above as a function of per-example resampling
# weights w, (resamples, n) -> (resamples,), for evaluation.bootstrap; at w = 1 each equals
# its metric (tested). Classes or terms a resample leaves empty are skipped as above.


def _indicators(values: Sequence, keys: Sequence) -> np.ndarray:
    """(len(keys), n) bool: row k marks the examples whose value is keys[k]."""
    return np.array([[v == k for v in values] for k in keys], bool).reshape(len(keys), -1)


def accuracy_statistic(y_true: Sequence, y_pred: Sequence) -> Statistic:
    _check_lengths(y_true, y_pred)
    correct = np.array([t == p for t, p in zip(y_true, y_pred, strict=True)])
    return lambda w: rate(w, correct, np.ones_like(correct))


def macro_f1_statistic(y_true: Sequence, y_pred: Sequence) -> Statistic:
    _check_lengths(y_true, y_pred)
    classes = sorted(set(y_true) | set(y_pred), key=str)
    true, pred = _indicators(y_true, classes), _indicators(y_pred, classes)

    def statistic(w: np.ndarray) -> np.ndarray:
        tp, fp, fn = (w @ (a & b).T.astype(float) for a, b in
                      ((true, pred), (~true, pred), (true, ~pred)))  # fmt: skip
        den = 2 * tp + fp + fn
        f1 = np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), np.nan)
        return np.nanmean(f1, axis=1)

    return statistic


def tpr_gap_statistic(
    y_true: Sequence, y_pred: Sequence, groups: Sequence, pair: tuple = ("m", "f")
) -> Statistic:
    _check_lengths(y_true, y_pred, groups)
    classes = sorted(set(y_true), key=str)
    true, pred = _indicators(y_true, classes), _indicators(y_pred, classes)
    first, second = (_indicators(groups, [g])[0] for g in pair)
    if not np.any((true & first).any(axis=1) & (true & second).any(axis=1)):
        raise ValueError(f"no class has examples of both groups {pair}")

    def statistic(w: np.ndarray) -> np.ndarray:
        gaps = rate(w, true & pred & first, true & first) - rate(
            w, true & pred & second, true & second
        )
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample with no class
            return 100.0 * np.sqrt(np.nanmean(gaps**2, axis=1))

    return statistic


def fprd_statistic(
    y_true: Sequence,
    y_pred: Sequence,
    texts: Sequence[str],
    terms: Sequence[str] = GROUP_BIAS_WORDS,
    variant: str = "reference",
    negative: Hashable = 0,
    positive: Hashable = 1,
) -> Statistic:
    flags, pool, members = fprd_parts(y_true, y_pred, texts, terms, variant, negative, positive)

    def statistic(w: np.ndarray) -> np.ndarray:
        overall = rate(w, flags[None], pool[None])
        return np.nansum(np.abs(rate(w, members & flags, members) - overall), axis=1)

    return statistic


def fraction_neutral_statistic(y_pred: Sequence, neutral: Hashable = "neutral") -> Statistic:
    hits = np.array([p == neutral for p in y_pred])
    return lambda w: rate(w, hits, np.ones_like(hits))


def _group_rates(w, hits, groups: np.ndarray) -> np.ndarray:
    return rate(w, groups & hits, groups)


def _spread(rates: np.ndarray) -> np.ndarray:
    """max - min over the defined rates per resample (NaN with fewer than two)."""
    defined = np.isfinite(rates).sum(1)
    high = np.where(np.isfinite(rates), rates, -np.inf).max(1)
    low = np.where(np.isfinite(rates), rates, np.inf).min(1)
    return np.where(defined > 1, high - low, np.nan)


def demographic_parity_statistic(
    y_pred: Sequence, groups: Sequence, positive: Hashable = 1
) -> Statistic:
    _check_lengths(y_pred, groups)
    member = _indicators(groups, sorted(set(groups), key=str))
    hits = np.array([p == positive for p in y_pred])
    return lambda w: _spread(_group_rates(w, hits, member))


def equalized_odds_statistic(
    y_true: Sequence, y_pred: Sequence, groups: Sequence, positive: Hashable = 1
) -> Statistic:
    """The "max" variant of `equalized_odds_difference` (0 where no spread is defined)."""
    _check_lengths(y_true, y_pred, groups)
    member = _indicators(groups, sorted(set(groups), key=str))
    hits = np.array([p == positive for p in y_pred])
    is_pos = np.array([t == positive for t in y_true])

    def statistic(w: np.ndarray) -> np.ndarray:
        spreads = np.stack([_spread(_group_rates(w, hits, member & is_pos)),
                            _spread(_group_rates(w, hits, member & ~is_pos))])  # fmt: skip
        return np.nan_to_num(np.fmax(spreads[0], spreads[1]), nan=0.0)

    return statistic


# How examples split into groups for DP/EO and the Fisher groups (`downstream.groups`):
# f(examples) -> one group name per example.
GROUPINGS = Registry(
    "grouping", "config.downstream.groups", "peftdebias_jax.evaluation.extrinsic.GROUPINGS"
)


@GROUPINGS.register("auto")
def attribute_or_identity_term(examples: Sequence) -> list[str]:
    """The examples' own attribute (`group`: gender, dialect; targeted or not in synthetic
    hate data) when every example has one; otherwise whether the text names an identity term
    of FPRD's list (a choice of this library for hate tasks, which carry no group column)."""
    if all(e.group is not None for e in examples):
        return [str(e.group) for e in examples]
    words = set(GROUP_BIAS_WORDS)
    return [
        "identity term present" if words & set(e.text.lower().split()) else "identity term absent"
        for e in examples
    ]


def example_groups(examples: Sequence, grouping: str = "auto") -> tuple[np.ndarray, list[str]]:
    """(group id per example, group names): the registered `grouping`'s names, sorted, as
    ids 0, 1, ..."""
    names_of = GROUPINGS.lookup(grouping)(examples)
    names = sorted(set(names_of))
    return np.asarray([names.index(n) for n in names_of]), names
