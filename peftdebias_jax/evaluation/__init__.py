"""Evaluation: extrinsic (task and fairness) metrics here; the intrinsic benchmarks
(CrowS-Pairs, StereoSet, SEAT) in `intrinsic`, the evaluate phase in `phase`."""

from peftdebias_jax.evaluation.extrinsic import (
    GROUP_BIAS_WORDS,
    accuracy,
    demographic_parity_difference,
    equalized_odds_difference,
    example_groups,
    fprd,
    fraction_neutral,
    macro_f1,
    tpr_gap,
)

__all__ = [
    "GROUP_BIAS_WORDS",
    "accuracy",
    "demographic_parity_difference",
    "equalized_odds_difference",
    "example_groups",
    "fprd",
    "fraction_neutral",
    "macro_f1",
    "tpr_gap",
]
