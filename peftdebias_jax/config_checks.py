"""Numeric settings checked before anything runs, each error naming its config key: a
batch size of 0 or a learning rate of nan fails here, not as a ZeroDivisionError deep in
a phase or a silently useless run."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import ml_collections

from peftdebias_jax.errors import ConfigError


def positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def non_negative_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def positive_finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def non_negative_finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value >= 0


def open_fraction(value: Any) -> bool:
    return isinstance(value, int | float) and 0 < value < 1


def half_open_fraction(value: Any) -> bool:
    return isinstance(value, int | float) and 0 <= value < 1


RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "positive_int": (positive_int, "a positive integer"),
    "non_negative_int": (non_negative_int, "an integer >= 0"),
    "positive_finite": (positive_finite, "a finite number > 0"),
    "non_negative_finite": (non_negative_finite, "a finite number >= 0"),
    "open_fraction": (open_fraction, "a number strictly between 0 and 1"),
    "half_open_fraction": (half_open_fraction, "a number in [0, 1)"),
}
SECTIONS = ("upstream", "downstream")
CADENCE = ("eval_every", "log_every", "checkpoint_every", "steps_per_call", "bucket_run_length")
CHECKS: dict[str, str] = {
    **{
        f"{s}.{k}": "positive_int"
        for s in (*SECTIONS, "pretrain")
        for k in ("batch_size", "max_len")
    },
    **{f"{s}.{k}": "positive_int" for s in SECTIONS for k in (*CADENCE, "synthetic_size")},
    "upstream.num_steps": "positive_int",
    "pretrain.num_steps": "positive_int",
    "pretrain.corpus_size": "positive_int",
    "downstream.epochs": "positive_int",
    "downstream.num_steps": "non_negative_int",
    "upstream.head_warmup_steps": "non_negative_int",
    "evaluate.batch_size": "positive_int",
    "parallel.startup_timeout": "positive_int",
    "upstream.keep_checkpoints": "positive_int",
    "downstream.keep_checkpoints": "positive_int",
    "upstream.bucket_count": "positive_int",
    "downstream.bucket_count": "positive_int",
    "upstream.bucket_compile_steps": "non_negative_finite",
    "downstream.bucket_compile_steps": "non_negative_finite",
    "downstream.pack_segments": "positive_int",
    "upstream.eval_batch_size": "positive_int",
    "downstream.eval_batch_size": "positive_int",
    "bootstrap.resamples": "non_negative_int",
    "upstream.learning_rate": "positive_finite",
    "downstream.learning_rate": "positive_finite",
    "pretrain.learning_rate": "positive_finite",
    "upstream.head_warmup_learning_rate": "positive_finite",
    "upstream.clip_norm": "non_negative_finite",
    "downstream.clip_norm": "non_negative_finite",
    "upstream.l1": "non_negative_finite",
    "upstream.mlm_probability": "open_fraction",
    "bootstrap.level": "open_fraction",
    "upstream.validation_fraction": "half_open_fraction",
    "downstream.validation_fraction": "half_open_fraction",
}


def lookup(config: ml_collections.ConfigDict, key: str) -> tuple[bool, Any]:
    node: Any = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_settings(config: ml_collections.ConfigDict) -> None:
    """Every numeric setting of CHECKS the config has, in range; all violations in one
    error (a fork's config without a key is not checked for it)."""
    wrong = []
    for key, rule in CHECKS.items():
        present, value = lookup(config, key)
        test, wanted = RULES[rule]
        if present and not test(value):
            wrong.append(f"config.{key} must be {wanted}, got {value!r}")
    if wrong:
        raise ConfigError("bad settings (nothing was run):\n  " + "\n  ".join(wrong))
