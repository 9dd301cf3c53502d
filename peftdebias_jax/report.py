"""Readable reports of finished runs: the paper's tables and PNG plots.

`write(workdir)` writes `report.md` and `plots/*.png` for one run (and its FT baseline in
`baseline/` when the run has one); `compare(workdirs, out)` lays several runs out in one
table, e.g. FT vs adapter vs LoRA vs prefix. Tables follow the paper: Table 1 (intrinsic:
StereoSet LM score and SS, CrowS-Pairs, per model) and Table 2 (the task metric and its
extrinsic bias metric, per model). Plots: per-class TPR gaps (the paper's Figure 2) or
per-identity-term false-positive rates, and loss curves.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftdebias_jax.data import synthetic
from peftdebias_jax.errors import ConfigError
from peftdebias_jax.files import read_json

METHOD_NAMES = {
    "seq_bn": "Adapter",
    "double_seq_bn": "Adapter (Houlsby)",
    "lora": "LoRA",
    "prefix_tuning": "Prefix",
    "prompt_tuning": "Prompt",
    "sft": "SFT",
}
# What trains downstream besides the (frozen) patches, when not everything does.
TRAINABLE_NAMES = {"bitfit": "BitFit", "beft": "BEFT", "lowrank": "Fisher low-rank"}
HATE_TASKS = ("ghc", "stormfront", "lhc")


@dataclass
class Run:
    """One finished (or partly finished) workdir, read back."""

    name: str  # the row label: FT, Full-Debias, Adapter, LoRA, ...
    directory: Path
    config: dict[str, Any]
    downstream: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    bias_scores: dict[str, Any] | None = None  # the bias_select phase's bias_scores.json
    fisher: dict[str, Any] | None = None  # the fisher_lowrank phase's fisher.json


def model_name(config: dict[str, Any]) -> str:
    """The paper's row label for a run's config, with the downstream trainable set when it
    is not "all" (e.g. "BEFT", "Fisher low-rank", "Adapter + BitFit")."""
    method = config.get("patch", {}).get("method", "none")
    if config.get("upstream", {}).get("dense"):
        label = "Full-Debias"
    else:
        label = "FT" if method == "none" else METHOD_NAMES.get(method, method)
    trainable = config.get("downstream", {}).get("trainable", "all")
    if trainable == "all":
        return label
    kind = TRAINABLE_NAMES.get(trainable, trainable)
    return kind if label == "FT" else f"{label} + {kind}"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records; a torn last line (a killed run) is ignored."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def load_run(directory: str | Path, name: str | None = None) -> Run:
    """The run in `directory`; it must hold the config.json that run.py writes."""
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise ConfigError(f"{directory}: not a workdir (no config.json); run.py writes one")
    config = read_json(directory / "config.json", "config", ConfigError)
    optional = {}
    for key, filename in (("downstream", "downstream_results.json"),
                          ("evaluation", "evaluation.json"), ("bias_scores", "bias_scores.json"),
                          ("fisher", "fisher.json")):  # fmt: skip
        path = directory / filename
        optional[key] = read_json(path, filename, ConfigError) if path.exists() else None
    return Run(
        name=name or model_name(config),
        directory=directory,
        config=config,
        metrics=read_metrics(directory / "metrics.jsonl"),
        **optional,
    )


def runs_of(workdir: str | Path) -> list[Run]:
    """The run in `workdir`, preceded by its FT baseline (`baseline/`) when there is one."""
    workdir = Path(workdir)
    runs = [load_run(workdir)]
    if (workdir / "baseline" / "config.json").exists():
        runs.insert(0, load_run(workdir / "baseline"))
    return runs


# --- tables ---------------------------------------------------------------------------


def scored_split(results: dict[str, Any]) -> str:
    """The split the tables report: test when the run has one, else validation."""
    return "test" if "test" in results else "validation"


def extrinsic_columns(task: str, results: dict[str, Any]) -> list[tuple[str, float | None]]:
    """(column, value) pairs of Table 2 for a task's results, in the paper's order."""
    scores = results.get(scored_split(results), {})

    def get(key: str, source: dict[str, Any] = scores) -> float | None:
        value = source.get(key)
        return float(value) if isinstance(value, int | float) else None

    if task == "bias_bios":
        return [("ACC ↑", get("accuracy")), ("TPR-GAP ↓", get("tpr_gap"))]
    if task in ("mnli", "bias_nli"):
        return [("ACC ↑", get("accuracy")), ("FN ↑", get("fn", results.get("bias_nli", {})))]
    if task in HATE_TASKS:
        columns = [
            ("F1 ↑", get("macro_f1")),
            ("FPRD ↓", get("fprd_reference")),
            ("FPRD Dixon ↓", get("fprd_dixon")),
        ]
        if "iptts" in results:
            columns.append(("FPRD_IPTTS ↓", get("fprd_reference", results["iptts"])))
        if "demographic_parity" in scores:
            columns += [("DP ↓", get("demographic_parity")), ("EO ↓", get("equalized_odds"))]
        return columns
    columns = [("ACC ↑", get("accuracy")), ("F1 ↑", get("macro_f1"))]
    if "demographic_parity" in scores:
        columns += [("DP ↓", get("demographic_parity")), ("EO ↓", get("equalized_odds"))]
    return columns


def cell(value: float | None) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{value:.2f}" if abs(value) >= 0.1 or value == 0 else f"{value:.3f}")
    )


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def table2(runs: list[Run]) -> str:
    """Table 2 layout: one table per task, a row per run (model x metric)."""
    by_task: dict[str, list[Run]] = {}
    for run in runs:
        if run.downstream:
            by_task.setdefault(run.downstream["task"], []).append(run)
    if not by_task:
        return "No downstream results yet (run the downstream phase)."
    parts = []
    for task, task_runs in by_task.items():
        columns = [extrinsic_columns(task, r.downstream) for r in task_runs]
        header = ["model", *(name for name, _ in columns[0])]
        rows = [[r.name, *(cell(v) for _, v in cols)] for r, cols in zip(task_runs, columns,
                                                                          strict=True)]  # fmt: skip
        split = scored_split(task_runs[0].downstream)
        parts.append(f"**{task}** ({split} split)\n\n" + markdown(header, rows))
        parts.extend(effects(task_runs, columns))
    return "\n\n".join(parts)


def effects(runs: list[Run], columns: list[list[tuple[str, float | None]]]) -> list[str]:
    """One line per patched run: each metric's change from the FT run of the same task."""
    reference = next((c for r, c in zip(runs, columns, strict=True) if r.name == "FT"), None)
    if reference is None:
        return []
    lines = []
    for run, cols in zip(runs, columns, strict=True):
        if run.name == "FT":
            continue
        changes = [
            f"{name.rstrip(' ↑↓')} {cell(ft)} -> {cell(value)} ({value - ft:+.2f})"
            for (name, ft), (_, value) in zip(reference, cols, strict=True)
            if ft is not None and value is not None
        ]
        lines.append(f"Effect of {run.name} against FT: " + "; ".join(changes) + ".")
    return lines


