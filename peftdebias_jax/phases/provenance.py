"""Which settings produced each phase's results in a workdir (`phases.json`), so that a
rerun with settings that change what a phase computed is refused, naming the changed
keys, instead of silently reusing (or resuming) results of other settings; `--rerun`
clears a phase's outputs so that it computes them again.

A phase is recorded when it starts (its checkpoints already depend on the settings) and
again when it finishes. Phases that recompute on every run (evaluate, report) and the
cached pretrain base (checked by its own record) are not recorded.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import ml_collections

from peftdebias_jax import processes
from peftdebias_jax.errors import ConfigError
from peftdebias_jax.files import read_json

log = logging.getLogger(__name__)
RECORD = "phases.json"
COMMON = ("seed", "axis", "model")
# the config sections each phase's results depend on
DEPENDS: dict[str, tuple[str, ...]] = {
    "upstream": (*COMMON, "patch", "upstream"),
    "cross_axis": (*COMMON, "patch", "upstream", "cross_axis"),
    "bias_select": (*COMMON, "downstream", "beft"),
    "fisher_lowrank": (*COMMON, "downstream", "fisher"),
    "downstream": (*COMMON, "patch", "upstream", "downstream", "beft", "fisher", "bootstrap"),
    "baseline": (*COMMON, "downstream", "bootstrap"),
    "transfer": (*COMMON, "patch", "upstream", "downstream", "transfer", "bootstrap"),
}
# keys that cannot change results: cadence of logs and checkpoints, how steps are grouped
# into compiled calls (the same result for any value), device layout, vmap chunking
IGNORED = re.compile(
    r"\.(log_every|checkpoint_every|keep_checkpoints|steps_per_call|eval_batch_size)$|^parallel\.|^fisher\.chunk$"
)
# what a phase leaves in the workdir (globs), removed by --rerun
OUTPUTS: dict[str, tuple[str, ...]] = {
    "upstream": (
        "upstream*.done.json",
        "head_warmup",
        "patch",
        "patch_final",
        "dense_model",
        "sft_mask",
        "sft_selection.json",
        "checkpoints/upstream*",
    ),
    "cross_axis": ("cross_axis",),
    "bias_select": ("bias_scores.json", "bias_probe", "plots/bias_scores.png"),
    "fisher_lowrank": ("fisher.json", "fisher", "lowrank"),
    "downstream": (
        "downstream.done.json",
        "downstream_results.json",
        "predictions",
        "checkpoints/downstream*",
    ),
    "baseline": ("baseline",),
    "transfer": ("transfer",),
}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def settings_of(config: ml_collections.ConfigDict, phase: str) -> dict[str, Any]:
    """The flat settings ("section.key": value, JSON-normalised) `phase`'s results depend on."""
    tree = json.loads(json.dumps(config.to_dict(), default=str))
    wanted = {k: v for k, v in tree.items() if k in DEPENDS[phase]}
    return {k: v for k, v in flatten(wanted).items() if not IGNORED.search(k)}


def read(workdir: Path) -> dict[str, Any]:
    path = Path(workdir) / RECORD
    return read_json(path, "phase record", ConfigError) if path.exists() else {}


def changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(recorded) | set(current))
    missing = "(absent)"
    return [
        f"config.{k}: {recorded.get(k, missing)!r} -> {current.get(k, missing)!r}"
        for k in keys
        if recorded.get(k, missing) != current.get(k, missing)
    ]


def check(config: ml_collections.ConfigDict, workdir: Path, rerun: set[str]) -> None:
    """Refuses (before anything runs) when a configured phase was started or finished in
    `workdir` with settings that change its results, unless `rerun` names it."""
    records = read(workdir)
    conflicts = []
    for phase in config.phases:
        if phase not in DEPENDS or phase not in records or phase in rerun:
            continue
        diff = changes(records[phase]["settings"], settings_of(config, phase))
        if diff:
            state = records[phase].get("state", "started")
            conflicts.append(f"{phase} ({state}): " + "; ".join(diff))
    if conflicts:
        names = ",".join(p.split(" ")[0] for p in conflicts)
        raise ConfigError(
            f"{workdir}: its results were computed with other settings:\n  "
            + "\n  ".join(conflicts)
            + f"\nRerun those phases with --rerun={names} (or --rerun=all), or choose "
            "another --workdir"
        )


def clear(workdir: Path, phases: list[str]) -> list[str]:
    """Removes each phase's outputs and record, so that it runs again; what was removed
    (by the writing process; the others only list it)."""
    removed, writer = [], processes.is_writer()
    for phase in phases:
        for pattern in OUTPUTS.get(phase, ()):
            for path in sorted(Path(workdir).glob(pattern)):
                if writer and path.is_dir():
                    shutil.rmtree(path)
                elif writer:
                    path.unlink()
                removed.append(str(path))
    records = read(workdir)
    if any(p in records for p in phases):
        write(workdir, {k: v for k, v in records.items() if k not in phases})
    return removed


def mark(config: ml_collections.ConfigDict, workdir: Path, phase: str, state: str) -> None:
    """Records that `phase` has started or finished ("started" / "finished") with these
    settings."""
    if phase not in DEPENDS:
        return
    records = read(workdir)
    records[phase] = {"state": state, "settings": settings_of(config, phase)}
    write(workdir, records)


def write(workdir: Path, records: dict[str, Any]) -> None:
    if not processes.is_writer():
        return
    path = Path(workdir) / RECORD
    staged = path.with_name(path.name + ".tmp")
    staged.write_text(json.dumps(records, indent=2, default=str) + "\n")
    staged.replace(path)


def rerun_set(names: list[str] | tuple[str, ...], config: ml_collections.ConfigDict) -> set[str]:
    """--rerun's phase names ("all": every configured phase), each one checked."""
    names = [n for n in names if n]
    if "all" in names:
        return set(config.phases)
    unknown = [n for n in names if n not in config.phases]
    if unknown:
        raise ConfigError(
            f"--rerun: {unknown} not among the configured phases {list(config.phases)}"
        )
    return set(names)
