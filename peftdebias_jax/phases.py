"""The paper's phases composed from the library's parts, driven by one ml_collections config.

This version builds the configured model; the upstream, downstream and evaluate phases
are registered here as they land (see the README's status list).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections

from peftdebias_jax import models

log = logging.getLogger(__name__)

# phase name -> function(config, workdir); filled in as phases are implemented.
PHASES: dict[str, Callable[[ml_collections.ConfigDict, Path], None]] = {}


def default_workdir(config_filename: str) -> Path:
    """runs/<config name>[-<preset>] for --config=configs/<name>.py[:<preset>]."""
    path, _, preset = config_filename.partition(":")
    name = Path(path).stem
    return Path("runs") / (f"{name}-{preset}" if preset else name)


def build_model(
    config: ml_collections.ConfigDict,
    head: str = "mlm",
    num_labels: int | None = None,
    patches=(),
) -> tuple[models.EncoderModel, dict]:
    """The configured encoder: a pretrained checkpoint, or random weights (model.init)."""
    spec = config.model
    if spec.init == "random":
        arch = models.EncoderConfig(**spec.architecture.to_dict(), dtype=spec.dtype)
        return models.from_config(arch, head, num_labels, patches, seed=config.seed)
    if spec.init != "pretrained":
        raise ValueError(f"config.model.init must be 'pretrained' or 'random', got {spec.init!r}")
    return models.from_pretrained(
        spec.name, head, num_labels, patches, dtype=spec.dtype, seed=config.seed
    )


def count_params(params: dict) -> int:
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> None:
    """Prints the resolved config, writes it to the workdir, builds the model, runs phases."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    resolved = config.to_dict()
    print("resolved config:\n" + json.dumps(resolved, indent=2, default=str))
    (workdir / "config.json").write_text(json.dumps(resolved, indent=2, default=str) + "\n")
    module, params = build_model(config, head="mlm")
    cfg = module.config
    print(
        f"model: {config.model.name} ({cfg.model_type}, {cfg.num_hidden_layers} layers, "
        f"hidden {cfg.hidden_size}, {cfg.dtype}) || all params: {count_params(params):,}"
    )
    pending = [p for p in config.phases if p not in PHASES]
    for name in config.phases:
        if name in PHASES:
            PHASES[name](config, workdir)
    if pending:
        print(
            f"phases not available in this version: {', '.join(pending)} "
            "(the README's status list says what is implemented)"
        )
    print(f"workdir: {workdir}")