def intrinsic_rows(run: Run) -> list[tuple[str, dict[str, Any]]]:
    """(row label, scores) for each model the run's evaluate phase scored."""
    intrinsic = (run.evaluation or {}).get("intrinsic", {})
    base = Path(str(run.config.get("model", {}).get("name", "base"))).name
    rows = []
    for variant, scores in intrinsic.items():
        if variant == "base":
            label = base
        elif variant == "full_debias":
            label = f"{base} + Full-Debias"
        else:
            label = f"{base} + {run.name}"
        rows.append((label, scores))
    return rows


def table1(runs: list[Run]) -> str:
    """Table 1 layout: StereoSet LM score and SS, CrowS-Pairs, mean |SEAT d| per model."""
    rows, seen = [], set()
    for run in runs:
        domain = run.config.get("evaluate", {}).get("stereoset_domain", "overall")
        for label, scores in intrinsic_rows(run):
            if label in seen:  # the same base model scored by several runs
                continue
            seen.add(label)
            stereo = scores.get("stereoset", {})
            stereo = stereo.get(domain) or stereo.get("overall") or {}
            seat = scores.get("seat") or []
            rows.append([
                label,
                cell(stereo.get("lms")),
                cell(stereo.get("ss")),
                cell(scores.get("crows", {}).get("score")),
                cell(sum(abs(t["effect_size"]) for t in seat) / len(seat) if seat else None),
            ])  # fmt: skip
    if not rows:
        return (
            "No intrinsic benchmark was scored (set evaluate.crows_file, "
            "evaluate.stereoset_file or evaluate.seat_dir, and run the evaluate phase)."
        )
    return markdown(["model", "SS LM ↑", "SS Score ↓", "CrowS ↓", "SEAT mean abs d ↓"], rows)


