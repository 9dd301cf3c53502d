"""fit: the training loop both phases share.

Resumes from the latest checkpoint in the workdir (same batches, same randomness), logs
loss and throughput every `log_every` steps (metrics stay on the device in between),
evaluates every `eval_every` steps, keeps the best step by a chosen metric (calling
`on_best`, e.g. to save the patch), checkpoints every `checkpoint_every` steps, runs up to
`steps_per_call` batches of one length bucket in one compiled call (stopping at each of
those steps), and stops with an error naming the step if the loss or gradient norm stops
being finite; the last checkpoint saved before that is kept. SIGINT or SIGTERM stops it at
the end of the current compiled call with a checkpoint there (`interrupts.Interrupted`).
On resume an unreadable checkpoint is reported and the newest readable one used, and
metrics.jsonl loses the phase's records past the resumed step, so each step appears once.
Logged throughput counts training time only (evaluations and checkpoint saves are left out).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from peftdebias_jax import masks, processes
from peftdebias_jax.checkpoint import TrainCheckpoints
from peftdebias_jax.data.pipeline import Batches
from peftdebias_jax.errors import CheckpointError, ConfigError, PeftDebiasError, headline
from peftdebias_jax.training import interrupts
from peftdebias_jax.training.parallel import CompiledStep, Runner
from peftdebias_jax.training.progress import Progress
from peftdebias_jax.training.state import TrainState

log = logging.getLogger(__name__)


class TrainingDiverged(PeftDebiasError, FloatingPointError):
    """The loss or gradient norm became NaN or infinite."""


@dataclass
class Selection:
    """Keeps the best evaluation so far by `metric` ("min" or "max")."""

    metric: str
    mode: str = "min"
    best: float | None = None
    best_step: int | None = None

    def improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value < self.best if self.mode == "min" else value > self.best

    def to_record(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "best": self.best, "step": self.best_step}


@dataclass
class FitSettings:
    num_steps: int
    eval_every: int
    log_every: int = 10
    checkpoint_every: int = 1000
    name: str = "train"
    steps_per_call: int = 1  # steps run by one compiled call (steps.repeated)
    keep_checkpoints: int = 2  # the newest resumable checkpoints kept on disk
    source: str = "settings"  # where the values come from, for errors: "config.upstream"

    @classmethod
    def of(cls, section: Any, num_steps: int, name: str, source: str) -> FitSettings:
        """The cadence keys of a config section (`eval_every`, `log_every`,
        `checkpoint_every`, `steps_per_call`, `keep_checkpoints`: 2 when it has none)."""
        return cls(num_steps=num_steps, eval_every=section.eval_every,
                   log_every=section.log_every, checkpoint_every=section.checkpoint_every,
                   steps_per_call=section.steps_per_call, source=source, name=name,
                   keep_checkpoints=section.get("keep_checkpoints", 2))  # fmt: skip

    @property
    def evaluations(self) -> int:
        """How many times `fit` evaluates: every `eval_every` steps and at the last one."""
        return -(-self.num_steps // self.eval_every)

    def __post_init__(self) -> None:
        for key in ("eval_every", "log_every", "checkpoint_every", "steps_per_call",
                    "keep_checkpoints"):  # fmt: skip
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(
                    f"{self.source}.{key} must be a positive integer, got {value!r} "
                    f"({self.name} training)"
                )


class TrainClock:
    """Seconds of training since the last `mark`, less the runner's compiling in between."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.mark()

    def mark(self) -> None:
        self.began, self.compiled = time.perf_counter(), self.runner.compile_seconds

    def elapsed(self) -> float:
        compiling = self.runner.compile_seconds - self.compiled
        return time.perf_counter() - self.began - compiling


