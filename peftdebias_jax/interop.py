"""Patch exchange with the PyTorch ecosystem (safetensors + config json; nothing is pickled).

- Hugging Face `peft` LoRA layout: `adapter_config.json` + `adapter_model.safetensors`,
  keys `base_model.model.<module>.lora_{A,B}.weight`.
- `adapters` library layout: `adapter_config.json` + `adapter.safetensors`, for seq_bn,
  double_seq_bn, prefix_tuning and lora.

Keys carry the `bert.`/`roberta.` prefix when the module has a head (the PyTorch twin is a
`*ForMaskedLM` / `*ForSequenceClassification`) and none for a bare encoder (`BertModel`).
Every mapping is a function of our parameter path, so export and import share it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from peftdebias_jax import masks
from peftdebias_jax.checkpoint import config_of, find_patch, insert_leaves, with_patch
from peftdebias_jax.errors import CheckpointError
from peftdebias_jax.files import read_json
from peftdebias_jax.models.model import EncoderModel, abstract_params
from peftdebias_jax.models.pretrained import TWIN_CLASSES
from peftdebias_jax.models.seams import PATCH_KINDS
from peftdebias_jax.models.weight_files import read_safetensors
from peftdebias_jax.models.weights import hf_key
from peftdebias_jax.peft.config import PatchConfig

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
ADAPTERS_CONFIG, ADAPTERS_WEIGHTS = "adapter_config.json", "adapter.safetensors"
ADAPTERS_VERSION = "adapters.1.3.0"
ADAPTERS_LORA_TARGETS = {
    "attention.self.query": ("selfattn_lora", "q"),
    "attention.self.key": ("selfattn_lora", "k"),
    "attention.self.value": ("selfattn_lora", "v"),
    "intermediate.dense": ("intermediate_lora", None),
    "output.dense": ("output_lora", None),
}


def key_prefix(module: EncoderModel) -> str:
    """ "" for a bare encoder, "bert." / "roberta." when the PyTorch twin has a head."""
    return "" if module.head == "none" else module.config.base_name + "."


def strip_base(module: EncoderModel, key: str) -> str:
    base = module.config.base_name + "."
    return key[len(base) :] if key.startswith(base) else key


def patch_leaf_paths(module: EncoderModel, name: str) -> dict[tuple[str, ...], Any]:
    """The patch's leaves in the module's parameter tree (shapes only)."""
    flat = traverse_util.flatten_dict(abstract_params(module))
    return {p: v for p, v in flat.items() if masks.patch_name(p) == name}


def transposed(array: np.ndarray, leaf: str) -> np.ndarray:
    return (
        np.ascontiguousarray(np.asarray(array).T)
        if leaf in ("kernel", "lora_A", "lora_B")
        else array
    )


# ---------------------------------------------------------------------------- HF peft LoRA


def peft_key(module: EncoderModel, path: tuple[str, ...]) -> str:
    """.../query/lora_<n>/lora_A -> base_model.model.<prefix>encoder...query.lora_A.weight"""
    dense = hf_key((*path[:-2], "x"))[: -len(".x")]
    return f"base_model.model.{key_prefix(module)}{strip_base(module, dense)}.{path[-1]}.weight"


def export_peft_lora(
    directory: str | Path, params: dict, module: EncoderModel, name: str, base_model: str = ""
) -> Path:
    """Writes LoRA patch `name` in the HF peft layout (PeftModel.from_pretrained loads it)."""
    patch = find_patch(module, name)
    if patch.method != "lora":
        raise CheckpointError(f"patch {name!r} is {patch.method}; the peft layout is for LoRA")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = traverse_util.flatten_dict(params)
    tensors = {
        peft_key(module, path): transposed(np.asarray(flat[path], np.float32), path[-1])
        for path in patch_leaf_paths(module, name)
    }
    targets = patch.target_modules
    if isinstance(targets, str):  # peft's regexes match its own module names: list them
        keys = [peft_key(module, p) for p in patch_leaf_paths(module, name) if p[-1] == "lora_A"]
        targets = sorted({k[len("base_model.model.") : -len(".lora_A.weight")] for k in keys})
    config = {
        "peft_type": "LORA",
        "task_type": None,  # a task type would make peft expect the head's weights too
        "base_model_name_or_path": base_model,
        "r": patch.r,
        "lora_alpha": patch.alpha,
        "lora_dropout": patch.dropout,
        "target_modules": list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    save_file(tensors, directory / PEFT_WEIGHTS)
    (directory / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def import_peft_lora(
    directory: str | Path, module: EncoderModel, params: dict, name: str
) -> tuple[EncoderModel, dict]:
    """Reads an HF peft LoRA directory into patch `name` of (module, params)."""
    directory = Path(directory)
    config_path = directory / PEFT_CONFIG
    raw = read_json(config_path, "peft adapter config", CheckpointError)
    if raw.get("peft_type") != "LORA":
        raise CheckpointError(f"{config_path}: peft_type is {raw.get('peft_type')!r}, not 'LORA'")
    unsupported = {
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
    }
    for field, ok in unsupported.items():
        if raw.get(field, ok) != ok:
            raise CheckpointError(
                f"{config_path}: field {field!r}={raw[field]!r} is not supported (only {ok!r})"
            )
    targets = raw.get("target_modules") or ["query", "value"]
    config = PatchConfig(
        "lora",
        r=int(raw["r"]),
        alpha=float(raw.get("lora_alpha", raw["r"])),
        dropout=float(raw.get("lora_dropout", 0.0)),
        target_modules=targets if isinstance(targets, str) else sorted(targets),
    )
    module = with_patch(module, name, config)
    state = read_weights(directory / PEFT_WEIGHTS, directory)
    leaves = {}
    for path in patch_leaf_paths(module, name):
        key = peft_key(module, path)
        candidates = [key, key.replace(".weight", f".{name}.weight")]
        bare = "base_model.model." + strip_base(module, key[len("base_model.model.") :])
        candidates += [bare, bare.replace(".weight", f".{name}.weight")]
        leaves[path] = transposed(
            lookup(state, candidates, directory / PEFT_WEIGHTS, path), path[-1]
        )
    return module, insert_leaves(module, params, traverse_util.unflatten_dict(leaves), directory)


# ----------------------------------------------------------------------- adapters library


def adapters_key(module: EncoderModel, path: tuple[str, ...], name: str) -> str:
    """Our patch leaf path -> the `adapters` library's state-dict key."""
    prefix = key_prefix(module)
    scope = next(
        i
        for i, part in enumerate(path[:-1])
        if part.partition("_")[0] in PATCH_KINDS and part.partition("_")[2] == name
    )
    kind = path[scope].partition("_")[0]
    owner = strip_base(module, hf_key((*path[:scope], "x"))[: -len(".x")])
    rest = path[scope + 1 :]
    if kind == "adapter":  # .../output/adapter_n/{down,up}/{kernel,bias}
        layer = {"down": "adapter_down.0", "up": "adapter_up"}[rest[0]]
        leaf = "weight" if rest[1] == "kernel" else "bias"
        return f"{prefix}{owner}.adapters.{name}.{layer}.{leaf}"
    if kind == "lora":  # .../query/lora_n/lora_A
        return f"{prefix}{owner}.loras.{name}.{rest[0]}"
    if kind == "prefix":  # <base>/prefix_n/control_trans | wte/embedding | control_trans_k/...
        head = f"{prefix}prefix_tuning.prefix_tunings.{name}.self_prefix"
        if rest == ("control_trans",):
            return f"{head}.control_trans"
        if rest[0] == "wte":
            return f"{head}.wte.weight"
        index = rest[0].rpartition("_")[2]
        return f"{head}.control_trans.{index}.{'weight' if rest[1] == 'kernel' else 'bias'}"
    raise CheckpointError(f"no `adapters` layout for {'/'.join(path)}")


