"""Evaluation: extrinsic (task) fairness metrics; intrinsic benchmarks arrive later."""

from peftdebias_jax.evaluation.extrinsic import (
    GROUP_BIAS_WORDS,
    accuracy,
    demographic_parity_difference,
    equalized_odds_difference,
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
    "fprd",
    "fraction_neutral",
    "macro_f1",
    "tpr_gap",
]
