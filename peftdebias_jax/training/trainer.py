"""The one trainer builder: parameters + mask labels + optimizer settings + a step maker
-> the initial state, the runner and the compiled step that `fit` (or a benchmark) runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optax

from peftdebias_jax import masks
from peftdebias_jax.training.parallel import CompiledStep, Runner
from peftdebias_jax.training.state import TrainState, adamw

# (optimizer, runner's axis name or None) -> a pure step(state, batch) -> (state, metrics)
StepMaker = Callable[[optax.GradientTransformation, str | None], Callable]


@dataclass(frozen=True)
class Optimizer:
    """The reference optimizer's settings (clipping, then AdamW with a linear decay)."""

    learning_rate: float
    num_steps: int
    clip_norm: float | None


@dataclass(frozen=True)
class Trainer:
    """What `fit` needs besides data and settings."""

    state: TrainState
    label_tree: Any
    runner: Runner
    train_step: CompiledStep  # Runner.compile_repeated: up to steps_per_call steps per call
    tx: optax.GradientTransformation


def build_trainer(
    params: Any,
    label_tree: Any,
    optimizer: Optimizer,
    make_step: StepMaker,
    *,
    seed: int,
    mode: str,
    compile_ahead: bool = False,
    batch_size: int,
    batch_key: str,
    name: str,
    entries: dict | None = None,
    anchor: bool = False,
) -> Trainer:
    """Optimizer on the `train` leaves (only the True `entries` of masked leaves, when
    given), the state (with the trainable leaves' start as `anchor` for an L1 pull), the
    runner for `mode` (`batch_key` names the batch size in errors; `compile_ahead`: later
    buckets compile in the background) and the step compiled to run several steps per call."""
    tx = masks.optimizer(
        adamw(optimizer.learning_rate, optimizer.num_steps, optimizer.clip_norm), label_tree
    )
    if entries:
        tx = optax.chain(masks.entry_mask(entries), tx)
    start = masks.split(params, label_tree)[0] if anchor else None
    state = TrainState.create(params, tx, seed, start)
    runner = Runner(mode, batch_size, batch_key, compile_ahead)
    train_step = runner.compile_repeated(make_step(tx, runner.axis_name), f"{name} train step")
    return Trainer(state, label_tree, runner, train_step, tx)
