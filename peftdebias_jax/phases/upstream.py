"""The upstream phase: encoder + new patch -> CDA corpus -> fit(masked-LM step) -> patch
directories (`patch/` best eval loss, `patch_final/` last step). Full-Debias (dense CDA
training) and SFT (dense, then sparse) are configurations of it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from peftdebias_jax import checkpoint, files, masks, models, trainable_sets
from peftdebias_jax.data import (
    cda,
    pipeline,
    records,
    sampling,
    stereotypes,
    synthetic,
)
from peftdebias_jax.data.mlm import special_ids_of
from peftdebias_jax.errors import ConfigError
from peftdebias_jax.peft import sft
from peftdebias_jax.phases.common import (
    bucket_costs,
    build_model,
    check_packable,
    count_params,
    packed_batches,
    packed_scoring,
    patch_spec,
    scoring_lengths,
    sub_run,
    tokenizer_for,
)
from peftdebias_jax.training import steps
from peftdebias_jax.training.loop import FitSettings, Selection, fit
from peftdebias_jax.training.state import TrainState
from peftdebias_jax.training.trainer import Optimizer, build_trainer

log = logging.getLogger(__name__)


def word_lists(config: ml_collections.ConfigDict) -> dict:
    """config.upstream.word_list: a bias_attribute_words.json path, or "builtin"."""
    if config.upstream.word_list == "builtin":
        return synthetic.WORD_LISTS
    return cda.load_word_lists(config.upstream.word_list)


def upstream_texts(config: ml_collections.ConfigDict) -> tuple[list[str], list[str], dict]:
    """(train, validation) texts and what the split caps kept; without a validation file a
    seeded fraction is held out. train_file "synthetic" renders a small templated corpus
    (smoke runs, demos); "stereotyped" the pretrain phase's biased kind of text."""
    up = config.upstream
    caps = sampling.check_caps(up.max_examples, "config.upstream.max_examples")
    if up.train_file == "synthetic":
        train = synthetic.corpus(config.axis, up.synthetic_size, config.seed)
    elif up.train_file == "stereotyped":  # the pretrain phase's kind of text, fresh sentences
        train = stereotypes.corpus(up.synthetic_size, config.pretrain.rate, config.seed + 1)
    else:
        train = records.texts(up.train_file, up.text_column or None)
    if up.validation_file:
        validation = records.texts(up.validation_file, up.text_column or None)
    else:
        order = np.random.default_rng(config.seed).permutation(len(train))
        held = max(1, round(len(train) * up.validation_fraction))
        train, validation = ([train[i] for i in sorted(order[held:])],
                             [train[i] for i in sorted(order[:held])])  # fmt: skip
    train, train_kept = sampling.cap(train, caps["train"], config.seed, "train")
    validation, kept = sampling.cap(validation, caps["validation"], config.seed, "validation")
    return train, validation, {"train": train_kept, "validation": kept}


def cda_sequences(config, tokenizer, texts: list[str], augmenter) -> list[np.ndarray]:
    """normalise -> CDA -> token ids; logs how many documents and sequences came out."""
    clean = pipeline.normalize(tokenizer, texts, config.upstream.max_len)
    augmented = pipeline.augment_all(clean, augmenter)
    log.info("CDA: %d documents -> %d sequences", len(texts), len(augmented))
    if not augmented:
        raise ConfigError(
            f"CDA left no sequence from {len(texts)} documents of {config.upstream.train_file} "
            f"(word list {config.upstream.word_list!r}, key {config.upstream.word_list_key!r})"
        )
    return pipeline.encode(tokenizer, augmented, config.upstream.max_len)