# --- per-group bias -------------------------------------------------------------------


def group_rates(run: Run) -> tuple[str, dict[str, float]]:
    """The per-class TPR gaps (BiasBios) or per-identity-term false-positive rates (hate
    tasks, Dixon variant: among the non-hateful examples naming the term) of a run."""
    if not run.downstream:
        return "", {}
    results = run.downstream
    scores = results.get(scored_split(results), {})
    if "tpr_gaps" in scores:
        return "TPR gap (male - female)", {k: float(v) for k, v in scores["tpr_gaps"].items()}
    if "fpr_dixon_per_term" in scores:
        return "false-positive rate", {k: float(v) for k, v in scores["fpr_dixon_per_term"].items()}
    return "", {}


def planted_bias(run: Run) -> str:
    """For synthetic data: the planted association and how strongly the model shows it."""
    config = run.config.get("downstream", {})
    if config.get("train_file") != "synthetic" or not run.downstream:
        return ""
    rates = group_rates(run)[1]
    strength = config.get("synthetic_bias", 0.9)
    if run.downstream["task"] in HATE_TASKS and rates:
        targeted = [rates[t] for t in synthetic.TARGETED if t in rates]
        others = [rates[t] for t in synthetic.OTHERS if t in rates]
        if not targeted or not others:
            return ""
        return (
            f"{run.name}: false-positive rate {100 * sum(targeted) / len(targeted):.1f}% on "
            f"non-hateful sentences naming a targeted identity "
            f"({', '.join(synthetic.TARGETED)}) vs {100 * sum(others) / len(others):.1f}% "
            f"for the others ({', '.join(synthetic.OTHERS)}); planted: {100 * strength:.0f}% "
            "of hateful training sentences name a targeted identity."
        )
    if run.downstream["task"] == "bias_bios" and rates:
        female = [rates[j] for j in synthetic.FEMALE_TYPED if j in rates]
        male = [v for j, v in rates.items() if j not in synthetic.FEMALE_TYPED]
        if not female or not male:
            return ""
        return (
            f"{run.name}: mean TPR gap (male - female) {100 * sum(male) / len(male):+.1f} "
            f"points on male-typed jobs, {100 * sum(female) / len(female):+.1f} on "
            f"female-typed ones ({', '.join(synthetic.FEMALE_TYPED)}); planted: "
            f"{100 * strength:.0f}% of women are in female-typed jobs."
        )
    return ""


# --- plots ----------------------------------------------------------------------------


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_group_rates(runs: list[Run], path: Path) -> Path | None:
    """Grouped bars: one group per class or identity term, one bar per run."""
    series = [(run.name, *group_rates(run)) for run in runs]
    series = [(name, kind, rates) for name, kind, rates in series if rates]
    if not series:
        return None
    keys = sorted({k for _, _, rates in series for k in rates})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(keys) * len(series)), 4))
    width = 0.8 / len(series)
    for i, (name, _, rates) in enumerate(series):
        xs = [k + (i - (len(series) - 1) / 2) * width for k in range(len(keys))]
        ax.bar(xs, [rates.get(k, 0.0) for k in keys], width, label=name)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xticks(range(len(keys)), keys, rotation=45, ha="right")
    ax.set_ylabel(series[0][1])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_losses(runs: list[Run], path: Path) -> Path | None:
    """Training (and evaluation) loss per phase and run, from metrics.jsonl."""
    curves: dict[str, list[tuple[str, list[int], list[float]]]] = {}
    for run in runs:
        for phase in ("upstream", "downstream"):
            for key in ("loss", "eval_loss"):
                points = [(m["step"], m[key]) for m in run.metrics
                          if m.get("phase") == phase and key in m]  # fmt: skip
                if points:
                    steps, values = zip(*points, strict=True)
                    curves.setdefault(phase, []).append(
                        (f"{run.name} {key}", list(steps), list(values))
                    )
    if not curves:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4), squeeze=False)
    for ax, (phase, lines) in zip(axes[0], curves.items(), strict=True):
        for label, steps, values in lines:
            ax.plot(steps, values, label=label)
        ax.set_title(phase)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- documents ------------------------------------------------------------------------


