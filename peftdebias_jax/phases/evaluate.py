"""The evaluate phase: intrinsic benchmarks for the base model and for base + patch(es),
next to the downstream (extrinsic) results when the run has them.

Writes `evaluation.json`, `evaluation.md` (a table) and per-pair CrowS-Pairs scores
(`crows_pairs_<model>.jsonl`) to the workdir. Every configured benchmark file is checked
before any scoring starts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import ml_collections

from peftdebias_jax import checkpoint, files, models, processes
from peftdebias_jax.data import stereotypes
from peftdebias_jax.data.records import DataError
from peftdebias_jax.errors import ConfigError
from peftdebias_jax.evaluation import bootstrap, intrinsic
from peftdebias_jax.phases.common import (
    bootstrap_settings,
    build_model,
    check_mlm_head,
    tokenizer_for,
)
from peftdebias_jax.report import (
    INTERVAL_NOTE,
    cell,
    interval_of,
    markdown,
    number,
    seat_number,
)

log = logging.getLogger(__name__)


def benchmark_files(config: ml_collections.ConfigDict) -> dict[str, Any]:
    ec = config.evaluate
    benchmarks: dict[str, Any] = {"crows": Path(ec.crows_file)} if ec.crows_file else {}
    if ec.stereoset_file:
        benchmarks["stereoset"] = Path(ec.stereoset_file)
    if ec.seat_dir:
        directory = Path(ec.seat_dir)
        names = ec.seat_tests or sorted(p.name for p in directory.glob("*.jsonl"))
        benchmarks["seat"] = [
            directory / (n if n.endswith(".jsonl") else f"{n}.jsonl") for n in names
        ]
    for name, value in benchmarks.items():
        for path in value if isinstance(value, list) else [value]:
            if not path.exists():
                raise DataError(f"{path}: {name} file not found (config.evaluate)")
    return benchmarks


def check_benchmarks(config: ml_collections.ConfigDict) -> None:
    """The configured CrowS-Pairs, StereoSet and SEAT files parse and the minimal-pair axes
    exist: checked before anything trains, so a bad benchmark file costs no training."""
    benchmarks = benchmark_files(config)
    if "crows" in benchmarks:
        intrinsic.load_crows(benchmarks["crows"], config.evaluate.crows_bias_type or None)
    if "stereoset" in benchmarks:
        intrinsic.load_stereoset(benchmarks["stereoset"])
    for path in benchmarks.get("seat", []):
        intrinsic.load_seat(path)
    for axis in config.evaluate.minimal_pairs:
        try:
            stereotypes.minimal_pairs(axis)
        except ValueError as err:
            raise ConfigError(f"config.evaluate.minimal_pairs: {err}") from None


CROSS_AXIS = "cross_axis:"  # variant-name prefix of the other axis's patch


def pair_sets(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, Path]:
    """{result key: CrowS-Pairs-format csv}: the configured CrowS-Pairs file and the
    generated minimal pairs of each axis in evaluate.minimal_pairs (written to the
    workdir's minimal_pairs/, held-out templates of data.stereotypes)."""
    benchmarks = {"crows": Path(config.evaluate.crows_file)} if config.evaluate.crows_file else {}
    for axis in config.evaluate.minimal_pairs:
        try:
            rows = stereotypes.minimal_pairs(axis)
        except ValueError as err:
            raise ConfigError(f"config.evaluate.minimal_pairs: {err}") from None
        path = workdir / "minimal_pairs" / f"{axis}.csv"
        benchmarks[f"pairs_{axis}"] = stereotypes.write_pairs(path, rows)
    processes.sync(f"minimal pairs in {workdir}")  # written by process 0, read by all
    return benchmarks


def mlm_models(config, workdir: Path) -> tuple[Any, dict[str, tuple[Any, dict]]]:
    """The tokenizer and {name: (module, params)} of the MLM models to score."""
    dense = workdir / "dense_model"
    check_mlm_head(config)
    if config.upstream.dense and dense.exists():
        tokenizer = tokenizer_for(config, workdir, base=dense)
        return tokenizer, {"full_debias": build_model(config, "mlm", base=dense)}
    tokenizer = tokenizer_for(config, workdir)
    base = build_model(config, "mlm", tokenizer=tokenizer)
    variants = {"base": base}
    patches = [Path(p) for p in config.evaluate.patches] or (
        [workdir / "patch"] if (workdir / "patch").exists() else []
    )
    if patches:
        # a sparse diff moves word embeddings that the decoder must not follow (it was
        # untied and frozen while the diff trained)
        sparse = any(checkpoint.is_sft_patch(p) for p in patches)
        module, params, frozen = checkpoint.load_patches(
            patches, *(models.untie_decoder(*base) if sparse else base)
        )
        names = [p.name for p in module.patches] + (["sft"] if frozen else [])
        variants["base+" + "+".join(names)] = (module, params)
    other = workdir / "cross_axis" / "patch"
    if other.exists():  # the cross_axis phase's patch, alone on the base
        module, params, _ = checkpoint.load_patches([other], *base)
        variants[f"{CROSS_AXIS}{config.cross_axis.axis}"] = (module, params)
    return tokenizer, variants


def evaluate(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, Any]:
    """Scores every model variant on the configured benchmarks, each number with its
    bootstrap interval, and each patched variant's CrowS-Pairs change against the base
    with a paired interval (the same pairs resampled for both)."""
    ec = config.evaluate
    benchmarks = benchmark_files(config)
    settings = bootstrap_settings(config)
    results: dict[str, Any] = {"intrinsic": {}, "bootstrap": settings.record()}
    pairs = pair_sets(config, workdir)
    if benchmarks or pairs:
        tokenizer, variants = mlm_models(config, workdir)
        outcomes: dict[str, dict[str, list[dict[str, Any]]]] = {key: {} for key in pairs}
        loaded = {key: intrinsic.load_crows(path, (ec.crows_bias_type or None)
                                            if key == "crows" else None)
                  for key, path in pairs.items()}  # fmt: skip
        items = (
            intrinsic.load_stereoset(benchmarks["stereoset"]) if "stereoset" in benchmarks else []
        )
        for name, (module, params) in variants.items():
            scores: dict[str, Any] = {}
            for key, pair_list in loaded.items():
                scores[key], outcomes[key][name] = score_pairs(
                    (module, params), tokenizer, pair_list, ec.batch_size, settings
                )
                if name != "base" and "base" in outcomes[key]:
                    scores[key]["change"] = crows_change(
                        outcomes[key]["base"], outcomes[key][name], settings
                    )
                prefix = "crows_pairs" if key == "crows" else key
                files.write_text(
                    workdir / f"{prefix}_{name.replace(':', '_')}.jsonl",
                    "".join(json.dumps(row) + "\n" for row in outcomes[key][name]),
                )
            if "stereoset" in benchmarks:
                by_domain, item_scores = intrinsic.stereoset(
                    module, params, tokenizer, items, ec.batch_size
                )
                for domain, record in by_domain.items():
                    for key in ("ss", "lms"):
                        statistic = intrinsic.stereoset_statistic(items, item_scores, domain, key)
                        record[f"{key}_interval"] = bootstrap.interval(
                            statistic, len(items), settings
                        )
                scores["stereoset"] = by_domain
            if "seat" in benchmarks:
                base = module.clone(head="none")
                scores["seat"] = intrinsic.seat(
                    base, params, tokenizer, benchmarks["seat"], ec.seat_samples, settings
                )
                scores["seat_mean_abs"] = intrinsic.mean_abs_effect(scores["seat"], settings.level)
            results["intrinsic"][name] = scores
            log.info("intrinsic %s: %s", name, scores)
    downstream = workdir / "downstream_results.json"
    if downstream.exists():
        results["extrinsic"] = json.loads(downstream.read_text())
    files.write_json(workdir / "evaluation.json", results)
    table = markdown_table(results, config.evaluate.stereoset_domain)
    files.write_text(workdir / "evaluation.md", table + "\n")
    print(table)
    return results


def score_pairs(
    model, tokenizer, pairs, batch_size: int, settings: bootstrap.Settings
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """CrowS-Pairs scoring of one pair set: (score, counts and interval; the per-pair
    outcomes)."""
    result = intrinsic.crows_pairs(*model, tokenizer, pairs, batch_size)
    statistic = intrinsic.crows_statistic(result.pairs)
    record = {"score": result.score, "evaluated": result.evaluated, "neutral": result.neutral,
              "skipped": result.skipped,
              "interval": bootstrap.interval(statistic, result.evaluated, settings)}  # fmt: skip
    return record, result.pairs


def crows_change(
    base: list[dict[str, Any]], patched: list[dict[str, Any]], settings: bootstrap.Settings
) -> dict[str, Any]:
    """The patched model's CrowS-Pairs score minus the base's on the same pairs, with its
    paired bootstrap interval."""
    if [p["index"] for p in base] != [p["index"] for p in patched]:
        raise ValueError("CrowS-Pairs change: the two models scored different pairs")
    change = bootstrap.difference(
        intrinsic.crows_statistic(patched), intrinsic.crows_statistic(base)
    )
    return {
        "difference": bootstrap.point(change, len(base)),
        "interval": bootstrap.interval(change, len(base), settings),
    }


def markdown_table(results: dict[str, Any], domain: str) -> str:
    """One row per model: SS LM, SS score, CrowS (Table 1) and each generated minimal-pair
    set, then the downstream metrics, each with its bootstrap interval."""
    pair_keys = sorted({k for scores in results["intrinsic"].values() for k in scores
                        if k.startswith("pairs_")})  # fmt: skip
    rows = []
    for name, scores in results["intrinsic"].items():
        stereo = scores.get("stereoset", {})
        stereo = stereo.get(domain) or stereo.get("overall") or {}
        rows.append([
            name,
            cell(interval_of(stereo, "lms", "lms_interval")),
            cell(interval_of(stereo, "ss", "ss_interval")),
            cell(interval_of(scores.get("crows", {}), "score", "interval")),
            cell(seat_number(scores)),
            *(cell(interval_of(scores.get(k, {}), "score", "interval")) for k in pair_keys),
        ])  # fmt: skip
    header = ["model", "StereoSet LMS", "StereoSet SS", "CrowS", "SEAT mean abs d",
              *(f"{k.removeprefix('pairs_')} pairs" for k in pair_keys)]  # fmt: skip
    parts = [markdown(header, rows)]
    extrinsic = results.get("extrinsic")
    if extrinsic:
        keys = ("accuracy", "macro_f1", "tpr_gap", "fprd_reference", "fprd_dixon", "fn")
        rows = [[split, *(cell(number(scores, k)) for k in keys)]
                for split, scores in extrinsic.items()
                if isinstance(scores, dict) and "accuracy" in scores]  # fmt: skip
        parts.append(markdown(["split", *keys], rows))
    return "\n\n".join([*parts, INTERVAL_NOTE])
