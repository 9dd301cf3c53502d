"""The bias_select phase (BEFT v1, MASKS.md B.3): every bias type scored per layer, the
top candidate picked -> bias_scores.json and plots/bias_scores.png."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import optax

from peftdebias_jax import files, masks
from peftdebias_jax.data import pipeline, splits, tasks
from peftdebias_jax.errors import ConfigError
from peftdebias_jax.importance import bias_scores as bs
from peftdebias_jax.phases.common import build_model, sub_run, tokenizer_for
from peftdebias_jax.phases.downstream import best_trainable, downstream

log = logging.getLogger(__name__)


def bias_select(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """BEFT v1 selection (MASKS.md B.3): scores every bias type per layer and picks the top
    candidate -> bias_scores.json and plots/bias_scores.png. Criteria "beft" and
    "magnitude" compare an all-bias (BitFit) probe run, trained in `bias_probe/`, with the
    pre-trained biases; "fisher" scores mini-batch gradients at the pre-trained weights."""
    workdir = Path(workdir)
    out = workdir / "bias_scores.json"
    if out.exists():
        log.info("bias_select already finished (%s); delete it to run again", out)
        return json.loads(out.read_text())
    criterion = config.beft.criterion
    if criterion != bs.FISHER and criterion not in bs.CHANGE_SCORES:
        raise ConfigError(
            f"config.beft.criterion={criterion!r}: unknown; the criteria are {bs.criteria()} "
            "(add a change score with @peftdebias_jax.importance.bias_scores.CHANGE_SCORES"
            ".register(name))"
        )
    dn = config.downstream
    task = tasks.get(dn.task)
    data = splits.load_task_data(config, task)
    labels = data["labels"]
    if criterion == bs.FISHER:
        tokenizer = tokenizer_for(config, workdir, [e.text for e in data["train"]])
    else:
        probe, directory = sub_run(config, workdir, "bias_probe")
        probe.downstream.trainable, probe.phases = "bitfit", ("downstream",)
        probe_results = downstream(probe, directory)
        tokenizer = tokenizer_for(probe, directory)
    module, params = build_model(config, "classifier", len(labels), tokenizer=tokenizer)
    if criterion == bs.FISHER:
        label_tree = masks.labels(params, bs.rules(None))
        frozen = masks.split(params, label_tree)[1]

        def loss_fn(sub: dict, batch: dict) -> jax.Array:
            logits = module.apply({"params": masks.merge(sub, frozen)}, batch["input_ids"],
                                  batch["attention_mask"], batch["token_type_ids"])  # fmt: skip
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
            return jnp.sum(ce * batch["weight"]) / jnp.maximum(jnp.sum(batch["weight"]), 1.0)

        ids, types, ys = splits.encode_examples(tokenizer, data["train"], labels, dn.max_len)
        size = config.beft.fisher_batch_size
        batches = pipeline.Batches(ids, size, dn.max_len, tokenizer.pad_token_id, config.seed,
                                   types, ys)  # fmt: skip
        scores = bs.fisher_scores(
            loss_fn,
            params,
            lambda p: masks.split(p, label_tree)[0],
            (batches.materialize(spec) for spec in batches.evaluation()),
        )
    else:
        probe_best = best_trainable(directory, probe_results)
        scores = bs.change_scores(probe_best, params, criterion)
    candidates = config.beft.candidates
    record = bs.summary(scores, criterion, bs.select(scores, candidates), candidates)
    files.make_directory(workdir / "plots")
    bs.plot(record, workdir / "plots" / "bias_scores.png")
    files.write_json(out, record)
    log.info("bias_select: ranking %s; selected %s", record["ranking"], record["selected"])
    return record
