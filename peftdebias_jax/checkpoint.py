"""Patch directories: the unit users share.

    <dir>/patch.json   format version, patch name, method + hyper-parameters, axis,
                       base-model identity (architecture, sizes, vocab, weight fingerprint),
                       the leaves' paths and shapes, a training summary
    <dir>/weights/     the patch leaves only, saved with Orbax

A directory is written next to its destination and renamed into place, so an interrupted
save never destroys the previous patch. Loading checks sizes, method and fingerprint and
names whatever differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from peftdebias_jax import masks
from peftdebias_jax.errors import CheckpointError, headline
from peftdebias_jax.files import read_json, staged_directory, write_json
from peftdebias_jax.models.model import EncoderModel, abstract_params
from peftdebias_jax.models.seams import PATCH_KINDS, Patch
from peftdebias_jax.peft import sft
from peftdebias_jax.peft.config import PatchConfig

FORMAT_VERSION = 1
PATCH_JSON = "patch.json"
WEIGHTS = "weights"
IDENTITY_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
)


def config_of(patch: Patch) -> PatchConfig:
    """The PatchConfig that builds `patch` (its method and hyper-parameters)."""
    values = {f.name: getattr(patch, f.name) for f in dataclasses.fields(patch) if f.name != "name"}
    return PatchConfig(patch.method, **values)


def find_patch(module: EncoderModel, name: str) -> Patch:
    for patch in module.patches:
        if patch.name == name:
            return patch
    raise CheckpointError(
        f"the model has no patch named {name!r}; its patches are {[p.name for p in module.patches]}"
    )


def base_leaves(params: dict, base_name: str) -> dict[tuple[str, ...], Any]:
    """The encoder's own weights: under `base_name`, no pooler, no patch leaves."""
    flat = traverse_util.flatten_dict(params)
    return {
        path: leaf
        for path, leaf in flat.items()
        if path[0] == base_name and path[1] != "pooler" and masks.patch_name(path) is None
    }


def fingerprint(params: dict, base_name: str) -> str:
    """sha256 over the encoder weights' paths, shapes and float32 bytes."""
    digest = hashlib.sha256()
    for path, leaf in sorted(base_leaves(params, base_name).items()):
        array = np.asarray(jax.device_get(leaf), dtype=np.float32)
        digest.update("/".join(path).encode())
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return "sha256:" + digest.hexdigest()


def base_identity(module: EncoderModel, params: dict, name: str | None = None) -> dict[str, Any]:
    cfg = module.config
    identity = {field: getattr(cfg, field) for field in IDENTITY_FIELDS}
    identity["name"] = name
    identity["fingerprint"] = fingerprint(params, cfg.base_name)
    return identity