def document(runs: list[Run], out: Path, title: str) -> str:
    """The markdown report of `runs`, with its plots written under out/plots/."""
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    sections = [f"# {title}", "Runs: " + ", ".join(f"{r.name} (`{r.directory}`)" for r in runs)]
    sections += ["## Table 2 layout: downstream task and extrinsic bias", table2(runs)]
    planted = [line for line in (planted_bias(r) for r in runs) if line]
    if planted:
        sections += ["## Planted bias (synthetic data)", "\n".join(f"- {p}" for p in planted)]
    sections += ["## Table 1 layout: intrinsic bias of the masked LM", table1(runs)]
    selections = [line for run in runs for line in mask_selection(run)]
    if selections:
        sections += ["## Parameter masks", "\n".join(f"- {line}" for line in selections)]
    figures = [
        ("Per-group bias", plot_group_rates(runs, plots / "group_bias.png")),
        ("Loss curves", plot_losses(runs, plots / "loss_curves.png")),
    ]
    for caption, figure in figures:
        if figure is not None:
            sections.append(f"## {caption}\n\n![{caption}](plots/{figure.name})")
    return "\n\n".join(sections) + "\n"


def mask_selection(run: Run) -> list[str]:
    """What a run's parameter-mask phases chose: BEFT's bias ranking and choice, and the
    Fisher low-rank record (groups, overlap, factorization errors)."""
    lines = []
    if run.bias_scores:
        record = run.bias_scores
        means = ", ".join(f"{t} {record['mean'][t]:.4g}" for t in record["ranking"])
        lines.append(
            f"{run.name}: bias types ranked by {record['criterion']} (layer means: {means}); "
            f"selected {record['selected']} among the candidates "
            f"{record.get('candidates', '(not recorded)')}"
        )
    if run.fisher:
        record = run.fisher
        names = record.get("group_names", {})
        groups = ", ".join(f"{names.get(g, g)}: {n}" for g, n in record["group_sizes"].items())
        errors = "; ".join(
            f"{path}: {e['fisher_weighted']:.4g} (plain SVD {e['plain_svd']:.4g})"
            for path, e in record["errors"].items()
        )
        lines.append(
            f"{run.name}: Fisher low-rank (reconstructed), rank {record['rank']} {record['mode']}, "
            f"{record['neutralize']} over the groups ({groups}); top-1% overlap of the groups' "
            f"Fishers {record['overlap_at_1pct']:.3f}; weighted error {errors}"
        )
    return lines


def write(workdir: str | Path) -> Path:
    """report.md (and plots/) in `workdir`, for its run and its FT baseline."""
    workdir = Path(workdir)
    runs = runs_of(workdir)
    text = document(runs, workdir, f"Report: {workdir.name}")
    path = workdir / "report.md"
    path.write_text(text)
    return path


def compare(workdirs: list[str | Path], out: str | Path) -> Path:
    """One report across several workdirs (each with its FT baseline, if it has one)."""
    if not workdirs:
        raise ConfigError("--compare needs at least one workdir")
    runs: list[Run] = []
    for workdir in workdirs:
        for run in runs_of(workdir):
            if any(r.directory == run.directory for r in runs):
                continue
            runs.append(run)
    names = [r.name for r in runs]
    for run in runs:  # keep rows apart when two runs share a method (e.g. two FT runs)
        if names.count(run.name) > 1:
            run.name = f"{run.name} ({run.directory.parent.name}/{run.directory.name})"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "compare.md"
    path.write_text(document(runs, out, "Comparison"))
    return path
