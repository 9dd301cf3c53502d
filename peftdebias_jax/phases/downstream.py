"""The downstream phase: encoder + frozen patch(es) + classifier, fine-tuned on a task.

downstream = encoder + loaded patches (frozen) -> task data -> fit(classification step)
-> best checkpoint by the task's metric -> predictions and extrinsic metrics. FT (no
patch; `baseline` runs it beside a patched run), Full-Debias (a dense CDA-trained base),
transfer (this run's patch on another task of its axis, or a patch from another run in
`downstream.patches`) and the mask modes of `downstream.trainable` are configurations of
this one phase.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from peftdebias_jax import checkpoint, files, masks, peft, processes, trainable_sets
from peftdebias_jax.data import pipeline, splits, tasks
from peftdebias_jax.errors import ConfigError
from peftdebias_jax.evaluation.scoring import score_split
from peftdebias_jax.importance import fisher
from peftdebias_jax.phases import common
from peftdebias_jax.phases.common import build_model, sub_run, tokenizer_for
from peftdebias_jax.training import steps
from peftdebias_jax.training.loop import FitSettings, Selection, fit
from peftdebias_jax.training.state import TrainState
from peftdebias_jax.training.trainer import Optimizer, build_trainer

log = logging.getLogger(__name__)

# the phase's resumable checkpoints, and the best step's trainable weights when the best
# is not the last step (`best_trainable`)
TRAIN_DIR = Path("checkpoints") / "downstream"
BEST_DIR = Path("checkpoints") / "downstream_best"


def patch_dirs(config: ml_collections.ConfigDict, workdir: Path) -> list[Path]:
    """downstream.patches; empty = this workdir's upstream patch when the run has one."""
    if config.downstream.patches:
        return [Path(p) for p in config.downstream.patches]
    has_patch = config.patch.method != "none" and "upstream" in config.phases
    return [workdir / "patch"] if has_patch else []


def hf_module_name(path: tuple[str, ...]) -> str:
    """bert/encoder/layer_3/output/dense/kernel -> bert.encoder.layer.3.output.dense"""
    return ".".join(p.replace("layer_", "layer.") for p in path[:-1])


def attach_lowrank(workdir: Path, module, params) -> tuple[Any, dict]:
    """The fisher_lowrank phase's factors as a LoRA-shaped patch named "lowrank" (scale 1)
    on each target, whose kernel becomes zeros (replace) or W - A B (residual)."""
    stored = checkpoint.load_tree(workdir / "lowrank")["factors"]
    record = json.loads((workdir / "fisher.json").read_text())
    paths = [tuple(p.split("/")) for p in record["paths"]]
    names = "|".join(re.escape(hf_module_name(p)) for p in paths)
    spec = peft.PatchConfig("lora", r=record["rank"], alpha=record["rank"], target_modules=names)
    module = checkpoint.with_patch(module, trainable_sets.LOWRANK, spec)
    kernels, leaves = dict(traverse_util.flatten_dict(params)), {}
    for path, factors in zip(paths, stored, strict=True):
        scope = (*path[:-1], f"lora_{trainable_sets.LOWRANK}")
        leaves[(*scope, "lora_A")] = np.asarray(factors["down"])
        leaves[(*scope, "lora_B")] = np.asarray(factors["up"])
        kernels[path] = jnp.asarray(factors["kernel"], kernels[path].dtype)
    params = traverse_util.unflatten_dict(kernels)
    leaves = traverse_util.unflatten_dict(leaves)
    return module, checkpoint.insert_leaves(module, params, leaves, workdir / "lowrank")


def ewc_regularizer(workdir: Path, lam: float):
    """(A4) on the effective target weights W_eff = kernel + A B against the original W*,
    weighted by the neutralized importance (fisher_lowrank's outputs)."""
    stored = checkpoint.load_tree(workdir / "lowrank")["factors"]
    importance = traverse_util.flatten_dict(checkpoint.load_tree(workdir / "fisher")["importance"])
    paths = [
        tuple(p.split("/")) for p in json.loads((workdir / "fisher.json").read_text())["paths"]
    ]
    anchor = {p: jnp.asarray(f["original"]) for p, f in zip(paths, stored, strict=True)}
    weight = {p: jnp.asarray(importance[p]) for p in paths}

    def penalty(params: dict) -> jax.Array:
        flat = traverse_util.flatten_dict(params)
        effective = {}
        for path in paths:
            scope = (*path[:-1], f"lora_{trainable_sets.LOWRANK}")
            effective[path] = flat[path] + flat[(*scope, "lora_A")] @ flat[(*scope, "lora_B")]
        return fisher.ewc_penalty(effective, anchor, weight, lam)

    return penalty


