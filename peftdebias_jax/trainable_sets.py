"""What trains in each phase, as mask rules from the config: the upstream patch (and MLM
head), and the registered trainable sets of fine-tuning (`downstream.trainable`), to which
a fork adds its own with `@TRAINABLE_SETS.register(name)`."""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections

from peftdebias_jax import masks
from peftdebias_jax.errors import ConfigError
from peftdebias_jax.importance import bias_scores
from peftdebias_jax.models import EncoderModel
from peftdebias_jax.registry import Registry

# The patch name the fisher_lowrank factors are attached under downstream.
LOWRANK = "lowrank"


def upstream_rules(config, module: EncoderModel, patch_name: str) -> list[tuple[str, str]]:
    rules = [(masks.patch_regex(patch_name), "train")]
    if config.upstream.train_mlm_head:
        rules += masks.mlm_head_rules(module.config.model_type)
    return [*rules, (".*", "freeze")]


# Trainable sets of the fine-tuning run (`downstream.trainable`): each gets the config, the
# workdir, the module, its params and the rules that freeze the loaded patches, and returns
# every rule (or a masks.Trainable with per-entry masks too).
TRAINABLE_SETS = Registry(
    "trainable set", "config.downstream.trainable",
    "peftdebias_jax.trainable_sets.TRAINABLE_SETS",
)  # fmt: skip


@TRAINABLE_SETS.register("all")
def train_all(
    config: ml_collections.ConfigDict, workdir: Path, module, params: dict, patch_rules: list
) -> list:
    """Everything but the patches; LayerNorms frozen as the reference unless
    `downstream.freeze_layernorm` is off."""
    norms = masks.LAYER_NORM_RULES if config.downstream.freeze_layernorm else []
    return [*patch_rules, *norms, (".*", "train")]


@TRAINABLE_SETS.register("bitfit")
def train_biases(
    config: ml_collections.ConfigDict, workdir: Path, module, params: dict, patch_rules: list
) -> list:
    """BitFit: every bias + the pooler bias + the classifier."""
    return [*patch_rules, *bias_scores.rules(None)]


@TRAINABLE_SETS.register("beft")
def train_bias_type(
    config: ml_collections.ConfigDict, workdir: Path, module, params: dict, patch_rules: list
) -> list:
    """BEFT: one bias type (b_v in mode v2_direct, the bias_select phase's choice in
    v1_select) + the same head as BitFit."""
    return [*patch_rules, *bias_scores.rules([selected_bias_type(config, workdir)])]


@TRAINABLE_SETS.register("lowrank")
def train_lowrank(
    config: ml_collections.ConfigDict, workdir: Path, module, params: dict, patch_rules: list
) -> list:
    """The fisher_lowrank factors, the head and the target biases."""
    rules = [r for r in patch_rules if r[0] != masks.patch_regex(LOWRANK)]
    return [(masks.patch_regex(LOWRANK), "train"), *rules, *bias_scores.HEAD_RULES,
            (".*", "freeze")]  # fmt: skip


def trainable_set(
    config: ml_collections.ConfigDict, workdir: Path, module, params: dict
) -> masks.Trainable:
    """What the fine-tuning run trains: every loaded patch frozen, then the registered
    trainable set `downstream.trainable` names."""
    patch_rules = [(masks.patch_regex(p.name), "freeze") for p in module.patches]
    chosen = TRAINABLE_SETS.lookup(config.downstream.trainable)
    result = chosen(config, workdir, module, params, patch_rules)
    return result if isinstance(result, masks.Trainable) else masks.Trainable(result)


BEFT_MODES = ("v2_direct", "v1_select")  # b_v directly; the bias_select phase's choice


def selected_bias_type(config: ml_collections.ConfigDict, workdir: Path) -> str:
    """b_v for BEFT v2; the type bias_scores.json names for v1 (the bias_select phase)."""
    if config.beft.mode == "v2_direct":
        return "b_v"
    if config.beft.mode not in BEFT_MODES:
        raise ConfigError(f"config.beft.mode must be 'v2_direct' or 'v1_select', got "
                          f"{config.beft.mode!r}")  # fmt: skip
    scores = workdir / "bias_scores.json"
    if not scores.exists():
        raise ConfigError(f"{scores} not found: BEFT v1 needs the bias_select phase first")
    return json.loads(scores.read_text())["selected"]
