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

from peftdebias_jax import checkpoint, models
from peftdebias_jax.data.records import DataError
from peftdebias_jax.evaluation import intrinsic
from peftdebias_jax.phases.common import build_model, check_mlm_head, tokenizer_for

log = logging.getLogger(__name__)


def benchmark_files(config: ml_collections.ConfigDict) -> dict[str, Any]:
    ec = config.evaluate
    files: dict[str, Any] = {}
    if ec.crows_file:
        files["crows"] = Path(ec.crows_file)
    if ec.stereoset_file:
        files["stereoset"] = Path(ec.stereoset_file)
    if ec.seat_dir:
        directory = Path(ec.seat_dir)
        names = ec.seat_tests or sorted(p.name for p in directory.glob("*.jsonl"))
        files["seat"] = [directory / (n if n.endswith(".jsonl") else f"{n}.jsonl") for n in names]
    for name, value in files.items():
        for path in value if isinstance(value, list) else [value]:
            if not path.exists():
                raise DataError(f"{path}: {name} file not found (config.evaluate)")
    return files


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
    return tokenizer, variants


def evaluate(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, Any]:
    ec = config.evaluate
    files = benchmark_files(config)
    results: dict[str, Any] = {"intrinsic": {}}
    if files:
        tokenizer, variants = mlm_models(config, workdir)
        for name, (module, params) in variants.items():
            scores: dict[str, Any] = {}
            if "crows" in files:
                pairs = intrinsic.load_crows(files["crows"], ec.crows_bias_type or None)
                crows = intrinsic.crows_pairs(module, params, tokenizer, pairs, ec.batch_size)
                scores["crows"] = {"score": crows.score, "evaluated": crows.evaluated,
                                   "neutral": crows.neutral, "skipped": crows.skipped}  # fmt: skip
                with (workdir / f"crows_pairs_{name}.jsonl").open("w") as f:
                    f.writelines(json.dumps(row) + "\n" for row in crows.pairs)
            if "stereoset" in files:
                items = intrinsic.load_stereoset(files["stereoset"])
                scores["stereoset"], _ = intrinsic.stereoset(
                    module, params, tokenizer, items, ec.batch_size
                )
            if "seat" in files:
                base = module.clone(head="none")
                scores["seat"] = intrinsic.seat(
                    base, params, tokenizer, files["seat"], ec.seat_samples
                )
            results["intrinsic"][name] = scores
            log.info("intrinsic %s: %s", name, scores)
    downstream = workdir / "downstream_results.json"
    if downstream.exists():
        results["extrinsic"] = json.loads(downstream.read_text())
    (workdir / "evaluation.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    table = markdown_table(results, config.evaluate.stereoset_domain)
    (workdir / "evaluation.md").write_text(table + "\n")
    print(table)
    return results


def markdown_table(results: dict[str, Any], domain: str) -> str:
    """One row per model: SS LM, SS score, CrowS (Table 1), then the downstream metrics."""
    lines = [
        "| model | StereoSet LMS | StereoSet SS | CrowS | SEAT mean abs d |",
        "|---|---|---|---|---|",
    ]
    for name, scores in results["intrinsic"].items():
        stereo = scores.get("stereoset", {}).get(domain) or scores.get("stereoset", {}).get(
            "overall"
        )
        seat = scores.get("seat")
        cells = [
            f"{stereo['lms']:.2f}" if stereo else "-",
            f"{stereo['ss']:.2f}" if stereo else "-",
            f"{scores['crows']['score']:.2f}" if "crows" in scores else "-",
            f"{sum(abs(t['effect_size']) for t in seat) / len(seat):.3f}" if seat else "-",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    extrinsic = results.get("extrinsic")
    if extrinsic:
        keys = ("accuracy", "macro_f1", "tpr_gap", "fprd_reference", "fprd_dixon", "fn")
        lines += ["", "| split | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for split, scores in extrinsic.items():
            if isinstance(scores, dict) and "accuracy" in scores:
                cells = [
                    f"{scores[k]:.3f}" if isinstance(scores.get(k), float) else "-" for k in keys
                ]
                lines.append(f"| {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
