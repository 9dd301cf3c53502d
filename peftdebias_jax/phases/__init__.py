"""The paper's phases composed from the library's parts, driven by one ml_collections
config: one module per phase on `common`, the registry and `run`.

pretrain: a biased base on a generated corpus with planted stereotypes (the demo's).
upstream: encoder + new patch -> CDA corpus -> fit(masked-LM step) -> patch directories
(`cross_axis`: the same for the other axis, beside this run's).
downstream: encoder + frozen patch(es) -> task data -> fit(classification step) -> metrics
(`baseline`: the same with no patch; `transfer`: the patch frozen on another task of its
axis, beside FT there). evaluate: CrowS-Pairs / StereoSet / SEAT for base
and base + patch, with the task metrics. bias_select, fisher_lowrank: the parameter-mask
phases. report: report.md from the workdir.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import ml_collections

from peftdebias_jax import config_checks, files, processes, trainable_sets
from peftdebias_jax import report as report_md
from peftdebias_jax.data import cda, splits, tasks
from peftdebias_jax.data.records import DataError
from peftdebias_jax.errors import ConfigError
from peftdebias_jax.evaluation import extrinsic
from peftdebias_jax.importance import bias_scores
from peftdebias_jax.phases import (
    bias_select,
    common,
    downstream,
    evaluate,
    fisher_lowrank,
    pretrain,
    provenance,
    report,
    upstream,
)
from peftdebias_jax.training import parallel

PHASES: dict[str, Callable[[ml_collections.ConfigDict, Path], object]] = {
    "pretrain": pretrain.pretrain,
    "upstream": upstream.upstream,
    "cross_axis": upstream.cross_axis,
    "bias_select": bias_select.bias_select,
    "fisher_lowrank": fisher_lowrank.fisher_lowrank,
    "baseline": downstream.baseline,
    "downstream": downstream.downstream,
    "transfer": downstream.transfer,
    "evaluate": evaluate.evaluate,
    "report": report.report,
}


log = logging.getLogger(__name__)
GENERATED = ("synthetic", "stereotyped")  # data keys the project renders itself


def load_config(spec: str | Path) -> ml_collections.ConfigDict:
    """A config file as run.py reads it: "path/to/configs/x.py[:preset]" -> its
    get_config(preset). The folder above configs/ is importable while the file loads (the
    configs import their shared `configs.common`)."""
    path, _, preset = str(spec).partition(":")
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    root = str(path.parent.parent)
    sys.path.insert(0, root)
    try:
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.get_config(preset or None)
    finally:
        sys.path.remove(root)


def default_workdir(config_filename: str) -> Path:
    """runs/<config name>[-<preset>] for --config=configs/<name>.py[:<preset>]."""
    path, _, preset = config_filename.partition(":")
    name = Path(path).stem
    return Path("runs") / (f"{name}-{preset}" if preset else name)


def input_files(config: ml_collections.ConfigDict) -> dict[str, str]:
    """{config key: local path} of every input file the configured phases will read
    (synthetic data, built-in word lists and `hf:` datasets need none)."""
    phases, up, dn, ec = set(config.phases), config.upstream, config.downstream, config.evaluate
    files: dict[str, str] = {}

    def data(key: str, value: str) -> None:
        if value and value not in GENERATED and not value.startswith("hf:"):
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
    if "transfer" in phases:
        for split in ("train_file", "validation_file", "test_file"):
            data(f"transfer.{split}", getattr(config.transfer, split))
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
        common.check_mlm_head(config)


TASK_PHASES = {"downstream", "baseline", "bias_select", "fisher_lowrank"}


def check_upstream_data(config: ml_collections.ConfigDict) -> None:
    """The patch spec is valid, and the upstream corpus and CDA word lists parse, before
    anything trains (the pretrain phase may run first)."""
    common.patch_spec(config)
    if {"upstream", "cross_axis"} & set(config.phases):
        upstream.upstream_texts(config)
        lists = upstream.word_lists(config)
        keys = {"config.upstream.word_list_key": config.upstream.word_list_key}
        if "cross_axis" in config.phases:
            keys["config.cross_axis.word_list_key"] = config.cross_axis.word_list_key
        for name, key in keys.items():
            try:
                cda.Augmenter.from_word_lists(lists, key, config.upstream.cda_mode)
            except ConfigError as err:
                raise ConfigError(f"{name} / config.upstream.cda_mode: {err}") from None


def check_choices(config: ml_collections.ConfigDict) -> None:
    """Every named choice the configured phases look up is known, each error naming its
    key: the registries (trainable sets, groupings, bias criteria) and the fixed sets."""
    phases, dn = set(config.phases), config.downstream
    fixed = {
        "config.model.init": (config.model.init, ("pretrained", "random")),
        "config.parallel.mode": (config.parallel.mode, parallel.MODES),
        "config.upstream.head_warmup": (config.upstream.head_warmup, upstream.HEAD_WARMUP_MODES),
        "config.beft.mode": (config.beft.mode, trainable_sets.BEFT_MODES),
    }
    for key, (value, known) in fixed.items():
        if value not in known:
            raise ConfigError(f"{key}={value!r}: expected one of {list(known)}")
    if (TASK_PHASES | {"transfer"}) & phases:
        trainable_sets.TRAINABLE_SETS.lookup(dn.trainable)
        extrinsic.GROUPINGS.lookup(dn.groups)
    if "bias_select" in phases and config.beft.criterion not in bias_scores.criteria():
        raise ConfigError(
            f"config.beft.criterion={config.beft.criterion!r}: expected one of "
            f"{list(bias_scores.criteria())}"
        )


def check_task_data(config: ml_collections.ConfigDict) -> None:
    """Every task split the configured phases will read (the downstream section's, and the
    transfer phase's) parses, with known labels and no empty split, before the first
    phase trains: a bad label found after upstream would cost its whole run."""
    runs = [("downstream", config)] if TASK_PHASES & set(config.phases) else []
    if "transfer" in config.phases:
        runs.append(("transfer", downstream.transfer_config(config)))
    for section, settings in runs:
        try:
            task = tasks.get(settings.downstream.task)
        except DataError as err:
            raise DataError(f"config.{section}.task: {err}") from None
        data = splits.load_task_data(settings, task)
        tasks.class_weights(task, data["labels"], data["train"], settings.downstream.class_weights,
                            "config.downstream.class_weights")  # fmt: skip


def run(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    verbose: bool = False,
    rerun: tuple[str, ...] | list[str] = (),
) -> None:
    """Checks the settings, inputs and the workdir's finished phases (`provenance`; the
    phases named in `rerun`, or "all", are cleared and run again), writes the resolved
    config to the workdir (and prints it when `verbose`), then runs the configured phases
    (each builds its model and prints its parameter summary); with `config.seeds`, runs
    them once per seed in `seed-<n>/` and reports mean ± sd across the seeds."""
    if config.seeds:
        run_seeds(config, Path(workdir), verbose, rerun)
        return
    workdir = Path(workdir)
    processes.start(config.parallel)
    again = check(config, workdir, rerun)
    processes.sync("checked")  # every process has read the workdir before it changes
    files.make_directory(workdir)
    for repair in files.recover_staged(workdir):  # what a killed save left behind
        log.info("workdir: %s", repair)
    for removed in provenance.clear(workdir, sorted(again)):
        log.info("--rerun: removed %s", removed)
    resolved = json.dumps(config.to_dict(), indent=2, default=str)
    if verbose:
        print("resolved config:\n" + resolved)
    files.write_text(workdir / "config.json", resolved + "\n")
    print(f"workdir: {workdir} (resolved config: {workdir / 'config.json'}); phases: "
          f"{', '.join(config.phases)}")  # fmt: skip
    if builds_its_base(config):
        in_step(pretrain.pretrain, config, workdir, "pretrain")
    for name in config.phases:
        provenance.mark(config, workdir, name, "started")
        in_step(PHASES[name], config, workdir, name)
        provenance.mark(config, workdir, name, "finished")
    print(f"workdir: {workdir}")


def in_step(phase: Callable, config: ml_collections.ConfigDict, workdir: Path, name: str) -> None:
    """Runs a phase with every process of a distributed run starting it together (after
    what the writer wrote before) and leaving it together (after what it wrote)."""
    processes.sync(f"{workdir}: {name} begins")
    phase(config, workdir)
    processes.sync(f"{workdir}: {name} ends")


def check(config: ml_collections.ConfigDict, workdir: Path, rerun) -> set[str]:
    """Everything checked before a run writes or trains anything: phase names, numeric
    settings, input files, task data, and the workdir's finished phases against these
    settings; returns the phases to run again."""
    unknown = [p for p in config.phases if p not in PHASES]
    if unknown:
        raise ConfigError(f"config.phases: unknown {unknown}; the phases are {list(PHASES)}")
    again = provenance.rerun_set(rerun, config)
    config_checks.check_settings(config)
    check_choices(config)
    check_inputs(config)
    check_upstream_data(config)
    check_task_data(config)
    if "evaluate" in config.phases:
        evaluate.check_benchmarks(config)
    provenance.check(config, workdir, again)
    return again


def builds_its_base(config: ml_collections.ConfigDict) -> bool:
    """Whether the run starts from the pretrain phase's base (model.name is
    config.pretrain.output) without listing that phase: then it runs first (cached)."""
    return (
        "pretrain" not in config.phases
        and config.model.init == "pretrained"
        and Path(config.model.name).resolve() == Path(config.pretrain.output).resolve()
    )


def run_seeds(
    config: ml_collections.ConfigDict,
    workdir: Path,
    verbose: bool = False,
    rerun: tuple[str, ...] | list[str] = (),
) -> None:
    """The config once per seed of `config.seeds` (config.seed set, in `seed-<n>/`; a
    finished seed is skipped phase by phase as any rerun), then report.md across them.
    Every seed is checked before the first one runs."""
    processes.start(config.parallel)
    seeds = [int(s) for s in config.seeds]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"config.seeds: {seeds} repeats a seed")
    singles = []
    for seed in seeds:
        single = config.copy_and_resolve_references()
        single.seed, single.seeds = seed, ()
        check(single, report_md.seed_dir(workdir, seed), rerun)
        singles.append(single)
    processes.sync("checked every seed")
    files.make_directory(workdir)
    files.write_json(workdir / "config.json", config.to_dict())
    for seed, single in zip(seeds, singles, strict=True):
        print(f"=== seed {seed} ({seeds.index(seed) + 1} of {len(seeds)}) ===")
        run(single, report_md.seed_dir(workdir, seed), verbose, rerun)
    path = report_md.write(workdir)
    processes.sync(f"{workdir}: report")
    print(path.read_text())
    print(f"report across seeds: {path}\nworkdir: {workdir}")
