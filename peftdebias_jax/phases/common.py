"""What every phase shares: the configured model and tokenizer, the patch spec, the
patches to load, sub-runs inside a workdir and the MLM-head check."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_collections

from peftdebias_jax import files, models, peft, processes
from peftdebias_jax.data import packing, pipeline
from peftdebias_jax.data.tokenizer import train_wordpiece
from peftdebias_jax.errors import ConfigError
from peftdebias_jax.evaluation import bootstrap

log = logging.getLogger(__name__)


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
    if method in ("none", "sft"):  # sft is an entry mask, not a module (peft/sft.py)
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
    if not files.exists_for_all(directory):
        if texts is None:
            raise ConfigError(f"{workdir}: no tokenizer; run the upstream phase first")
        built = train_wordpiece(texts, config.model.tokenizer_vocab_size, extra_words)
        if processes.is_writer():
            built.save_pretrained(directory)
        processes.sync(f"tokenizer {directory}")
    return models.load_tokenizer(directory)


def random_architecture(config: ml_collections.ConfigDict, tokenizer=None) -> models.EncoderConfig:
    """config.model.architecture, with the tokenizer's vocabulary size and pad id if given."""
    arch = config.model.architecture.to_dict()
    if tokenizer is not None:
        arch.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    return models.EncoderConfig(**arch, dtype=config.model.dtype)


def sub_run(config: ml_collections.ConfigDict, workdir: Path, name: str) -> tuple:
    """(config copy, directory) of a run inside this one (the FT baseline, the BEFT probe):
    random-init runs share this run's tokenizer, hence its initial weights."""
    sub = files.make_directory(Path(workdir) / name)
    shared = Path(workdir) / "tokenizer"
    copy = config.model.init == "random" and shared.exists() and not (sub / "tokenizer").exists()
    if copy and processes.is_writer():
        shutil.copytree(shared, sub / "tokenizer")
    processes.sync(f"sub-run {sub}")
    return config.copy_and_resolve_references(), sub


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


def compile_tokens(section: ml_collections.ConfigDict, sequences: Sequence, rows: int) -> float:
    """A compiled program's price in padded tokens: `section.bucket_compile_steps` steps of
    `rows` rows at the mean length of `sequences`."""
    mean = sum(len(seq) for seq in sequences) / max(1, len(sequences))
    return section.bucket_compile_steps * rows * mean


def check_packable(module: models.EncoderModel, key: str) -> None:
    """Packed training batches (`key`, e.g. config.downstream.pack) need a model without a
    prompt tuning patch (its prompt states would be shared by a row's examples)."""
    if any(patch.kind == "prompt" for patch in module.patches):
        raise ConfigError(
            f"{key}=True cannot train beside a prompt tuning patch (its prompt states would "
            f"be shared by every example of a packed row): set {key}=False"
        )


def packed_batches(
    section: ml_collections.ConfigDict,
    name: str,
    sequences: Sequence,
    pad_id: int,
    seed: int,
    updates: int,
    rows_multiple: int,
    token_types: Sequence | None = None,
    labels: Sequence[int] | None = None,
    weights: Sequence[float] | None = None,
) -> packing.PackedBatches:
    """A phase `section`'s packed training batches (its batch_size, max_len, runs,
    pack_segments, row count limit and compile price) for `updates` updates, logged."""
    batches = packing.PackedBatches(
        sequences, section.batch_size, section.max_len, pad_id, seed, token_types, labels,
        updates, section.bucket_run_length, section.pack_segments, section.bucket_count,
        rows_multiple, section.bucket_compile_steps, weights=weights,
    )  # fmt: skip
    kind = "sequences" if labels is None else "examples"
    log.info("%s: %d %s a batch packed into rows of %d tokens; row counts %s", name,
             section.batch_size, kind, section.max_len, batches.row_counts)  # fmt: skip
    return batches


def packed_scoring(
    section: ml_collections.ConfigDict,
    sequences: Sequence,
    pad_id: int,
    rows_multiple: int,
    token_types: Sequence | None = None,
    labels: Sequence[int] | None = None,
) -> packing.PackedScoring:
    """A scored set packed as a phase `section` packs (max_len, pack_segments), at most
    its eval_batch_size rows a batch."""
    return packing.PackedScoring(sequences, section.eval_batch_size, section.max_len, pad_id,
                                 token_types, labels, section.pack_segments,
                                 rows_multiple)  # fmt: skip


def bucket_costs(section: ml_collections.ConfigDict, sequences: Sequence, updates: int) -> dict:
    """`pipeline.Batches`' compile_tokens and passes for a phase `section` that runs `updates`
    batches over `sequences` (`compile_tokens` prices one more bucket's compile)."""
    return {
        "compile_tokens": compile_tokens(section, sequences, section.batch_size),
        "passes": updates * section.batch_size / max(1, len(sequences)),
    }


def scoring_lengths(
    section: ml_collections.ConfigDict,
    sequences: Sequence,
    allowed: Sequence[int],
    rows: int,
    passes: int,
) -> list[int]:
    """The training lengths (`allowed`) a scored set of `sequences`, scored `passes` times
    in batches of `rows`, is padded to (`pipeline.scoring_lengths`), a scoring program's
    compile priced as a training bucket's (`compile_tokens`)."""
    lengths = [len(seq) for seq in sequences]
    return pipeline.scoring_lengths(lengths, allowed, compile_tokens(section, sequences, rows),
                                    passes)  # fmt: skip


def bootstrap_settings(config: ml_collections.ConfigDict) -> bootstrap.Settings:
    """config.bootstrap as evaluation.bootstrap.Settings (a bad value names its key)."""
    section = config.bootstrap
    try:
        return bootstrap.Settings(int(section.resamples), float(section.level), int(section.seed))
    except ValueError as err:
        raise ConfigError(f"config.bootstrap: {err}") from None