def train_mlm(
    config: ml_collections.ConfigDict,
    workdir: Path,
    model: tuple[models.EncoderModel, dict],
    label_tree: dict,
    tokenizer,
    sequences: tuple[list, list],
    name: str,
    on_best: Callable[[TrainState, int, dict], None],
    entries: dict | None = None,
) -> tuple[TrainState, Selection]:
    """One masked-LM training run of the upstream settings: AdamW on the trainable leaves
    (only the `entries` of masked leaves, when given), the L1 pull when `upstream.l1`,
    eval loss every `eval_every` steps, `on_best` at each new lowest eval loss, Orbax
    checkpoints under checkpoints/<name> (the same command resumes it)."""
    up = config.upstream
    module, params = model
    masking = steps.MaskingConfig(
        special_ids=special_ids_of(tokenizer),
        mask_id=tokenizer.mask_token_id,
        vocab_size=len(tokenizer),
        rate=up.mlm_probability,
    )

    def make_step(tx, axis_name):
        return steps.make_mlm_train_step(module, tx, label_tree, masking, axis_name, up.l1,
                                         count_params(params), up.max_predictions)  # fmt: skip

    trainer = build_trainer(
        params, label_tree, Optimizer(up.learning_rate, up.num_steps, up.clip_norm), make_step,
        seed=config.seed, mode=config.parallel.mode,
        compile_ahead=config.parallel.compile_ahead, batch_size=up.batch_size,
        batch_key="config.upstream.batch_size", name=name, entries=entries, anchor=bool(up.l1),
    )  # fmt: skip
    runner = trainer.runner
    eval_step = runner.compile(
        steps.make_mlm_eval_step(module, masking, runner.axis_name),
        f"{name} eval step",
        donate=False,
    )
    # compiled only if a batch selects more positions than the eval step's decoder caps
    exact_eval_step = runner.compile(
        steps.make_mlm_eval_step(module, masking, runner.axis_name, exact=True),
        f"{name} exact eval step",
        donate=False,
    )
    pad = tokenizer.pad_token_id
    train_seqs, eval_seqs = sequences
    if up.pack:
        check_packable(module, "config.upstream.pack")
        batches = packed_batches(up, name, train_seqs, pad, config.seed, up.num_steps,
                                 runner.rows_multiple)  # fmt: skip
    else:
        batches = pipeline.Batches(train_seqs, up.batch_size, up.max_len, pad, seed=config.seed,
                                   run_length=up.bucket_run_length, bucket_count=up.bucket_count,
                                   **bucket_costs(up, train_seqs, up.num_steps))  # fmt: skip
    runner.check_rows(up.eval_batch_size, "config.upstream.eval_batch_size")
    settings = FitSettings.of(up, up.num_steps, name, "config.upstream")
    if up.pack:  # the validation sequences packed too: one eval program, little padding
        eval_batches = packed_scoring(up, eval_seqs, pad, runner.rows_multiple)
    else:
        eval_lengths = scoring_lengths(up, eval_seqs, batches.lengths, up.eval_batch_size,
                                       settings.evaluations)  # fmt: skip
        eval_batches = pipeline.Batches(eval_seqs, up.eval_batch_size, up.max_len, pad,
                                        seed=config.seed, lengths=eval_lengths)  # fmt: skip
    eval_rows = runner.local_rows(eval_batches.batch_size)

    def evaluate(device_state) -> dict[str, float]:
        results = []
        for batch_spec in eval_batches.evaluation():
            batch = runner.put_batch(eval_batches.materialize(batch_spec, eval_rows))
            results.append(steps.mlm_eval_metrics(
                lambda *args: runner.get_metrics(eval_step(*args)),
                lambda *args: runner.get_metrics(exact_eval_step(*args)),
                device_state, batch,
            ))  # fmt: skip
        return {"eval_loss": steps.hf_eval_loss(results)}

    return fit(
        state=trainer.state,
        label_tree=label_tree,
        runner=runner,
        train_step=trainer.train_step,
        batches=batches,
        settings=settings,
        checkpoint_dir=workdir / "checkpoints" / name,
        metrics_path=workdir / "metrics.jsonl",
        evaluate=evaluate,
        selection=Selection("eval_loss", "min"),
        on_best=on_best,
    )


HEAD_WARMUP_MODES = ("auto", "always", "never")


def needs_head_warmup(config: ml_collections.ConfigDict) -> bool:
    """upstream.head_warmup: "auto" warms the MLM head up when the pretrained base ships
    none (sentence encoders such as all-MiniLM-L6-v2), "always", or "never"."""
    up = config.upstream
    if up.head_warmup not in HEAD_WARMUP_MODES:
        raise ConfigError(
            f"config.upstream.head_warmup={up.head_warmup!r}: expected one of {HEAD_WARMUP_MODES}"
        )
    if up.head_warmup == "never" or up.head_warmup_steps <= 0:
        return False
    if up.head_warmup == "always":
        return True
    return config.model.init == "pretrained" and not models.has_mlm_head(config.model.name)


