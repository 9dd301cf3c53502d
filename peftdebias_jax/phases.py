"""The paper's phases composed from the library's parts, driven by one ml_collections config.

upstream: encoder + new patch -> CDA corpus -> fit(masked-LM step) -> patch directories.
downstream: encoder + frozen patch(es) -> task data -> fit(classification step) -> metrics.
evaluate: CrowS-Pairs / StereoSet / SEAT for base and base + patch, with the task metrics.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from peftdebias_jax import checkpoint, masks, models, peft, sft
from peftdebias_jax.data import cda, pipeline, records, sampling, synthetic
from peftdebias_jax.data.mlm import special_ids_of
from peftdebias_jax.data.records import DataError
from peftdebias_jax.data.tokenizer import train_wordpiece
from peftdebias_jax.errors import ConfigError
from peftdebias_jax.training import parallel, steps
from peftdebias_jax.training.loop import FitSettings, Selection, fit
from peftdebias_jax.training.state import TrainState, adamw

log = logging.getLogger(__name__)


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
    tokenizer=None,
    base: Path | None = None,
) -> tuple[models.EncoderModel, dict]:
    """The configured encoder: a pretrained checkpoint, or random weights (model.init) with
    the tokenizer's vocabulary; `base` (a dense Full-Debias checkpoint) replaces both."""
    spec = config.model
    if base is not None:
        return models.from_pretrained(
            base, head, num_labels, patches, dtype=spec.dtype, seed=config.seed
        )
    if spec.init == "random":
        arch = random_architecture(config, tokenizer)
        return models.from_config(arch, head, num_labels, patches, seed=config.seed)
    if spec.init != "pretrained":
        raise ValueError(f"config.model.init must be 'pretrained' or 'random', got {spec.init!r}")
    return models.from_pretrained(
        spec.name, head, num_labels, patches, dtype=spec.dtype, seed=config.seed
    )


def count_params(params: dict) -> int:
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))


def patch_spec(config: ml_collections.ConfigDict) -> dict[str, peft.PatchConfig]:
    """{name: PatchConfig} from config.patch (method, name and the method's settings)."""
    raw = config.patch.to_dict()
    method, name = raw.pop("method"), raw.pop("name")
    if method in ("none", "sft"):  # sft is an entry mask, not a module (see sft.py)
        return {}
    try:
        return {name: peft.PatchConfig(method, **raw)}
    except ConfigError as err:
        raise ConfigError(f"config.patch: {err}") from None


def tokenizer_for(
    config: ml_collections.ConfigDict,
    workdir: Path,
    texts: list[str] | None = None,
    extra_words: tuple[str, ...] | list[str] = (),
    base: Path | None = None,
):
    """The tokenizer of `base` or of the configured checkpoint; for random-init models the
    workdir's, built from `texts` (and `extra_words`) on first use and saved there, so a
    resumed run and the later phases reuse it."""
    if base is not None:
        return models.load_tokenizer(base)
    if config.model.init != "random":
        return models.load_tokenizer(config.model.name)
    directory = workdir / "tokenizer"
    if not directory.exists():
        if texts is None:
            raise ConfigError(f"{workdir}: no tokenizer; run the upstream phase first")
        vocab_size = config.model.tokenizer_vocab_size
        train_wordpiece(texts, vocab_size, extra_words).save_pretrained(directory)
    return models.load_tokenizer(directory)


def random_architecture(config: ml_collections.ConfigDict, tokenizer=None) -> models.EncoderConfig:
    """config.model.architecture, with the tokenizer's vocabulary size and pad id if given."""
    arch = config.model.architecture.to_dict()
    if tokenizer is not None:
        arch.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    return models.EncoderConfig(**arch, dtype=config.model.dtype)


def word_lists(config: ml_collections.ConfigDict) -> dict:
    """config.upstream.word_list: a bias_attribute_words.json path, or "builtin"."""
    if config.upstream.word_list == "builtin":
        return synthetic.WORD_LISTS
    return cda.load_word_lists(config.upstream.word_list)


def upstream_texts(config: ml_collections.ConfigDict) -> tuple[list[str], list[str], dict]:
    """(train, validation) texts and what the split caps kept; without a validation file a
    seeded fraction is held out. train_file "synthetic" renders a small templated corpus
    (smoke runs, demos)."""
    up = config.upstream
    caps = sampling.check_caps(up.max_examples, "config.upstream.max_examples")
    if up.train_file == "synthetic":
        train = synthetic.corpus(config.axis, up.synthetic_size, config.seed)
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


