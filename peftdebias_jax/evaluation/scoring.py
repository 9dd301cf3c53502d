"""A scored split: a task's metrics for one set of predictions, with bootstrap intervals,
and paired intervals of the change between two runs scored on the same examples.

Units are the report's: accuracy and macro-F1 in %, TPR-GAP as `tpr_gap` (x100), FPRD as
a sum of rates, FN, DP and EO as rates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from peftdebias_jax.data.tasks import Task
from peftdebias_jax.evaluation import bootstrap, extrinsic
from peftdebias_jax.evaluation.bootstrap import Statistic

FPRD_VARIANTS = ("reference", "dixon")


def _scaled(statistic: Statistic, factor: float) -> Statistic:
    return lambda w: factor * statistic(w)


def negative_label(task: Task, labels: Sequence[str]) -> str:
    return next(label for label in labels if label != task.positive)


def binary_groups(task: Task, labels: Sequence[str], examples, grouping: str) -> list | None:
    """Group ids for DP/EO on binary tasks (dialect, or evaluation.extrinsic.GROUPINGS for
    hate tasks), None when the task has none or every example is in one group."""
    if len(labels) != 2 or (task.positive is None and task.group_name != "dialect"):
        return None
    groups = extrinsic.example_groups(examples, grouping)[0].tolist()
    return groups if len(set(groups)) > 1 else None


def statistics(
    task: Task, labels: Sequence[str], examples, predicted: Sequence[str], grouping: str = "auto"
) -> dict[str, Statistic]:
    """Each metric `score_split` reports for the split, as a bootstrap statistic over its
    examples (`predicted`: one label per example)."""
    gold = [e.label for e in examples]
    stats = {
        "accuracy": _scaled(extrinsic.accuracy_statistic(gold, predicted), 100.0),
        "macro_f1": _scaled(extrinsic.macro_f1_statistic(gold, predicted), 100.0),
    }
    if task.name == "bias_bios":
        with contextlib.suppress(ValueError):  # no class with both groups: score_split says
            stats["tpr_gap"] = extrinsic.tpr_gap_statistic(
                gold, predicted, [e.group for e in examples]
            )
    if task.positive is not None:
        texts, negative = [e.text for e in examples], negative_label(task, labels)
        for variant in FPRD_VARIANTS:
            try:
                stats[f"fprd_{variant}"] = extrinsic.fprd_statistic(
                    gold, predicted, texts, variant=variant, negative=negative,
                    positive=task.positive,
                )  # fmt: skip
            except ValueError:
                continue  # no negative example: score_split records why
    if task.name == "bias_nli":
        stats["fn"] = extrinsic.fraction_neutral_statistic(predicted)
    groups = binary_groups(task, labels, examples, grouping)
    if groups is not None:
        positive = task.positive if task.positive is not None else labels[1]
        stats["demographic_parity"] = extrinsic.demographic_parity_statistic(
            predicted, groups, positive
        )
        stats["equalized_odds"] = extrinsic.equalized_odds_statistic(
            gold, predicted, groups, positive
        )
    return stats


def score_split(
    task: Task,
    labels: Sequence[str],
    examples,
    predicted: np.ndarray,
    grouping: str = "auto",
    settings: bootstrap.Settings | None = None,
) -> dict[str, Any]:
    """Task metrics and the task's extrinsic bias metrics of predicted class ids; with
    `settings`, each metric's percentile-bootstrap interval under "intervals"."""
    gold = [e.label for e in examples]
    pred = [labels[i] for i in predicted]
    out: dict[str, Any] = {
        "examples": len(examples),
        "accuracy": 100 * extrinsic.accuracy(gold, pred),
        "macro_f1": 100 * extrinsic.macro_f1(gold, pred),
    }
    if task.name == "bias_bios":
        try:
            gap = extrinsic.tpr_gap(gold, pred, [e.group for e in examples])
            out.update(tpr_gap=gap.rms, tpr_gaps=gap.gaps, tpr_gap_skipped=gap.skipped)
        except ValueError as err:  # a small split: the other metrics still stand
            out["tpr_gap_error"] = str(err)
    if task.positive is not None:
        texts, negative = [e.text for e in examples], negative_label(task, labels)
        for variant in FPRD_VARIANTS:
            try:
                result = extrinsic.fprd(gold, pred, texts, variant=variant, negative=negative,
                                        positive=task.positive)  # fmt: skip
            except ValueError as err:
                out[f"fprd_{variant}_error"] = str(err)
                continue
            out[f"fprd_{variant}"] = result.value
            out[f"fpr_{variant}_per_term"] = result.per_term
            out[f"fpr_{variant}_counts"] = result.counts
    if task.name == "bias_nli":
        out["fn"] = extrinsic.fraction_neutral(pred)
    groups = binary_groups(task, labels, examples, grouping)
    if groups is not None:
        positive = task.positive if task.positive is not None else labels[1]
        out["demographic_parity"] = extrinsic.demographic_parity_difference(pred, groups, positive)
        out["equalized_odds"] = extrinsic.equalized_odds_difference(gold, pred, groups, positive)
    if settings is not None:
        stats = statistics(task, labels, examples, pred, grouping)
        out["intervals"] = {
            name: bootstrap.interval(stat, len(examples), settings) for name, stat in stats.items()
        }
        out["bootstrap"] = settings.record()
    return out


def paired_intervals(
    task: Task,
    labels: Sequence[str],
    examples,
    predicted: Sequence[Sequence[str]],
    baseline: Sequence[Sequence[str]],
    grouping: str = "auto",
    settings: bootstrap.Settings = bootstrap.DEFAULT,
) -> dict[str, dict[str, Any]]:
    """The change mean(predicted runs) - mean(baseline runs) of each metric on the same
    examples (e.g. a patch against FT, one list entry per seed), with its paired bootstrap
    interval: {metric: {"difference": d, "interval": [low, high] or None}}."""
    ours = [statistics(task, labels, examples, p, grouping) for p in predicted]
    theirs = [statistics(task, labels, examples, p, grouping) for p in baseline]
    out = {}
    for name in ours[0]:
        if not all(name in s for s in (*ours, *theirs)):
            continue
        change = bootstrap.difference(
            bootstrap.mean_of([s[name] for s in ours]), bootstrap.mean_of([s[name] for s in theirs])
        )
        out[name] = {
            "difference": bootstrap.point(change, len(examples)),
            "interval": bootstrap.interval(change, len(examples), settings),
        }
    return out