def warm_up_head(
    config: ml_collections.ConfigDict,
    workdir: Path,
    model: tuple[models.EncoderModel, dict],
    tokenizer,
    texts: tuple[list[str], list[str]],
) -> dict:
    """`model`'s params with an MLM head trained alone first: plain masked LM on the
    un-augmented corpus, no patch active, everything else frozen, for
    upstream.head_warmup_steps at upstream.head_warmup_learning_rate. A base without a
    head would otherwise spend the patch's steps on language modelling instead of the
    counterfactual objective. Resumable (checkpoints/upstream_head); the head is kept in
    head_warmup/."""
    up = config.upstream
    module, params = model
    head_dir, done = workdir / "head_warmup", workdir / "upstream_head.done.json"
    rules = [*masks.mlm_head_rules(module.config.model_type), (".*", masks.FREEZE)]
    if not files.exists_for_all(done):
        plain = module.clone(patches=())
        own = models.patch_paths(module)
        flat = traverse_util.flatten_dict(params)
        plain_params = traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in own})
        label_tree = masks.labels(plain_params, rules)
        print(masks.summary(plain_params, label_tree))
        warm = config.copy_and_resolve_references()
        warm.upstream.update(num_steps=up.head_warmup_steps, l1=0.0,
                             learning_rate=up.head_warmup_learning_rate)  # fmt: skip
        sequences = tuple(
            pipeline.encode(tokenizer, pipeline.normalize(tokenizer, t, up.max_len), up.max_len)
            for t in texts
        )

        def keep(state: TrainState, step: int, results: dict) -> None:
            checkpoint.save_tree(head_dir, masks.split(state.params, label_tree)[0])

        final, selection = train_mlm(warm, workdir, (plain, plain_params), label_tree, tokenizer,
                                     sequences, "upstream_head", on_best=keep)  # fmt: skip
        if not files.exists_for_all(head_dir):
            keep(final, int(final.step), {})
        record = {"steps": int(final.step), "best": selection.to_record()}
        files.write_json(done, record)
        log.info("MLM head warm-up done: best eval loss %s", selection.best)
    rest = masks.split(params, masks.labels(params, rules))[1]
    return masks.merge(checkpoint.load_tree(head_dir), rest)