def adapters_config(module: EncoderModel, name: str) -> dict[str, Any]:
    """The `config` block of adapters' adapter_config.json for our patch."""
    patch = find_patch(module, name)
    method = patch.method
    if method in ("seq_bn", "double_seq_bn"):
        return {
            "mh_adapter": patch.mh_adapter,
            "output_adapter": patch.output_adapter,
            "reduction_factor": patch.reduction_factor,
            "non_linearity": patch.non_linearity,
            "original_ln_before": patch.original_ln_before,
            "original_ln_after": True,
            "residual_before_ln": True,
            "adapter_residual_before_ln": False,
            "ln_before": False,
            "ln_after": False,
            "init_weights": patch.init_weights,
            "is_parallel": False,
            "scaling": float(patch.scaling),
            "use_gating": False,
            "dropout": patch.dropout,
            "leave_out": [],
            "phm_layer": False,
            "inv_adapter": None,
            "cross_adapter": False,
        }
    if method == "prefix_tuning":
        return {
            "architecture": "prefix_tuning",
            "encoder_prefix": True,
            "cross_prefix": True,
            "flat": patch.flat,
            "prefix_length": patch.prefix_length,
            "bottleneck_size": patch.bottleneck_size,
            "non_linearity": patch.non_linearity,
            "dropout": patch.dropout,
            "leave_out": [],
            "use_gating": False,
            "shared_gating": True,
        }
    if method == "lora":
        return {
            "architecture": "lora",
            "r": patch.r,
            "alpha": patch.alpha,
            "dropout": patch.dropout,
            "composition_mode": "add",
            "init_weights": "lora",
            "use_gating": False,
            "leave_out": [],
            **adapters_lora_targets(module, name),
        }
    raise CheckpointError(f"patch {name!r} is {method}, which the `adapters` layout lacks here")