def save_patch(
    directory: str | Path,
    params: dict,
    patch_name: str,
    module: EncoderModel,
    *,
    axis: str | None = None,
    base_model_name: str | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """Writes the leaves of patch `patch_name` and its description to `directory`."""
    directory = Path(directory).absolute()
    patch = find_patch(module, patch_name)
    leaves = masks.leaves_of(params, [patch_name])
    flat = traverse_util.flatten_dict(leaves)
    if not flat:
        raise CheckpointError(f"params hold no leaves of patch {patch_name!r}")
    info = {
        "format_version": FORMAT_VERSION,
        "name": patch_name,
        "patch": config_of(patch).to_dict(),
        "axis": axis,
        "base_model": base_identity(module, params, base_model_name),
        "leaves": {"/".join(p): list(np.shape(v)) for p, v in sorted(flat.items())},
        "training": training or {},
    }
    with writing(directory, "the patch"), staged_directory(directory) as staging:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(staging / WEIGHTS, to_host(leaves))
        write_json(staging / PATCH_JSON, info)
    return directory


@contextlib.contextmanager
def writing(path: Path, what: str) -> Iterator[None]:
    """Orbax/tensorstore failures while writing `path` as a CheckpointError naming it; OS
    errors (disk full, permission) pass as they are, for run.py to name."""
    try:
        yield
    except (OSError, CheckpointError):
        raise
    except Exception as err:
        cause = err.__cause__ or err.__context__
        if isinstance(cause, OSError):
            raise cause from err
        raise CheckpointError(
            f"{path}: writing {what} failed ({headline(err, 200)}); what was there before is kept"
        ) from err


def to_host(tree: Any) -> Any:
    """The tree as host numpy arrays (what Orbax and safetensors write)."""
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


def read_patch_info(directory: str | Path) -> dict[str, Any]:
    """patch.json, validated."""
    path = Path(directory) / PATCH_JSON
    info = read_json(
        path, f"patch description (is {directory} a patch directory?)", CheckpointError
    )
    for key in ("format_version", "name", "patch", "base_model", "leaves"):
        if key not in info:
            raise CheckpointError(f"{path}: field {key!r} is missing")
    if info["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {info['format_version']} is newer than this library "
            f"reads ({FORMAT_VERSION})"
        )
    return info


def check_base(
    info: dict, module: EncoderModel, params: dict, source: Path, verify_fingerprint: bool
) -> None:
    """Raises if the model's sizes (or, when asked, its weights) differ from the patch's base."""
    saved = info["base_model"]
    cfg = module.config
    for field in IDENTITY_FIELDS:
        if field in saved and saved[field] != getattr(cfg, field):
            raise CheckpointError(
                f"{source}: the patch was trained on a base with {field}={saved[field]!r}, "
                f"but this model has {field}={getattr(cfg, field)!r}"
            )
    if verify_fingerprint:
        current = fingerprint(params, cfg.base_name)
        if saved.get("fingerprint") != current:
            raise CheckpointError(
                f"{source}: the base weights differ from those the patch was trained on "
                f"(fingerprint {saved.get('fingerprint')} vs {current}); pass "
                "check_fingerprint=False to load it anyway"
            )


def with_patch(module: EncoderModel, name: str, config: PatchConfig) -> EncoderModel:
    """`module` with patch `name` added, or checked to be the same method and settings."""
    for patch in module.patches:
        if patch.name == name:
            have = config_of(patch).to_dict()
            want = config.to_dict()
            diff = {k: (have.get(k), want.get(k)) for k in set(have) | set(want)}
            diff = {k: v for k, v in diff.items() if v[0] != v[1]}
            if diff:
                raise CheckpointError(
                    f"the model's patch {name!r} differs from the saved one: "
                    + ", ".join(f"{k}: model {a!r} vs saved {b!r}" for k, (a, b) in diff.items())
                )
            return module
    return module.clone(patches=(*module.patches, config.build(name)))


def insert_leaves(module: EncoderModel, params: dict, leaves: dict, source: str | Path) -> dict:
    """`params` with the given patch leaves set; paths and shapes must match the module."""
    expected = traverse_util.flatten_dict(abstract_params(module))
    flat = traverse_util.flatten_dict(leaves)
    for path, leaf in flat.items():
        if path not in expected:
            raise CheckpointError(f"{source}: leaf {'/'.join(path)} does not exist in the model")
        if tuple(np.shape(leaf)) != tuple(expected[path].shape):
            raise CheckpointError(
                f"{source}: leaf {'/'.join(path)} has shape {tuple(np.shape(leaf))}, "
                f"the model expects {tuple(expected[path].shape)}"
            )
    merged = dict(traverse_util.flatten_dict(params))
    merged.update({p: jax.numpy.asarray(v, dtype=expected[p].dtype) for p, v in flat.items()})
    missing = [p for p in expected if p not in merged]
    if missing:
        raise CheckpointError(f"{source}: no values for {['/'.join(p) for p in missing[:5]]}")
    return traverse_util.unflatten_dict(merged)


def load_patch(
    directory: str | Path,
    module: EncoderModel,
    params: dict,
    *,
    name: str | None = None,
    check_fingerprint: bool = True,
) -> tuple[EncoderModel, dict]:
    """Adds the saved patch to (module, params); checks base sizes, method and fingerprint."""
    directory = Path(directory).absolute()
    info = read_patch_info(directory)
    source = directory / PATCH_JSON
    check_base(info, module, params, source, verify_fingerprint=check_fingerprint)
    config = PatchConfig.from_dict(info["patch"])
    saved_name = info["name"]
    check_described_leaves(info, with_patch(module, saved_name, config), saved_name, source)
    name = name or saved_name
    module = with_patch(module, name, config)
    leaves = restore_orbax(directory / WEIGHTS)
    if name != saved_name:
        leaves = rename_patch(leaves, saved_name, name)
    return module, insert_leaves(module, params, leaves, directory)


def check_described_leaves(info: dict, module: EncoderModel, name: str, source: Path) -> None:
    """The leaves patch.json's method and settings make must be the ones it lists as
    stored: otherwise the file was edited, or describes other weights."""
    flat = traverse_util.flatten_dict(abstract_params(module))
    made = {"/".join(p): list(v.shape) for p, v in flat.items() if masks.patch_name(p) == name}
    if made != info.get("leaves", made):
        only_made = sorted(set(made) - set(info["leaves"]))[:3]
        only_stored = sorted(set(info["leaves"]) - set(made))[:3]
        shapes = [k for k in set(made) & set(info["leaves"]) if made[k] != info["leaves"][k]][:3]
        raise CheckpointError(
            f"{source}: its patch settings ({info['patch'].get('method')!r}) do not make the "
            f"leaves it lists as stored (made, not listed: {only_made}; listed, not made: "
            f"{only_stored}; other shapes: {shapes}): the file was edited or belongs to other "
            "weights; save the patch again"
        )


def load_patches(
    directories: list[Path], module: EncoderModel, params: dict
) -> tuple[EncoderModel, dict, dict]:
    """Every patch directory in turn (a stack, in order): module patches are added as
    modules (`load_patch`; frozen by mask rules), sparse SFT diffs are added to the weights
    (`load_sft_patch`). Returns (module, params, {leaf path: bool entries a diff changed}),
    the entries to freeze one by one."""
    changed: dict = {}
    for directory in directories:
        if is_sft_patch(directory):
            params, support = load_sft_patch(directory, module, params)
            for path, entries in support.items():
                changed[path] = changed[path] | entries if path in changed else entries
        else:
            module, params = load_patch(directory, module, params)
    return module, params, changed


def rename_patch(leaves: dict, old: str, new: str) -> dict:
    """Moves leaves from scopes `<kind>_<old>` to `<kind>_<new>`."""
    flat = traverse_util.flatten_dict(leaves)

    def rename(part: str) -> str:
        kind, _, rest = part.partition("_")
        return f"{kind}_{new}" if kind in PATCH_KINDS and rest == old else part

    renamed = {tuple(rename(p) for p in path[:-1]) + path[-1:]: v for path, v in flat.items()}
    return traverse_util.unflatten_dict(renamed)


class TrainCheckpoints:
    """Resumable train state under `<workdir>/checkpoints` (Orbax CheckpointManager).

    Each checkpoint holds a pytree (trainable params, optimizer state, step, rng) and a
    JSON record (data position, best metric so far, ...). Frozen weights are not saved:
    they come back from the pretrained checkpoint the config names. A tree saved without
    "opt_state" (a finished phase's last step) has `"optimizer": false` in its record and
    restores without it.
    """

    def __init__(self, directory: str | Path, max_to_keep: int = 2) -> None:
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def disk_bytes(self) -> int:
        """Bytes of the files under the checkpoint directory."""
        return sum(f.stat().st_size for f in self.directory.rglob("*") if f.is_file())

    def discard(self, step: int) -> None:
        """Deletes the checkpoint of `step` (one that does not restore)."""
        self.manager.delete(step)

    def save(self, step: int, tree: Any, record: dict[str, Any]) -> None:
        with writing(self.directory, f"the checkpoint of step {step}"):
            self._save(step, tree, record)

    def _save(self, step: int, tree: Any, record: dict[str, Any]) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(to_host(tree)), record=ocp.args.JsonSave(record)
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
        """The saved tree (shaped like `target`, less "opt_state" when it was saved without
        it) and record of `step`."""
        saved = self.manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))
        record = dict(saved["record"])
        if record.get("optimizer") is False:
            target = {key: value for key, value in target.items() if key != "opt_state"}
        abstract = jax.tree_util.tree_map(
            lambda x: (
                jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype) if hasattr(x, "shape") else x
            ),
            jax.device_get(target),
        )
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        return restored["state"], record

    def close(self) -> None:
        self.manager.close()