def head_rules(module: models.EncoderModel) -> list[tuple[str, str]]:
    """The MLM head parts the reference trains upstream (then drops): transform + bias."""
    if module.config.model_type == "roberta":
        return [(r"lm_head/(dense|layer_norm)/.*", "train"), (r"lm_head/bias", "train")]
    return [(r"cls/predictions/transform/.*", "train"), (r"cls/predictions/bias", "train")]


DENSE_RULES = [
    (r".*/LayerNorm/.*", "freeze"),
    (r".*/layer_norm/.*", "freeze"),
    (r"(cls/predictions|lm_head)/decoder/kernel", "freeze"),
    (r".*", "train"),
]


def untie_decoder(module: models.EncoderModel, params: dict) -> tuple[models.EncoderModel, dict]:
    """The MLM model with its decoder an untied copy of the word embeddings (to be frozen
    while the embeddings train), as the reference's dense CDA training does."""
    if not module.config.tie_word_embeddings:
        return module, params
    untied = module.clone(config=module.config.replace(tie_word_embeddings=False))
    params = jax.tree_util.tree_map(lambda x: x, params)  # a new dict tree
    table = params[module.config.base_name]["embeddings"]["word_embeddings"]["embedding"]
    head = params["lm_head"] if "lm_head" in params else params["cls"]["predictions"]
    head["decoder"] = {"kernel": np.array(table).T.copy(), "bias": head.pop("bias")}
    return untied, params