def upstream(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    """Learns a debias patch with CDA + masked-LM; writes `patch/` (best eval loss) and
    `patch_final/` (last step) to the workdir and returns the best patch's directory.

    With `upstream.dense` there is no patch: every weight but the LayerNorms and an untied,
    frozen decoder trains (the Full-Debias baseline, METHOD.md §3.7), pulled towards its
    pre-trained value by `upstream.l1`; the best model is written to `dense_model/` in the
    Hugging Face layout, for the downstream phase to start from. Patch method "sft" runs
    that dense phase first, then the sparse one (`sparse_upstream`)."""
    up = config.upstream
    sparse = config.patch.method == "sft"
    done = workdir / "upstream.done.json"
    product = workdir / ("dense_model" if up.dense else "patch")
    if files.exists_for_all(done) and files.exists_for_all(product):
        log.info("upstream already finished (%s); delete it to run again", done)
        return product
    spec = patch_spec(config)
    if up.dense and (spec or sparse):
        raise ConfigError("config.upstream.dense trains the whole encoder: set patch.method 'none'")
    if not spec and not (up.dense or sparse):
        raise ConfigError(
            "config.patch.method is 'none': the upstream phase needs a patch "
            "(or config.upstream.dense=True for dense CDA training)"
        )
    patch_name = next(iter(spec), None)
    augmenter = cda.Augmenter.from_word_lists(word_lists(config), up.word_list_key, up.cda_mode)
    train_texts, eval_texts, sampled = upstream_texts(config)
    words = [w for tuples in word_lists(config).values() for t in tuples for w in t]
    tokenizer = tokenizer_for(config, workdir, train_texts, extra_words=words)
    sequences = (
        cda_sequences(config, tokenizer, train_texts, augmenter),
        cda_sequences(config, tokenizer, eval_texts, augmenter),
    )
    module, params = build_model(config, head="mlm", patches=spec, tokenizer=tokenizer)
    if needs_head_warmup(config):
        params = warm_up_head(config, workdir, (module, params), tokenizer,
                              (train_texts, eval_texts))  # fmt: skip
    if up.dense or sparse:
        module, params = models.untie_decoder(module, params)
        label_tree = masks.labels(params, masks.DENSE_CDA_RULES)
    else:
        label_tree = masks.labels(params, trainable_sets.upstream_rules(config, module, patch_name))
    print(masks.summary(params, label_tree))
    base_name = config.model.name if config.model.init != "random" else None
    if sparse:
        summary = sparse_upstream(
            config, workdir, (module, params), label_tree, tokenizer, sequences, base_name
        )
        summary["sampled"] = sampled
        files.write_json(done, summary)
        return product

    def export(directory: Path, state: TrainState, step: int, results: dict) -> None:
        """The dense model (Hugging Face layout) or the patch directory."""
        if up.dense:
            models.save_pretrained(directory, module, state.params, tokenizer)
            return
        checkpoint.save_patch(
            directory,
            state.params,
            patch_name,
            module,
            axis=config.axis,
            base_model_name=base_name,
            training={"phase": "upstream", "step": step, **results},
        )

    final, selection = train_mlm(
        config, workdir, (module, params), label_tree, tokenizer, sequences, "upstream",
        on_best=lambda s, step, results: export(product, s, step, results),
    )  # fmt: skip
    if not up.dense:
        export(workdir / "patch_final", final, int(final.step), {})
    if not files.exists_for_all(product):
        export(product, final, int(final.step), {})
    summary = {"steps": int(final.step), "best": selection.to_record(), "product": str(product),
               "sampled": sampled}  # fmt: skip
    files.write_json(done, summary)
    log.info("upstream done: best eval loss %s at step %s", selection.best, selection.best_step)
    return product


def sparse_upstream(
    config: ml_collections.ConfigDict,
    workdir: Path,
    model: tuple[models.EncoderModel, dict],
    label_tree: dict,
    tokenizer,
    sequences: tuple[list, list],
    base_name: str | None,
) -> dict:
    """Lottery-ticket SFT (METHOD.md §3.6): the dense phase (best model -> `dense_model/`,
    the Full-Debias base), the top-k |theta_best - theta_0| entries of the encoder, a reset
    to theta_0 and the sparse phase on those entries only -> the sparse diff in `patch/`
    (best eval loss) and `patch_final/`; the selection mask is saved in `sft_mask/` (Orbax,
    bool per entry) and summarised in sft_selection.json."""
    module, params = model
    fraction = float(config.patch.fraction)
    best_dense = workdir / "checkpoints" / "upstream_dense_best"

    def keep_dense(state: TrainState, step: int, results: dict) -> None:
        checkpoint.save_tree(best_dense, masks.split(state.params, label_tree)[0])
        models.save_pretrained(workdir / "dense_model", module, state.params, tokenizer)

    if not files.exists_for_all(workdir / "upstream_dense.done.json"):
        _, dense_selection = train_mlm(
            config, workdir, model, label_tree, tokenizer, sequences, "upstream_dense", keep_dense
        )
        record = {"best": dense_selection.to_record()}
        files.write_json(workdir / "upstream_dense.done.json", record)
    paths = sft.maskable_paths(params, label_tree, module.config.base_name)
    initial = traverse_util.flatten_dict(params)
    best = traverse_util.flatten_dict(checkpoint.load_tree(best_dense))
    k = sft.k_of(fraction, params, paths)
    selected = sft.select_top_k({p: np.asarray(best[p]) - np.asarray(initial[p]) for p in paths}, k)
    checkpoint.save_tree(workdir / "sft_mask", traverse_util.unflatten_dict(selected))
    per_leaf = {"/".join(p): int(m.sum()) for p, m in selected.items()}
    maskable = sum(int(np.size(initial[p])) for p in paths)
    files.write_json(workdir / "sft_selection.json",
                     {"fraction": fraction, "k": k, "selected": sum(per_leaf.values()),
                      "maskable": maskable, "per_leaf": per_leaf})  # fmt: skip
    log.info("SFT: %d of the encoder's entries selected (k=%d)", sum(per_leaf.values()), k)
    print(masks.summary(params, label_tree, selected))  # the sparse phase's trainable entries

    def export(directory: Path, state: TrainState, step: int, results: dict) -> None:
        flat = traverse_util.flatten_dict(jax.device_get(state.params))
        diff = sft.sparse_diff({p: flat[p] for p in paths}, initial)
        checkpoint.save_sft_patch(
            directory, diff, module, params, fraction=fraction, k=k, axis=config.axis,
            base_model_name=base_name,
            training={"phase": "upstream", "step": step, **results},
        )  # fmt: skip

    final, selection = train_mlm(
        config, workdir, model, label_tree, tokenizer, sequences, "upstream",
        on_best=lambda s, step, results: export(workdir / "patch", s, step, results),
        entries=selected,
    )  # fmt: skip
    export(workdir / "patch_final", final, int(final.step), {})
    if not files.exists_for_all(workdir / "patch"):
        export(workdir / "patch", final, int(final.step), {})
    return {"steps": int(final.step), "best": selection.to_record(), "k": k,
            "product": str(workdir / "patch")}  # fmt: skip


def cross_axis(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    """The same upstream for the other axis (`config.cross_axis`: its axis and CDA word-list
    key) in `cross_axis/`, so the evaluate phase can show that a patch acts on its own
    axis: base + this run's patch and base + the other axis's patch, each scored on both
    axes' minimal pairs."""
    other, sub = sub_run(config, workdir, "cross_axis")
    other.axis = config.cross_axis.axis
    other.upstream.word_list_key = config.cross_axis.word_list_key
    other.phases = ("upstream",)
    files.write_json(sub / "config.json", other.to_dict())
    return upstream(other, sub)