class MetricsLog:
    """Appends JSON lines (one per log or evaluation, with the phase name) to a file; only
    the writing process of a distributed run touches it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writer = processes.is_writer()

    def write(self, **values: Any) -> None:
        if not self.writer:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(values) + "\n")

    def cut_back(self, phase: str, step: int) -> None:
        """Drops `phase`'s records past `step` (and a torn last line): what a resumed run
        from `step` writes again."""
        if not self.writer or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("phase") != phase or int(record.get("step", 0)) <= step:
                kept.append(line)
        staged = self.path.with_name(self.path.name + ".tmp")
        staged.write_text("".join(f"{line}\n" for line in kept))
        staged.replace(self.path)


def restore_latest_readable(
    checkpoints: TrainCheckpoints, target: dict[str, Any], name: str
) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
    """(step, tree, record) of the newest checkpoint that restores; each unreadable newer
    one is reported. None when there is none; an error when none of them restores."""
    failures = []
    for step in sorted(checkpoints.all_steps(), reverse=True):
        try:
            tree, record = checkpoints.restore(step, target)
        except Exception as err:  # Orbax/tensorstore raise many kinds for a damaged file
            failures.append(f"step {step}: {headline(err)}")
            log.warning("%s: checkpoint of step %d in %s is unreadable (%s); trying an older "
                        "one", name, step, checkpoints.directory, failures[-1])  # fmt: skip
            continue
        for damaged in [s for s in checkpoints.all_steps() if s > step]:
            checkpoints.discard(damaged)  # training re-saves these steps
            log.warning("%s: removed the unreadable checkpoint of step %d", name, damaged)
        return step, tree, record
    if failures:
        raise CheckpointError(
            f"{checkpoints.directory}: no checkpoint of {name} restores ("
            + "; ".join(failures)
            + "). Delete that directory to train this phase from the start"
        )
    return None


def checkpoint_tree(state: TrainState, label_tree: Any, optimizer: bool = True) -> dict[str, Any]:
    """What a checkpoint stores: trainable params (frozen ones come from the base model),
    the optimizer state unless `optimizer` is False (no step follows a finished phase's
    last one: full fine-tuning's AdamW moments are twice its weights), step and rng."""
    trainable, _ = masks.split(state.params, label_tree)
    tree = {"params": trainable, "step": state.step, "rng": state.rng}
    return {**tree, "opt_state": state.opt_state} if optimizer else tree


def restore_into(state: TrainState, tree: dict[str, Any], label_tree: Any) -> TrainState:
    _, frozen = masks.split(state.params, label_tree)
    return state.replace(
        params=masks.merge(tree["params"], frozen),
        opt_state=tree.get("opt_state", state.opt_state),
        step=tree["step"],
        rng=tree["rng"],
    )


def steps_until_boundary(done: int, periods: list[int], settings: FitSettings) -> int:
    """Steps the next call runs: up to `steps_per_call`, never past a step that logs,
    evaluates or checkpoints, nor past the last one."""
    following = [(done // p + 1) * p for p in periods] + [settings.num_steps]
    return min(settings.steps_per_call, min(following) - done)


def fit(
    *,
    state: TrainState,
    label_tree: Any,
    runner: Runner,
    train_step: CompiledStep,
    batches: Batches,
    settings: FitSettings,
    checkpoint_dir: Path,
    metrics_path: Path,
    evaluate: Callable[[Any], dict[str, float]] | None = None,
    selection: Selection | None = None,
    on_best: Callable[[TrainState, int, dict[str, float]], None] | None = None,
) -> tuple[TrainState, Selection | None]:
    """Trains to `settings.num_steps`, resuming from `checkpoint_dir` if it holds a checkpoint.
    `train_step` is a `Runner.compile_repeated` step: it runs up to `steps_per_call` steps;
    after the first, the other length buckets' programs compile in the background."""
    checkpoints = TrainCheckpoints(checkpoint_dir, settings.keep_checkpoints)
    metrics_log = MetricsLog(metrics_path)
    epoch = index = 0
    restored = restore_latest_readable(
        checkpoints, checkpoint_tree(state, label_tree), settings.name
    )
    if restored is not None:
        latest, tree, record = restored
        if "opt_state" not in tree and latest < settings.num_steps:
            raise CheckpointError(
                f"{checkpoints.directory}: step {latest} finished this phase at its earlier "
                f"num_steps and keeps no optimizer state to train on to {settings.num_steps}; "
                f"set {settings.source}.num_steps={latest}, or delete that directory to "
                "train from the start"
            )
        state = restore_into(state, tree, label_tree)
        epoch, index = record["epoch"], record["index"]
        if selection is not None and record.get("selection"):
            saved = record["selection"]
            selection.best, selection.best_step = saved["best"], saved["step"]
        log.info("resuming %s from step %d (%s)", settings.name, latest, checkpoints.directory)
    start = int(state.step)
    metrics_log.cut_back(settings.name, start)
    if start >= settings.num_steps:
        log.info("%s already finished (%d steps)", settings.name, start)
        checkpoints.close()
        return state, selection

    began, compiled = time.perf_counter(), runner.compile_seconds
    device_state = runner.put_state(state)
    position = (epoch, index)
    progress = Progress(settings.num_steps, start, settings.name, quiet=not processes.is_writer())
    pending: list[tuple[int, int, Any]] = []  # (first step, count, stacked metrics)
    tokens = np.zeros(2)  # real and padded tokens trained on since the last flush (all rows)
    clock = TrainClock(runner)

    def flush(done: int) -> None:
        if not pending:
            return
        host = []  # (step, its metrics) for every step since the last flush
        for first, count, metrics in pending:
            values = jax.device_get(runner.get_metrics(metrics))
            host += [(first + i, {k: v[i] for k, v in values.items()}) for i in range(count)]
        for s, values in host:
            for key in ("loss", "grad_norm", "params_finite"):
                if key not in values:  # params_finite: only custom steps report it
                    continue
                value = float(values[key])
                if not math.isfinite(value) or (key == "params_finite" and value != 1.0):
                    kept = checkpoints.latest_step()
                    what = (
                        "updated parameters are not finite"
                        if key == "params_finite"
                        else (f"the {key} is {value}")
                    )
                    raise TrainingDiverged(
                        f"{settings.name}: {what} at step {s}; stopping. The last "
                        f"good checkpoint (step {kept}) is kept in {checkpoints.directory}"
                    )
        elapsed = clock.elapsed()
        clock.mark()
        loss = float(np.mean([float(v["loss"]) for _, v in host]))
        grad_norm = float(np.mean([float(v["grad_norm"]) for _, v in host]))
        rate = len(host) * runner.batch_size / elapsed if elapsed > 0 else 0.0
        real, padded = tokens * jax.process_count()  # each process counts its own rows
        metrics_log.write(
            phase=settings.name, step=done, loss=loss, grad_norm=grad_norm, examples_per_s=rate,
            real_tokens_per_s=real / elapsed if elapsed > 0 else 0.0,
            padding=1 - real / padded if padded else 0.0,
        )  # fmt: skip
        tokens[:] = 0
        progress.update(done, len(host) * runner.batch_size, loss=loss)
        pending.clear()

    periods = [settings.log_every, settings.checkpoint_every]
    periods += [settings.eval_every] if evaluate is not None else []
    done = start
    try:
        with interrupts.listening():
            while done < settings.num_steps:
                # the first step alone: its wait, compiling included, is what a user sees
                # before training runs at speed (the same program runs any count)
                limit = 1 if done == start else steps_until_boundary(done, periods, settings)
                specs, position = batches.next_call(*position, limit)
                count = len(specs)
                rows = runner.local_rows()
                batch_list = [batches.materialize(spec, rows) for spec in specs]
                tokens += [sum(int(b["attention_mask"].sum()) for b in batch_list),
                           sum(b["attention_mask"].size for b in batch_list)]  # fmt: skip
                stacked, counter = runner.put_batches(batch_list, settings.steps_per_call)
                device_state, metrics = train_step(device_state, stacked, counter)
                if done == start:
                    jax.block_until_ready(metrics)
                    waited = time.perf_counter() - began
                    log.info("%s: first step done %.1f s after the phase started, %.1f s of it "
                             "compiling", settings.name, waited,
                             runner.compile_seconds - compiled)  # fmt: skip
                    compile_ahead(train_step, runner, batches, device_state, position,
                                  settings, settings.num_steps - count - start)  # fmt: skip
                pending.append((done + 1, count, metrics))
                done += count
                last = done == settings.num_steps
                if done % settings.log_every == 0 or last:
                    flush(done)
                if evaluate is not None and (done % settings.eval_every == 0 or last):
                    flush(done)
                    results = evaluate(device_state)
                    metrics_log.write(phase=settings.name, step=done, **results)
                    log.info("%s step %d: %s", settings.name, done, results)
                    if selection is not None and selection.improves(results[selection.metric]):
                        selection.best, selection.best_step = results[selection.metric], done
                        if on_best is not None:
                            on_best(runner.get_state(device_state), done, results)
                    clock.mark()  # the next interval's rate counts training only
                signum = interrupts.take()
                if done % settings.checkpoint_every == 0 or last or signum is not None:
                    flush(done)
                    record = {
                        "epoch": position[0],
                        "index": position[1],
                        "selection": selection.to_record() if selection else None,
                        "optimizer": not last,
                    }
                    host_state = runner.get_state(device_state)
                    tree = checkpoint_tree(host_state, label_tree, optimizer=not last)
                    checkpoints.save(done, tree, record)
                    log.info("%s: checkpoint of step %d saved%s; %d kept, %.1f MB in %s",
                             settings.name, done, " (finished: no optimizer state)" if last else "",
                             len(checkpoints.all_steps()), checkpoints.disk_bytes() / 2**20,
                             checkpoints.directory)  # fmt: skip
                    clock.mark()
                if signum is not None:
                    raise interrupts.Interrupted(settings.name, done, signum)
    finally:
        runner.stop_background()
        progress.close()
        checkpoints.close()
    return runner.get_state(device_state), selection


def compile_ahead(
    train_step: CompiledStep,
    runner: Runner,
    batches: Batches,
    state: Any,
    position: tuple[int, int],
    settings: FitSettings,
    steps: int,
) -> None:
    """Queues the programs of the length buckets the next `steps` steps train on (in the
    order they come) for compiling in the background while the first ones train; with
    the runner's `compile_ahead` off, nothing (no example batches are built or placed)."""
    if not runner.compile_ahead:
        return
    for spec in batches.first_of_each_length(*position, steps):
        example = batches.materialize(spec, runner.local_rows())
        train_step.ahead(state, *runner.batch_specs([example], settings.steps_per_call))