def upstream_rules(config, module: models.EncoderModel, patch_name: str) -> list[tuple[str, str]]:
    rules = [(masks.patch_regex(patch_name), "train")]
    if config.upstream.train_mlm_head:
        rules += head_rules(module)
    return [*rules, (".*", "freeze")]


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
    tx = masks.optimizer(adamw(up.learning_rate, up.num_steps, up.clip_norm), label_tree)
    if entries:
        tx = optax.chain(masks.entry_mask(entries), tx)
    anchor = masks.split(params, label_tree)[0] if up.l1 else None
    state = TrainState.create(params, tx, config.seed, anchor)
    runner = parallel.Runner(config.parallel.mode, up.batch_size, "config.upstream.batch_size")
    masking = steps.MaskingConfig(
        special_ids=special_ids_of(tokenizer),
        mask_id=tokenizer.mask_token_id,
        vocab_size=len(tokenizer),
        rate=up.mlm_probability,
    )
    train_step = runner.compile_repeated(
        steps.make_mlm_train_step(
            module,
            tx,
            label_tree,
            masking,
            runner.axis_name,
            up.l1,
            count_params(params),
            up.max_predictions,
        ),
        f"{name} train step",
    )
    eval_step = runner.compile(
        steps.make_mlm_eval_step(module, masking, runner.axis_name),
        f"{name} eval step",
        donate=False,
    )
    pad = tokenizer.pad_token_id
    train_seqs, eval_seqs = sequences
    batches = pipeline.Batches(train_seqs, up.batch_size, up.max_len, pad, seed=config.seed,
                               run_length=up.bucket_run_length)  # fmt: skip
    eval_batches = pipeline.Batches(eval_seqs, up.batch_size, up.max_len, pad, seed=config.seed)

    def evaluate(device_state) -> dict[str, float]:
        results = []
        for batch_spec in eval_batches.evaluation():
            batch = runner.put_batch(eval_batches.materialize(batch_spec, runner.local_rows()))
            results.append(jax.device_get(runner.get_metrics(eval_step(device_state, batch))))
        return {"eval_loss": steps.hf_eval_loss(results)}

    settings = FitSettings(
        num_steps=up.num_steps,
        eval_every=up.eval_every,
        log_every=up.log_every,
        checkpoint_every=up.checkpoint_every,
        steps_per_call=up.steps_per_call,
        source="config.upstream",
        name=name,
    )
    return fit(
        state=state,
        label_tree=label_tree,
        runner=runner,
        train_step=train_step,
        batches=batches,
        settings=settings,
        checkpoint_dir=workdir / "checkpoints" / name,
        metrics_path=workdir / "metrics.jsonl",
        evaluate=evaluate,
        selection=Selection("eval_loss", "min"),
        on_best=on_best,
    )


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
    if done.exists() and product.exists():
        log.info("upstream already finished (%s); delete it to run again", done)
        return product
    parallel.initialize_distributed(config.parallel.distributed)
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
    if up.dense or sparse:
        module, params = untie_decoder(module, params)
        label_tree = masks.labels(params, DENSE_RULES)
    else:
        label_tree = masks.labels(params, upstream_rules(config, module, patch_name))
    print(masks.summary(params, label_tree))
    base_name = config.model.name if config.model.init != "random" else None
    if sparse:
        summary = sparse_upstream(
            config, workdir, (module, params), label_tree, tokenizer, sequences, base_name
        )
        summary["sampled"] = sampled
        done.write_text(json.dumps(summary, indent=2) + "\n")
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
    if not product.exists():
        export(product, final, int(final.step), {})
    summary = {"steps": int(final.step), "best": selection.to_record(), "product": str(product),
               "sampled": sampled}  # fmt: skip
    done.write_text(json.dumps(summary, indent=2) + "\n")
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

    if not (workdir / "upstream_dense.done.json").exists():
        _, dense_selection = train_mlm(
            config, workdir, model, label_tree, tokenizer, sequences, "upstream_dense", keep_dense
        )
        record = {"best": dense_selection.to_record()}
        (workdir / "upstream_dense.done.json").write_text(json.dumps(record, indent=2) + "\n")
    paths = sft.maskable_paths(params, label_tree, module.config.base_name)
    initial = traverse_util.flatten_dict(params)
    best = traverse_util.flatten_dict(checkpoint.load_tree(best_dense))
    k = sft.k_of(fraction, params, paths)
    selected = sft.select_top_k({p: np.asarray(best[p]) - np.asarray(initial[p]) for p in paths}, k)
    checkpoint.save_tree(workdir / "sft_mask", traverse_util.unflatten_dict(selected))
    per_leaf = {"/".join(p): int(m.sum()) for p, m in selected.items()}
    (workdir / "sft_selection.json").write_text(json.dumps(
        {"fraction": fraction, "k": k, "selected": sum(per_leaf.values()),
         "maskable": sum(int(np.size(initial[p])) for p in paths), "per_leaf": per_leaf},
        indent=2) + "\n")  # fmt: skip
    log.info("SFT: %d of the encoder's entries selected (k=%d)", sum(per_leaf.values()), k)

    def export(directory: Path, state: TrainState, step: int, results: dict) -> None:
        flat = traverse_util.flatten_dict(jax.device_get(state.params))
        diff = sft.sparse_diff({p: flat[p] for p in paths}, initial)
        sft.save_sft_patch(
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
    if not (workdir / "patch").exists():
        export(workdir / "patch", final, int(final.step), {})
    return {"steps": int(final.step), "best": selection.to_record(), "k": k,
            "product": str(workdir / "patch")}  # fmt: skip


def downstream(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """Fine-tunes the task with the patch(es) frozen; see peftdebias_jax.downstream."""
    from peftdebias_jax import downstream as downstream_phase

    return downstream_phase.run(config, Path(workdir))


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
    (sub / "config.json").write_text(json.dumps(plain.to_dict(), indent=2, default=str) + "\n")
    return downstream(plain, sub)


def sub_run(config: ml_collections.ConfigDict, workdir: Path, name: str) -> tuple:
    """(config copy, directory) of a run inside this one (the FT baseline, the BEFT probe):
    random-init runs share this run's tokenizer, hence its initial weights."""
    sub = Path(workdir) / name
    sub.mkdir(parents=True, exist_ok=True)
    shared = Path(workdir) / "tokenizer"
    if config.model.init == "random" and shared.exists() and not (sub / "tokenizer").exists():
        shutil.copytree(shared, sub / "tokenizer")
    return config.copy_and_resolve_references(), sub


def bias_select(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """BEFT v1 selection (MASKS.md B.3): scores every bias type per layer and picks the top
    candidate -> bias_scores.json and plots/bias_scores.png. Criteria "beft" and
    "magnitude" compare an all-bias (BitFit) probe run, trained in `bias_probe/`, with the
    pre-trained biases; "fisher" scores mini-batch gradients at the pre-trained weights."""
    from peftdebias_jax import bias_select as bs
    from peftdebias_jax import downstream as downstream_phase
    from peftdebias_jax.data import tasks

    workdir = Path(workdir)
    out = workdir / "bias_scores.json"
    if out.exists():
        log.info("bias_select already finished (%s); delete it to run again", out)
        return json.loads(out.read_text())
    criterion = config.beft.criterion
    if criterion not in bs.CRITERIA:
        raise ConfigError(f"config.beft.criterion must be one of {bs.CRITERIA}, got {criterion!r}")
    dn = config.downstream
    task = tasks.get(dn.task)
    data = downstream_phase.load_task_data(config, task)
    labels = data["labels"]
    if criterion == "fisher":
        tokenizer = tokenizer_for(config, workdir, [e.text for e in data["train"]])
    else:
        probe, directory = sub_run(config, workdir, "bias_probe")
        probe.downstream.trainable, probe.phases = "bitfit", ("downstream",)
        downstream_phase.run(probe, directory)
        tokenizer = tokenizer_for(probe, directory)
    module, params = build_model(config, "classifier", len(labels), tokenizer=tokenizer)
    if criterion == "fisher":
        label_tree = masks.labels(params, bs.rules(None))
        frozen = masks.split(params, label_tree)[1]

        def loss_fn(sub: dict, batch: dict) -> jax.Array:
            logits = module.apply({"params": masks.merge(sub, frozen)}, batch["input_ids"],
                                  batch["attention_mask"], batch["token_type_ids"])  # fmt: skip
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
            return jnp.sum(ce * batch["weight"]) / jnp.maximum(jnp.sum(batch["weight"]), 1.0)

        ids, types, ys = downstream_phase.encode(tokenizer, data["train"], labels, dn.max_len)
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
        probe_best = checkpoint.load_tree(directory / "checkpoints" / "downstream_best")
        scores = bs.change_scores(probe_best, params, criterion)
    record = bs.summary(scores, criterion, bs.select(scores, config.beft.candidates))
    (workdir / "plots").mkdir(exist_ok=True)
    bs.plot(record, workdir / "plots" / "bias_scores.png")
    out.write_text(json.dumps(record, indent=2) + "\n")
    log.info("bias_select: ranking %s; selected %s", record["ranking"], record["selected"])
    return record


def example_groups(examples) -> np.ndarray:
    """The sensitive attribute per example: its `group` field (gender, dialect; targeted or
    not in synthetic hate data) when every example has one; otherwise 1 if the text names
    an identity term of FPRD's list, else 0 (a choice of this library for hate tasks, which
    carry no group column)."""
    from peftdebias_jax.evaluation.extrinsic import GROUP_BIAS_WORDS

    if all(e.group is not None for e in examples):
        names = sorted({str(e.group) for e in examples})
        return np.asarray([names.index(str(e.group)) for e in examples])
    words = set(GROUP_BIAS_WORDS)
    return np.asarray([int(bool(words & set(e.text.lower().split()))) for e in examples])


def fisher_lowrank(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """Fisher group importance -> neutralized importance -> Fisher-weighted low-rank factors
    of the target kernels (MASKS.md Part A; RECONSTRUCTED, see fairness.py). Writes
    fisher.json (group sizes, overlap@k, factorization errors), fisher/ (per-group Fishers,
    importance and influence mask, Orbax) and lowrank/ (factors and the kernels they sit on),
    which the downstream phase trains with `downstream.trainable="lowrank"`."""
    from peftdebias_jax import downstream as downstream_phase
    from peftdebias_jax import fairness
    from peftdebias_jax.data import tasks

    workdir = Path(workdir)
    out = workdir / "fisher.json"
    if out.exists():
        log.info("fisher_lowrank already finished (%s); delete it to run again", out)
        return json.loads(out.read_text())
    fc, dn = config.fisher, config.downstream
    task = tasks.get(dn.task)
    data = downstream_phase.load_task_data(config, task)
    train = data["train"][: fc.max_examples]
    tokenizer = tokenizer_for(config, workdir, [e.text for e in data["train"]])
    module, params = build_model(config, "classifier", len(data["labels"]), tokenizer=tokenizer)
    paths = fairness.target_paths(params, fc.target)
    flat = traverse_util.flatten_dict(params)
    scored = traverse_util.unflatten_dict({p: flat[p] for p in paths})
    rest = traverse_util.unflatten_dict({p: v for p, v in flat.items() if p not in paths})

    def logits_fn(sub: dict, example: dict) -> jax.Array:
        batch = {k: v[None] for k, v in example.items()}
        return module.apply({"params": masks.merge(sub, rest)}, batch["input_ids"],
                            batch["attention_mask"], batch["token_type_ids"])[0]  # fmt: skip

    ids, types, ys = downstream_phase.encode(tokenizer, train, data["labels"], dn.max_len)
    batches = pipeline.Batches(ids, len(ids), dn.max_len, tokenizer.pad_token_id, 0, types, ys)
    keep = ("input_ids", "attention_mask", "token_type_ids", "label")
    examples = {k: v for k, v in padded_examples(batches).items() if k in keep}
    groups = example_groups(train)
    fishers = fairness.group_fisher(logits_fn, scored, examples, groups, fc.labels, fc.chunk,
                                    config.seed)  # fmt: skip
    importance, influence = fairness.neutralize(fishers, fc.neutralize, fc.lam, fc.quantile)
    factors, errors = {}, {}
    for path in paths:
        down, up = fairness.fwsvd(flat[path], importance[path], fc.rank)
        plain_down, plain_up = fairness.fwsvd(flat[path], np.ones_like(importance[path]), fc.rank)
        kernel = np.zeros_like(flat[path]) if fc.mode == "replace" else flat[path] - down @ up
        factors["/".join(path)] = {"down": down, "up": up, "kernel": np.asarray(kernel),
                                   "original": np.asarray(flat[path])}  # fmt: skip
        errors["/".join(path)] = {
            "fisher_weighted": fairness.weighted_error(flat[path], importance[path], down, up),
            "plain_svd": fairness.weighted_error(
                flat[path], importance[path], plain_down, plain_up
            ),
        }
    entries = sum(int(np.size(flat[p])) for p in paths)
    group_ids = sorted(fishers)
    record = {
        "reconstructed": "MASKS.md Part A: the paper's equations are not known",
        "target": fc.target, "paths": ["/".join(p) for p in paths], "rank": fc.rank,
        "mode": fc.mode, "labels": fc.labels, "neutralize": fc.neutralize,
        "group_sizes": {str(g): int(np.sum(groups == g)) for g in group_ids},
        "overlap_at_1pct": fairness.overlap_at_k(
            fishers[group_ids[0]], fishers[group_ids[-1]], max(1, entries // 100)
        ),
        "influence_masked": int(sum(m.sum() for m in influence.values())) if influence else 0,
        "errors": errors,
    }  # fmt: skip
    unflat = traverse_util.unflatten_dict
    saved = {f"group_{g}": unflat(f) for g, f in fishers.items()}
    saved["importance"] = unflat(importance)
    if influence:
        saved["influence_mask"] = unflat(influence)
    checkpoint.save_tree(workdir / "fisher", saved)
    checkpoint.save_tree(workdir / "lowrank", {"factors": [factors[k] for k in sorted(factors)]})
    out.write_text(json.dumps(record, indent=2) + "\n")
    log.info("fisher_lowrank: %s", {k: record[k] for k in ("group_sizes", "overlap_at_1pct")})
    return record


def padded_examples(batches: pipeline.Batches) -> dict:
    """Every row of `batches`, padded to the longest bucket, as one dict of arrays."""
    parts = [batches.materialize(spec) for spec in batches.evaluation()]
    width = max(p["input_ids"].shape[1] for p in parts)
    out: dict = {}
    for part in parts:
        real = part["weight"] > 0
        for key, value in part.items():
            value = np.asarray(value)[real]
            if value.ndim == 2:
                value = np.pad(value, ((0, 0), (0, width - value.shape[1])))
            out.setdefault(key, []).append(value)
    order = np.concatenate([np.asarray(spec.rows)[: spec.real] for spec in batches.evaluation()])
    return {k: np.concatenate(v)[np.argsort(order)] for k, v in out.items()}


def evaluate(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """Intrinsic benchmarks (base and base + patch) and the downstream results."""
    from peftdebias_jax.evaluation import phase

    return phase.run(config, Path(workdir))


def report(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    """report.md and plots/ in the workdir (rebuilt every time: it only reads results)."""
    from peftdebias_jax import report as report_module

    path = report_module.write(workdir)
    print(f"report: {path}")
    return path


PHASES: dict[str, Callable[[ml_collections.ConfigDict, Path], object]] = {
    "upstream": upstream,
    "bias_select": bias_select,
    "fisher_lowrank": fisher_lowrank,
    "baseline": baseline,
    "downstream": downstream,
    "evaluate": evaluate,
    "report": report,
}


def input_files(config: ml_collections.ConfigDict) -> dict[str, str]:
    """{config key: local path} of every input file the configured phases will read
    (synthetic data, built-in word lists and `hf:` datasets need none)."""
    phases, up, dn, ec = set(config.phases), config.upstream, config.downstream, config.evaluate
    files: dict[str, str] = {}

    def data(key: str, value: str) -> None:
        if value and value != "synthetic" and not value.startswith("hf:"):
            files[key] = value

    if "upstream" in phases:
        data("upstream.train_file", up.train_file)
        data("upstream.validation_file", up.validation_file)
        if up.word_list != "builtin":
            files["upstream.word_list"] = up.word_list
    if phases & {"downstream", "baseline", "bias_select", "fisher_lowrank"}:
        for split in ("train_file", "validation_file", "test_file"):
            data(f"downstream.{split}", getattr(dn, split))
        for i, entry in enumerate(dn.extra_evals):
            files[f"downstream.extra_evals[{i}]"] = entry.partition("=")[2]
        for key in ("bias_nli_occupations", "bias_nli_gendered_words"):
            if getattr(dn, key):
                files[f"downstream.{key}"] = getattr(dn, key)
        for i, directory in enumerate(dn.patches):
            files[f"downstream.patches[{i}]"] = directory
        if dn.base_model:
            files["downstream.base_model"] = dn.base_model
    if "evaluate" in phases:
        for key in ("crows_file", "stereoset_file", "seat_dir"):
            if getattr(ec, key):
                files[f"evaluate.{key}"] = getattr(ec, key)
        for i, directory in enumerate(ec.patches):
            files[f"evaluate.patches[{i}]"] = directory
    return files


def check_inputs(config: ml_collections.ConfigDict) -> None:
    """Fails before anything trains when an input file of any configured phase is missing,
    or when masked-LM benchmarks would score a local checkpoint's missing MLM head."""
    missing = [f"config.{key}: {path}" for key, path in input_files(config).items()
               if not Path(path).exists()]  # fmt: skip
    if missing:
        raise DataError("input files not found (nothing was run):\n  " + "\n  ".join(missing))
    if Path(config.model.name).is_dir():  # a hub name is checked once downloaded (evaluate)
        check_mlm_head(config)


def check_mlm_head(config: ml_collections.ConfigDict) -> None:
    """CrowS-Pairs and StereoSet score the masked-LM head: refuse them for a pretrained
    checkpoint that has none (its head would be random). SEAT needs no head."""
    ec = config.evaluate
    scored = [k for k in ("crows_file", "stereoset_file") if getattr(ec, k)]
    if "evaluate" not in config.phases or not scored or config.model.init != "pretrained":
        return
    if config.upstream.dense and "upstream" in config.phases:
        return  # the dense model is scored, with the head it was trained with
    if not models.has_mlm_head(config.model.name):
        raise ConfigError(
            f"config.model.name={config.model.name}: the checkpoint has no masked-LM head, so "
            f"{' and '.join(f'config.evaluate.{k}' for k in scored)} would be scored by a "
            "randomly initialised head. Use a checkpoint with an MLM head (e.g. "
            "bert-base-uncased), or skip them: "
            + " ".join(f'--config.evaluate.{k}=""' for k in scored)
            + " (SEAT needs no head)"
        )


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> None:
    """Prints the resolved config, writes it to the workdir, runs the configured phases
    (each builds its model and prints its parameter summary)."""
    unknown = [p for p in config.phases if p not in PHASES]
    if unknown:
        raise ConfigError(f"config.phases: unknown {unknown}; the phases are {list(PHASES)}")
    check_inputs(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    resolved = config.to_dict()
    print("resolved config:\n" + json.dumps(resolved, indent=2, default=str))
    (workdir / "config.json").write_text(json.dumps(resolved, indent=2, default=str) + "\n")
    for name in config.phases:
        PHASES[name](config, workdir)
    print(f"workdir: {workdir}")
