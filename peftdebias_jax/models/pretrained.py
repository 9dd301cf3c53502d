"""from_pretrained: a Hugging Face checkpoint directory (or hub name) -> (EncoderModel, params)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from peftdebias_jax import processes
from peftdebias_jax.errors import CheckpointError, ConfigError
from peftdebias_jax.files import staged_directory, write_json
from peftdebias_jax.models.config import EncoderConfig, read_config_json
from peftdebias_jax.models.model import EncoderModel, abstract_params, init_leaves, init_params
from peftdebias_jax.models.seams import Patch
from peftdebias_jax.models.weight_files import find_weights, read_weights, weight_keys
from peftdebias_jax.models.weights import fill_params, hf_key, leaf_paths, to_state_dict

log = logging.getLogger(__name__)

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
HUB_FILES = [
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
]


def resolve_checkpoint_dir(path_or_name: str | os.PathLike) -> Path:
    """A local checkpoint directory, downloading a hub name through huggingface_hub if needed."""
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: is a file; pass the checkpoint directory that holds it")
    name = str(path_or_name)
    if not HUB_NAME.match(name):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    try:
        from huggingface_hub import snapshot_download

        directory = Path(
            snapshot_download(name, allow_patterns=HUB_FILES, local_files_only=offline)
        )
        if not any(directory.glob("*.safetensors*")):
            directory = Path(
                snapshot_download(
                    name, allow_patterns=["pytorch_model*.bin*"], local_files_only=offline
                )
            )
    except Exception as err:
        raise CheckpointError(
            f"{name!r} is not a local directory and could not be fetched from the Hugging Face "
            f"hub ({type(err).__name__}: {err}). If this machine is offline, pass a local "
            "directory that holds config.json, model.safetensors and the tokenizer files."
        ) from None
    return directory


def read_config(directory: Path, dtype: str = "float32") -> tuple[EncoderConfig, dict[str, Any]]:
    """EncoderConfig from `directory/config.json`, plus the raw JSON (for labels etc.)."""
    path = directory / "config.json"
    raw = read_config_json(path)
    return EncoderConfig.from_hf_dict(raw, source=str(path)).replace(dtype=dtype), raw


PatchSpec = Mapping[str, Any] | Sequence[Patch]


def build_patches(patches: PatchSpec) -> tuple[Patch, ...]:
    """{name: PatchConfig} (or ready Patch objects) -> patches, in order; names are unique."""
    if isinstance(patches, Mapping):
        built = [
            spec.build(name) if hasattr(spec, "build") else spec for name, spec in patches.items()
        ]
    else:
        built = list(patches)
    names = [p.name for p in built]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"patch names must be unique; repeated: {duplicates}")
    return tuple(built)


def check_patch_leaves(params: dict, patches: Sequence[Patch]) -> None:
    """Every patch must have created parameters; LoRA targets that match no module are
    named with the dense modules that exist (the names `target_modules` is matched on)."""
    paths = [path for path, _ in leaf_paths(params)]
    scopes = {part for path in paths for part in path}
    for patch in patches:
        if patch.scope in scopes:
            continue
        detail = getattr(patch, "target_modules", None)
        hint = ""
        if detail is not None:
            kernels = [hf_key(p)[: -len(".weight")] for p in paths if p[-1] == "kernel"]
            shown = ", ".join(sorted({re.sub(r"layer\.\d+", "layer.<i>", k) for k in kernels}))
            hint = f" (target_modules={detail!r} match no module; the modules: {shown})"
        raise ConfigError(f"patch {patch.name!r} ({patch.method}) adds no parameters{hint}")


def from_config(
    config: EncoderConfig,
    head: str = "none",
    num_labels: int | None = None,
    patches: PatchSpec = (),
    seed: int = 0,
    add_pooling_layer: bool = False,
) -> tuple[EncoderModel, dict]:
    """A randomly initialised model (transformers' initialisation), for tests and demos."""
    built = build_patches(patches)
    module = EncoderModel(config, head, num_labels, add_pooling_layer, built)
    params = init_params(module, jax.random.key(seed))
    check_patch_leaves(params, built)
    return module, params


def from_pretrained(
    path_or_name: str | os.PathLike,
    head: str = "none",
    num_labels: int | None = None,
    patches: PatchSpec = (),
    dtype: str = "float32",
    seed: int = 0,
) -> tuple[EncoderModel, dict]:
    """Loads a BERT/RoBERTa checkpoint into an EncoderModel with the chosen head.

    Weights come from model.safetensors (single or sharded) or, when torch is installed,
    pytorch_model.bin via torch.load(weights_only=True). `patches` is {name: PatchConfig}
    (or a sequence of Patch objects); their leaves are freshly initialised with `seed`.
    Missing encoder weights are an
    error naming them; unused checkpoint keys are logged; heads (and patches) absent from
    the checkpoint are freshly initialised with `seed` and logged.
    """
    directory = resolve_checkpoint_dir(path_or_name)
    config, raw = read_config(directory, dtype)
    if head == "classifier" and num_labels is None:
        labels = raw.get("id2label")
        if not labels:
            raise ConfigError(
                f"{directory / 'config.json'}: no 'id2label' field; pass num_labels= for "
                'head="classifier"'
            )
        num_labels = len(labels)
    weights_path = find_weights(directory)
    state = read_weights(weights_path)
    has_pooler = any(k.endswith("pooler.dense.weight") for k in state)
    module = EncoderModel(config, head, num_labels, add_pooling_layer=head == "none" and has_pooler)
    built = build_patches(patches)
    module = module.clone(patches=built)
    patch_leaves = patch_paths(module)
    params, report = fill_params(
        abstract_params(module),
        state,
        config.base_name,
        str(weights_path),
        lambda paths: init_leaves(module, jax.random.key(seed), paths),
        patch_leaves,
        config.tie_word_embeddings,
    )
    check_patch_leaves(params, built)
    log.info("loaded %d tensors from %s", len(report.loaded), weights_path)
    if report.initialised:
        log.info("freshly initialised (not in the checkpoint): %s", report.initialised)
    if head == "mlm" and not has_mlm_head(directory):
        log.warning(
            "%s has no masked-LM head (no %s weights): the head is freshly initialised, so "
            "its masked-token scores mean nothing until the head is trained",
            directory, " / ".join(f"{p}.*" for p in MLM_HEAD_PREFIXES),
        )  # fmt: skip
    if report.unused:
        log.warning("unused checkpoint keys in %s: %s", weights_path, report.unused)
    return module, params


MLM_HEAD_PREFIXES = ("cls.predictions.transform", "lm_head.dense")


def has_mlm_head(path_or_name: str | os.PathLike) -> bool:
    """Whether a checkpoint holds a trained masked-LM head (its transform weights), read
    from the weights file's header: sentence encoders such as all-MiniLM-L6-v2 ship none."""
    keys = weight_keys(find_weights(resolve_checkpoint_dir(path_or_name)))
    return any(k.startswith(MLM_HEAD_PREFIXES) for k in keys)


def patch_paths(module: EncoderModel) -> set[tuple[str, ...]]:
    """Leaf paths that exist only because of the module's patches."""
    if not module.patches:
        return set()
    plain = {p for p, _ in leaf_paths(abstract_params(module.clone(patches=())))}
    return {p for p, _ in leaf_paths(abstract_params(module)) if p not in plain}


def load_tokenizer(path_or_name: str | os.PathLike):
    """The tokenizer saved beside the weights.

    Loaded from the directory; a directory with only `vocab.txt` is built with `vocab=`
    (never `vocab_file=`, which in transformers 5 silently maps every word to [UNK]).
    A tokenizer that maps plain vocabulary words to its unknown token is rejected.
    """
    from transformers import AutoTokenizer, BertTokenizerFast

    directory = resolve_checkpoint_dir(path_or_name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except Exception as err:
        vocab_file = directory / "vocab.txt"
        if not vocab_file.exists():
            raise CheckpointError(f"{directory}: cannot load a tokenizer ({err})") from None
        vocab = read_vocab(vocab_file)
        lower = not any(t.lower() != t for t in vocab if not t.startswith("["))
        tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=lower)
    check_tokenizer(tokenizer, directory)
    return tokenizer


def read_vocab(path: Path) -> dict[str, int]:
    """A WordPiece vocab.txt (one token a line) as {token: id}."""
    tokens = path.read_text(encoding="utf-8").splitlines()
    return {token: i for i, token in enumerate(tokens) if token}


def check_tokenizer(tokenizer, directory: Path) -> None:
    """Raises if words that are in the vocabulary encode to the unknown token."""
    unk = tokenizer.unk_token_id
    vocab_file = directory / "vocab.txt"
    vocab = read_vocab(vocab_file) if vocab_file.exists() else tokenizer.get_vocab()
    words = [w for w in vocab if w.isalpha() and w.islower() and len(w) > 2][:20]
    if unk is None or not words:
        return
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
    if all(i == [unk] for i in ids):
        raise CheckpointError(
            f"{directory}: the tokenizer maps vocabulary words such as {words[:3]} to "
            f"{tokenizer.unk_token!r}; its vocabulary did not load"
        )


TWIN_CLASSES = {
    ("bert", "mlm"): "BertForMaskedLM",
    ("bert", "classifier"): "BertForSequenceClassification",
    ("bert", "none"): "BertModel",
    ("roberta", "mlm"): "RobertaForMaskedLM",
    ("roberta", "classifier"): "RobertaForSequenceClassification",
    ("roberta", "none"): "RobertaModel",
}


def save_pretrained(
    directory: str | os.PathLike, module: EncoderModel, params: dict, tokenizer=None
) -> Path:
    """Writes config.json + model.safetensors (+ the tokenizer) in the Hugging Face layout,
    loadable by transformers and by `from_pretrained`; patch leaves are not written. The
    directory is replaced only once the new copy is complete."""
    from safetensors.numpy import save_file

    with staged_directory(directory) as staging:
        scopes = [f".{p.scope}." for p in module.patches]
        state = {
            key: np.asarray(value, np.float32)
            for key, value in to_state_dict(jax.device_get(params)).items()
            if not any(scope in key for scope in scopes)
        }
        for head in ("cls.predictions", "lm_head"):  # an untied decoder's bias, under both names
            if f"{head}.decoder.bias" in state and f"{head}.bias" not in state:
                state[f"{head}.bias"] = state[f"{head}.decoder.bias"]
        config = module.config.to_hf_dict()
        config["architectures"] = [TWIN_CLASSES[(module.config.model_type, module.head)]]
        if module.head == "classifier":
            config["id2label"] = {str(i): f"LABEL_{i}" for i in range(module.num_labels)}
            config["label2id"] = {f"LABEL_{i}": i for i in range(module.num_labels)}
        if processes.is_writer():
            save_file(state, staging / "model.safetensors")
            write_json(staging / "config.json", config)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
    return Path(directory).absolute()