def save_tree(directory: str | Path, tree: Any) -> Path:
    """A pytree saved with Orbax, replacing `directory` only once the new copy is written."""
    directory = Path(directory).absolute()
    with (
        writing(directory, "a checkpoint"),
        staged_directory(directory, create=False) as staging,
        ocp.StandardCheckpointer() as checkpointer,
    ):
        checkpointer.save(staging, to_host(tree))
    return directory


def load_tree(directory: str | Path) -> Any:
    return restore_orbax(Path(directory).absolute())


def saved_state(directory: str | Path, step: int) -> Any:
    """The tree a `TrainCheckpoints` in `directory` saved at `step`, as it was saved."""
    return restore_orbax(Path(directory).absolute() / str(step) / "state")


def restore_orbax(path: Path) -> Any:
    """An Orbax-saved tree; a missing or damaged one is a CheckpointError naming it (Orbax
    and tensorstore raise many kinds of error for a cut-short save)."""
    if not path.exists():
        raise CheckpointError(f"{path}: not found")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path)
    except Exception as err:
        raise CheckpointError(
            f"{path}: does not restore ({headline(err, 200)}); the save was cut "
            "short or its files changed: write it again (rerun the phase that made it, "
            "e.g. --rerun=upstream)"
        ) from err


def save_sft_patch(
    directory: str | Path,
    diff: dict[str, dict[str, np.ndarray]],
    module,
    base_params: dict,
    *,
    fraction: float,
    k: int,
    axis: str | None = None,
    base_model_name: str | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """patch.json (method "sft", k, per-leaf shapes and stored entries) + the sparse diff,
    saved with Orbax; `base_params` are the pre-trained weights the diff applies to."""
    flat = traverse_util.flatten_dict(base_params)
    info = {
        "format_version": FORMAT_VERSION,
        "name": sft.METHOD,
        "patch": {"method": sft.METHOD, "fraction": fraction, "k": k},
        "axis": axis,
        "base_model": base_identity(module, base_params, base_model_name),
        "leaves": {
            key: {"shape": list(np.shape(flat[tuple(key.split("/"))])), "stored": entry_count}
            for key, entry_count in sorted((k, int(e["indices"].size)) for k, e in diff.items())
        },
        "training": training or {},
    }
    directory = Path(directory).absolute()
    with writing(directory, "the patch"), staged_directory(directory) as staging:
        with ocp.StandardCheckpointer() as checkpointer:
            # Orbax keys may not hold "/": the leaf paths are stored as a list instead.
            checkpointer.save(staging / WEIGHTS, {"diff": [diff[k] for k in sorted(diff)]})
        write_json(staging / PATCH_JSON, info)
    return directory


def is_sft_patch(directory: str | Path) -> bool:
    path = Path(directory) / PATCH_JSON
    if not path.exists():
        return False
    return json.loads(path.read_text()).get("patch", {}).get("method") == sft.METHOD


def load_sft_patch(
    directory: str | Path, module, params: dict, check_fingerprint: bool = True
) -> tuple[dict, dict]:
    """(params + diff, {path: bool support}) for a saved SFT patch; the base must be the
    one the diff was computed against (sizes and, unless told otherwise, fingerprint)."""
    directory = Path(directory).absolute()
    info = read_patch_info(directory)
    check_base(info, module, params, directory / PATCH_JSON, check_fingerprint)
    stored = restore_orbax(directory / WEIGHTS)["diff"]
    keys = sorted(info["leaves"])
    if len(keys) != len(stored):
        raise CheckpointError(
            f"{directory}: {len(stored)} stored leaves, but patch.json lists {len(keys)}"
        )
    diff = dict(zip(keys, stored, strict=True))
    return sft.apply_diff(params, diff, directory), sft.support(diff, params)