def adapters_lora_targets(module: EncoderModel, name: str) -> dict[str, Any]:
    """selfattn_lora / attn_matrices / intermediate_lora / output_lora for our LoRA targets."""
    modules = set()
    for path in patch_leaf_paths(module, name):
        dense = strip_base(module, hf_key((*path[:-2], "x"))[: -len(".x")])
        modules.add(re.sub(r"^encoder\.layer\.\d+\.", "", dense))
    unknown = sorted(modules - set(ADAPTERS_LORA_TARGETS))
    if unknown:
        raise CheckpointError(
            f"LoRA patch {name!r} targets {unknown}, which the `adapters` library cannot hold "
            f"(it supports {sorted(ADAPTERS_LORA_TARGETS)})"
        )
    flags = {"selfattn_lora": False, "intermediate_lora": False, "output_lora": False}
    matrices = []
    for target in modules:
        flag, matrix = ADAPTERS_LORA_TARGETS[target]
        flags[flag] = True
        if matrix:
            matrices.append(matrix)
    return {**flags, "attn_matrices": sorted(matrices, key="qkv".index)}


def export_adapters(
    directory: str | Path, params: dict, module: EncoderModel, name: str, base_model: str = ""
) -> Path:
    """Writes patch `name` in the `adapters` layout (`model.load_adapter(dir,
    use_safetensors=True)` loads it)."""
    directory = Path(directory)
    config = adapters_config(module, name)
    directory.mkdir(parents=True, exist_ok=True)
    flat = traverse_util.flatten_dict(params)
    tensors = {}
    for path in patch_leaf_paths(module, name):
        array = np.asarray(flat[path], np.float32)
        if path[-1] == "control_trans":
            array = array.reshape(-1)
        tensors[adapters_key(module, path, name)] = transposed(array, path[-1])
    meta = {
        "config": config,
        "hidden_size": module.config.hidden_size,
        "model_class": twin_class(module),
        "model_name": base_model,
        "model_type": module.config.model_type,
        "name": name,
        "version": ADAPTERS_VERSION,
    }
    save_file(tensors, directory / ADAPTERS_WEIGHTS)
    (directory / ADAPTERS_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def import_adapters(
    directory: str | Path, module: EncoderModel, params: dict, name: str | None = None
) -> tuple[EncoderModel, dict]:
    """Reads an `adapters` directory (seq_bn, double_seq_bn, prefix_tuning, lora)."""
    directory = Path(directory)
    meta = read_json(directory / ADAPTERS_CONFIG, "adapters config", CheckpointError)
    saved_name = meta.get("name")
    name = name or saved_name
    config = patch_config_from_adapters(meta.get("config", {}), directory / ADAPTERS_CONFIG)
    module = with_patch(module, name, config)
    state = read_weights(directory / ADAPTERS_WEIGHTS, directory)
    leaves = {}
    for path, shape in patch_leaf_paths(module, name).items():
        key = adapters_key(module, path, name)
        keys = [key, key.replace(f".{name}.", f".{saved_name}.")]
        keys += [strip_base(module, k) for k in keys] + [
            module.config.base_name + "." + k for k in keys
        ]
        array = lookup(state, keys, directory / ADAPTERS_WEIGHTS, path)
        if path[-1] == "control_trans":
            array = array.reshape(shape.shape)
        leaves[path] = transposed(array, path[-1])
    return module, insert_leaves(module, params, traverse_util.unflatten_dict(leaves), directory)


# Bottleneck settings this implementation fixes (the seq_bn / double_seq_bn structure).
FIXED_BOTTLENECK_FIELDS = {
    "ln_before": False,
    "ln_after": False,
    "is_parallel": False,
    "use_gating": False,
    "phm_layer": False,
    "adapter_residual_before_ln": False,
    "original_ln_after": True,
    "residual_before_ln": True,
}


def patch_config_from_adapters(raw: dict[str, Any], source: Path) -> PatchConfig:
    """adapters' config block -> our PatchConfig; unsupported settings are named."""
    architecture = raw.get("architecture")
    if architecture == "prefix_tuning":
        return PatchConfig(
            "prefix_tuning",
            flat=bool(raw.get("flat", False)),
            prefix_length=int(raw.get("prefix_length", 30)),
            bottleneck_size=int(raw.get("bottleneck_size", 512)),
            non_linearity=raw.get("non_linearity", "tanh"),
            dropout=float(raw.get("dropout", 0.0)),
        )
    if architecture == "lora":
        names = {"q": "query", "k": "key", "v": "value"}
        attention = [names[m] for m in raw.get("attn_matrices", ["q", "v"])]
        attention = attention if raw.get("selfattn_lora", True) else []
        ffn = ["intermediate.dense"] if raw.get("intermediate_lora") else []
        ffn += ["output.dense"] if raw.get("output_lora") else []
        targets: list[str] | str = attention
        if ffn:  # suffixes cannot tell the FFN output from the attention output: full regex
            modules = [f"attention.self.{m}" for m in attention] + ffn
            alternatives = "|".join(re.escape(m) for m in modules)
            targets = rf"(.*\.)?encoder\.layer\.\d+\.({alternatives})"
        return PatchConfig(
            "lora",
            r=int(raw.get("r", 8)),
            alpha=float(raw.get("alpha", 8)),
            dropout=float(raw.get("dropout", 0.0)),
            target_modules=targets,
        )
    if architecture not in (None, "bottleneck"):
        raise CheckpointError(f"{source}: architecture {architecture!r} is not supported")
    for field, ok in FIXED_BOTTLENECK_FIELDS.items():
        if raw.get(field, ok) != ok:
            raise CheckpointError(
                f"{source}: field {field!r}={raw[field]!r} is not supported (only {ok!r})"
            )
    if raw.get("inv_adapter"):
        raise CheckpointError(f"{source}: field 'inv_adapter' is not supported")
    method = "double_seq_bn" if raw.get("mh_adapter") else "seq_bn"
    return PatchConfig(
        method,
        reduction_factor=raw.get("reduction_factor", 16),
        non_linearity=str(raw.get("non_linearity", "relu")).lower(),
        original_ln_before=bool(raw.get("original_ln_before", method == "seq_bn")),
        mh_adapter=bool(raw.get("mh_adapter", False)),
        output_adapter=bool(raw.get("output_adapter", True)),
        init_weights=raw.get("init_weights", "bert"),
        scaling=float(raw.get("scaling", 1.0)),
        dropout=float(raw.get("dropout", 0.0)),
    )


def twin_class(module: EncoderModel) -> str:
    """The transformers class whose weights and outputs the module matches."""
    return TWIN_CLASSES[(module.config.model_type, module.head)]


# ------------------------------------------------------------------------------- helpers


def read_weights(path: Path, directory: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        present = sorted(p.name for p in directory.iterdir())
        raise CheckpointError(
            f"{path}: not found (found {present}); only safetensors is read, never a pickle"
        )
    return read_safetensors(path)


def lookup(
    state: dict[str, np.ndarray], keys: list[str], source: Path, path: tuple[str, ...]
) -> np.ndarray:
    for key in keys:
        if key in state:
            return np.asarray(state[key], np.float32)
    raise CheckpointError(
        f"{source}: no tensor for {'/'.join(path)} (looked for {keys[0]!r}); "
        f"the file has keys like {sorted(state)[:3]}"
    )


__all__ = [
    "config_of",
    "export_adapters",
    "export_peft_lora",
    "import_adapters",
    "import_peft_lora",
]