def base_model_dir(config, workdir: Path) -> Path | None:
    """A dense CDA-trained base (Full-Debias): downstream.base_model, or this run's
    upstream `dense_model/` when its upstream is dense."""
    if config.downstream.base_model:
        return Path(config.downstream.base_model)
    if config.upstream.dense and "upstream" in config.phases:
        return workdir / "dense_model"
    return None


def downstream(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, Any]:
    """Fine-tunes, keeps the best validation checkpoint, predicts and scores."""
    dn = config.downstream
    done = workdir / "downstream.done.json"
    if files.exists_for_all(done):
        log.info("downstream already finished (%s); delete it to run again", done)
        return json.loads(done.read_text())
    task = tasks.get(dn.task)
    data = splits.load_task_data(config, task)
    labels = data["labels"]
    base = base_model_dir(config, workdir)
    texts = [e.text for e in data["train"]]
    tokenizer = tokenizer_for(config, workdir, texts, base=base)
    module, params = build_model(config, "classifier", len(labels), tokenizer=tokenizer, base=base)
    module, params, frozen_entries = checkpoint.load_patches(
        patch_dirs(config, workdir), module, params
    )
    regularizer = None
    if dn.trainable == "lowrank":
        module, params = attach_lowrank(workdir, module, params)
        if config.fisher.ewc_lambda:
            regularizer = ewc_regularizer(workdir, config.fisher.ewc_lambda)
    trainable = trainable_sets.trainable_set(config, workdir, module, params)
    label_tree = masks.labels(params, trainable.rules)
    # a sparse (SFT) patch: its entries stay as loaded; a trainable set's entry masks
    trainable_entries = dict(trainable.entries or {})
    for path, frozen in frozen_entries.items():
        trainable_entries[path] = trainable_entries.get(path, True) & ~frozen
    trainable_entries = trainable_entries or None
    print(masks.summary(params, label_tree, trainable_entries))

    pad = tokenizer.pad_token_id
    train_ids, train_types, train_y = splits.encode_examples(
        tokenizer, data["train"], labels, dn.max_len
    )
    updates = dn.num_steps or dn.epochs * -(-len(train_ids) // dn.batch_size)
    class_weights = tasks.class_weights(task, labels, data["train"], dn.class_weights,
                                        "config.downstream.class_weights")  # fmt: skip
    log.info("downstream class weights (%s): %s", dn.class_weights, class_weights)
    weights = np.asarray([class_weights[name] for name in labels], np.float32)[train_y]
    if dn.pack:
        common.check_packable(module, "config.downstream.pack")
        num_steps = updates  # packed epochs hold every example once: ceil(n / batch) batches
    else:
        batches = pipeline.Batches(train_ids, dn.batch_size, dn.max_len, pad, config.seed,
                                   train_types, train_y, dn.bucket_run_length, dn.bucket_count,
                                   **common.bucket_costs(dn, train_ids, updates),
                                   weights=weights)  # fmt: skip
        num_steps = dn.num_steps or dn.epochs * len(batches.training_epoch(0))
    settings = FitSettings.of(dn, num_steps, "downstream", "config.downstream")

    def make_step(tx, axis_name):
        return steps.make_classification_train_step(module, tx, label_tree, axis_name,
                                                    regularizer)  # fmt: skip

    trainer = build_trainer(
        params, label_tree, Optimizer(dn.learning_rate, num_steps, dn.clip_norm), make_step,
        seed=config.seed, mode=config.parallel.mode,
        compile_ahead=config.parallel.compile_ahead, batch_size=dn.batch_size,
        batch_key="config.downstream.batch_size", name="downstream",
        entries=trainable_entries,
    )  # fmt: skip
    runner = trainer.runner
    if dn.pack:
        batches = common.packed_batches(dn, "downstream", train_ids, pad, config.seed, num_steps,
                                        runner.rows_multiple, train_types, train_y,
                                        weights)  # fmt: skip
    predict_step = runner.compile(steps.make_predict_step(module), "predict step", donate=False)
    runner.check_rows(dn.eval_batch_size, "config.downstream.eval_batch_size")

    def prepare(examples, allowed: list[int], passes: int):
        """A scored set, scored `passes` times. Packed (downstream.pack): packed rows of
        max_len, at most eval_batch_size a batch, one predict program. Otherwise
        evaluation-sized batches (fewer rows for a set too small to fill one per length) in
        those of the `allowed` lengths worth their predict program's compile
        (common.scoring_lengths)."""
        ids, types, ys = splits.encode_examples(tokenizer, examples, labels, dn.max_len)
        if dn.pack:
            return common.packed_scoring(dn, ids, pad, runner.rows_multiple, types, ys)
        rows = pipeline.evaluation_rows(len(ids), dn.eval_batch_size, len(allowed),
                                        runner.rows_multiple)  # fmt: skip
        lengths = common.scoring_lengths(dn, ids, allowed, rows, passes)
        return pipeline.Batches(ids, rows, dn.max_len, pad, 0, types, ys, lengths=lengths)

    def predict(device_state, prepared) -> np.ndarray:
        predicted = np.zeros(len(prepared.sequences), np.int32)
        eval_rows = runner.local_rows(prepared.batch_size)
        for spec in prepared.evaluation():
            batch = prepared.materialize(spec, eval_rows)
            logits = runner.gather_rows(predict_step(device_state, runner.put_batch(batch)))
            examples, scored = prepared.per_example(spec, logits)
            predicted[examples] = np.argmax(scored, axis=-1)
        return predicted

    # tokenized once, scored at every evaluation; the other sets reuse its predict programs
    validation = prepare(data["validation"], batches.lengths, settings.evaluations)

    # the validation predictions of the newest evaluation and of the best one: the best
    # model's validation scores need no second pass when this process evaluated it
    predicted_at: dict[str, np.ndarray] = {}

    def evaluate(device_state) -> dict[str, float]:
        predicted_at["newest"] = predict(device_state, validation)
        scores = score_split(task, labels, data["validation"], predicted_at["newest"],
                             dn.groups)  # fmt: skip
        return {"eval_accuracy": scores["accuracy"], "eval_macro_f1": scores["macro_f1"]}

    best_dir = workdir / BEST_DIR

    def on_best(host_state: TrainState, step: int, results: dict) -> None:
        if step < num_steps:  # the last step's weights are the phase's final checkpoint
            checkpoint.save_tree(best_dir, masks.split(host_state.params, label_tree)[0])
        predicted_at["best"] = predicted_at["newest"]
        log.info("downstream: new best %s at step %d", results, step)

    metric = "eval_accuracy" if task.selection == "accuracy" else "eval_macro_f1"
    final, selection = fit(
        state=trainer.state,
        label_tree=label_tree,
        runner=runner,
        train_step=trainer.train_step,
        batches=batches,
        settings=settings,
        checkpoint_dir=workdir / TRAIN_DIR,
        metrics_path=workdir / "metrics.jsonl",
        evaluate=evaluate,
        selection=Selection(metric, "max"),
        on_best=on_best,
    )
    if selection.best_step == num_steps:
        best = final
        if best_dir.exists() and processes.is_writer():  # an earlier best, now beaten
            shutil.rmtree(best_dir)
    else:
        trainable = checkpoint.load_tree(best_dir)
        best = final.replace(
            params=masks.merge(trainable, masks.split(final.params, label_tree)[1])
        )
    device_state = runner.put_state(best)
    results: dict[str, Any] = {
        "task": task.name, "labels": list(labels), "selection": selection.to_record(),
        "steps": num_steps, "sampled": data["sampled"],
        "class_weights": {"setting": dn.class_weights, "weights": class_weights},
    }  # fmt: skip
    evaluations = {"validation": (task, data["validation"])}
    if "test" in data:
        evaluations["test"] = (task, data["test"])
    evaluations.update(data["extra"])
    files.make_directory(workdir / "predictions")
    for name, (split_task, examples) in evaluations.items():
        if name != "validation":
            predicted = predict(device_state, prepare(examples, validation.lengths, 1))
        elif "best" in predicted_at:
            predicted = predicted_at["best"]
        else:  # the best model was evaluated by an earlier process (a resumed run)
            predicted = predict(device_state, validation)
        results[name] = score_split(split_task, labels, examples, predicted, dn.groups,
                                    common.bootstrap_settings(config))  # fmt: skip
        write_predictions(workdir / "predictions" / f"{name}.jsonl", examples, labels, predicted)
    files.write_json(done, results)
    files.write_json(workdir / "downstream_results.json", results)
    print_results(results)
    return results


def best_trainable(workdir: Path, results: dict[str, Any]) -> Any:
    """The trainable weights of a finished downstream phase's best step (`results`: its
    downstream_results.json): `checkpoints/downstream_best/`, or the final checkpoint when
    the last evaluation was the best (those weights are not written twice)."""
    step = results["selection"]["step"]
    if step == results["steps"]:
        return checkpoint.saved_state(Path(workdir) / TRAIN_DIR, step)["params"]
    return checkpoint.load_tree(Path(workdir) / BEST_DIR)


def baseline(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """The FT baseline beside a patched run: the same downstream task, data, seed and model
    with no patch, in `workdir/baseline/`, so one run reports the bias under plain
    fine-tuning next to its size with the patch."""
    plain, sub = sub_run(config, workdir, "baseline")
    plain.patch.method = "none"
    plain.upstream.dense = False
    plain.downstream.patches = ()
    plain.downstream.base_model = ""
    plain.downstream.trainable = "all"
    plain.phases = ("downstream",)
    files.write_json(sub / "config.json", plain.to_dict())
    return downstream(plain, sub)


def transfer(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """This run's patch(es), frozen while fine-tuning on another task of the axis
    (`config.transfer`: its task and data files; the downstream section's other settings),
    in `workdir/transfer/`, beside FT on that task in `workdir/transfer/baseline/`: the
    paper's transfer rows (a patch learned on one dataset, used on another)."""
    patches = patch_dirs(config, workdir)
    if not patches:
        raise ConfigError(
            "the transfer phase moves this run's patch to config.transfer.task, and the run "
            "has none: add the upstream phase, or set config.downstream.patches"
        )
    _, sub = sub_run(config, workdir, "transfer")
    moved = transfer_config(config, patches)
    files.write_json(sub / "config.json", moved.to_dict())
    results = downstream(moved, sub)
    baseline(moved, sub)
    return results


def transfer_config(
    config: ml_collections.ConfigDict, patches: list[Path] | tuple = ()
) -> ml_collections.ConfigDict:
    """The transfer phase's downstream run: config.transfer's task and data files, the
    given patches frozen, no extra evaluation sets."""
    moved = config.copy_and_resolve_references()
    moved.downstream.task = config.transfer.task
    for key in ("train_file", "validation_file", "test_file"):
        setattr(moved.downstream, key, getattr(config.transfer, key))
    moved.downstream.patches = tuple(str(p) for p in patches)
    moved.downstream.extra_evals = ()
    moved.phases = ("downstream",)
    return moved


def write_predictions(path: Path, examples, labels, predicted: np.ndarray) -> None:
    lines = [
        json.dumps({
            "index": i, "id": example.id, "text": example.text,
            "text_pair": example.text_pair, "gold": example.label,
            "predicted": labels[int(p)], "group": example.group,
        }) + "\n"
        for i, (example, p) in enumerate(zip(examples, predicted, strict=True))
    ]  # fmt: skip
    files.write_text(path, "".join(lines))


def print_results(results: dict[str, Any]) -> None:
    keys = ("accuracy", "macro_f1", "tpr_gap", "fprd_reference", "fprd_dixon", "fn")
    print(f"{'split':<12}" + "".join(f"{k:>16}" for k in keys))
    for name, scores in results.items():
        if isinstance(scores, dict) and "accuracy" in scores:
            row = "".join(
                f"{scores[k]:>16.3f}" if isinstance(scores.get(k), float) else f"{'-':>16}"
                for k in keys
            )
            print(f"{name:<12}{row}")
