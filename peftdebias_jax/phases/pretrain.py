"""The pretrain phase: a biased pretrained base built on a generated corpus with planted
stereotypes (`data.stereotypes`), written in the Hugging Face layout and reused.

random-init encoder + WordPiece on the corpus -> fit(masked-LM step, every weight) ->
`config.pretrain.output`: config.json, model.safetensors (with the MLM head), the tokenizer
and pretrain.json (the settings it was built with). A later run with the same settings
reuses it; point `model.name` at it (`model.init="pretrained"`) to start from it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from peftdebias_jax import checkpoint, files, masks, models, processes
from peftdebias_jax.data import pipeline, stereotypes, synthetic
from peftdebias_jax.data.tokenizer import train_wordpiece
from peftdebias_jax.errors import ConfigError
from peftdebias_jax.phases.common import random_architecture
from peftdebias_jax.phases.upstream import train_mlm
from peftdebias_jax.training.state import TrainState

log = logging.getLogger(__name__)
RECORD = "pretrain.json"


def settings_of(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What the base depends on: the pretrain section, the architecture and the compute
    dtype (the cache's key)."""
    section = config.pretrain.to_dict()
    section.pop("output")
    return {"pretrain": section, "architecture": config.model.architecture.to_dict(),
            "dtype": config.model.dtype}  # fmt: skip


def cached_base(config: ml_collections.ConfigDict) -> Path | None:
    """The output directory when it holds a base built with these settings; None when it
    does not exist; an error when it holds something else (never overwritten)."""
    output = Path(config.pretrain.output)
    if not output.exists():
        return None
    record = output / RECORD
    if not record.exists():
        raise ConfigError(
            f"config.pretrain.output={output} exists but was not written by the pretrain "
            f"phase (no {RECORD}); choose another directory"
        )
    built = json.loads(record.read_text()).get("settings")
    if built != json.loads(json.dumps(settings_of(config))):
        raise ConfigError(
            f"config.pretrain.output={output} holds a base built with other settings "
            f"(see its {RECORD}); delete it or set another config.pretrain.output"
        )
    return output


def pretrain(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    """Builds the stereotyped base at config.pretrain.output, or reuses it."""
    cached = cached_base(config)
    if cached is not None:
        log.info("pretrain: reusing the base in %s (same settings)", cached)
        return cached
    pt = config.pretrain
    texts = stereotypes.corpus(pt.corpus_size, pt.rate, pt.seed)
    order = np.random.default_rng(pt.seed).permutation(len(texts))
    held = max(1, len(texts) // 20)
    train = [texts[i] for i in order[held:]]
    validation = [texts[i] for i in order[:held]]
    words = [w for tuples in synthetic.WORD_LISTS.values() for t in tuples for w in t]
    tokenizer = train_wordpiece(train, config.model.tokenizer_vocab_size, words)
    module, params = models.from_config(
        random_architecture(config, tokenizer), head="mlm", seed=pt.seed
    )
    label_tree = masks.labels(params, [(".*", masks.TRAIN)])
    print(masks.summary(params, label_tree))
    settings = config.copy_and_resolve_references()
    settings.seed = pt.seed
    settings.upstream.update(
        num_steps=pt.num_steps, batch_size=pt.batch_size, learning_rate=pt.learning_rate,
        max_len=pt.max_len, eval_every=pt.eval_every, checkpoint_every=pt.eval_every,
        log_every=pt.log_every, l1=0.0, clip_norm=pt.clip_norm,
        mlm_probability=pt.mlm_probability, max_predictions=pt.max_predictions,
        bucket_count=pt.bucket_count, bucket_run_length=pt.bucket_run_length,
        bucket_compile_steps=pt.bucket_compile_steps, pack=False,
    )  # fmt: skip
    sequences = tuple(pipeline.encode(tokenizer, t, pt.max_len) for t in (train, validation))
    best_dir = workdir / "checkpoints" / "pretrain_best"

    def keep(state: TrainState, step: int, results: dict) -> None:
        checkpoint.save_tree(best_dir, state.params)

    final, selection = train_mlm(settings, workdir, (module, params), label_tree, tokenizer,
                                 sequences, "pretrain", on_best=keep)  # fmt: skip
    best = checkpoint.load_tree(best_dir) if best_dir.exists() else final.params
    output = Path(pt.output)
    staging = output.with_name(output.name + ".partial")
    models.save_pretrained(staging, module, best, tokenizer)
    record = {"settings": settings_of(config), "best": selection.to_record(),
              "corpus": {"train": len(train), "validation": len(validation)}}  # fmt: skip
    files.write_json(staging / RECORD, record)
    if processes.is_writer():
        staging.rename(output)  # complete, with its record, or absent
    processes.sync(f"base {output}")
    log.info("pretrain: the stereotyped base is in %s (best eval loss %s)", output, selection.best)
    return output
