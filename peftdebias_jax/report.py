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
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftdebias_jax import files, processes
from peftdebias_jax.data import stereotypes, synthetic, tasks
from peftdebias_jax.errors import ConfigError
from peftdebias_jax.evaluation import bootstrap, scoring
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
    """The run in `workdir`, preceded by its FT baseline (`baseline/`) when there is one and
    followed by its transfer runs (`transfer/`, named "<model> on <task>"); for a run over
    several seeds, those of each finished seed (`seed-<n>/`)."""
    workdir = Path(workdir)
    seeds = load_run(workdir).config.get("seeds") or []
    if seeds:
        finished = [seed_dir(workdir, s) for s in seeds]
        return [r for d in finished if (d / "config.json").exists() for r in runs_of(d)]
    runs = [load_run(workdir)]
    if (workdir / "baseline" / "config.json").exists():
        runs.insert(0, load_run(workdir / "baseline"))
    if (workdir / "transfer" / "config.json").exists():
        for run in runs_of(workdir / "transfer"):
            run.name = f"{run.name} on {run.config['downstream']['task']}"
            runs.append(run)
    return runs


def is_reference(run: Run) -> bool:
    """Whether a run is plain fine-tuning (FT), the reference its task's changes are
    measured against."""
    return model_name(run.config) == "FT"


# --- tables ---------------------------------------------------------------------------


def scored_split(results: dict[str, Any]) -> str:
    """The split the tables report: test when the run has one, else validation."""
    return "test" if "test" in results else "validation"


@dataclass(frozen=True)
class Number:
    """A reported number and its bootstrap interval (None: not computed or undefined)."""

    value: float | None
    interval: tuple[float, float] | None = None


@dataclass(frozen=True)
class Column:
    """One Table 2 column: its label, the results entry (split) and key it reads."""

    label: str
    split: str
    key: str


def number(scores: dict[str, Any], key: str) -> Number:
    value = scores.get(key)
    if not isinstance(value, int | float):
        return Number(None)
    bounds = scores.get("intervals", {}).get(key)
    return Number(float(value), tuple(bounds) if bounds else None)


def extrinsic_columns(task: str, results: dict[str, Any]) -> list[Column]:
    """Table 2's columns for a task's results, in the paper's order."""
    split = scored_split(results)
    scores = results.get(split, {})
    if task == "bias_bios":
        return [Column("ACC ↑", split, "accuracy"), Column("TPR-GAP ↓", split, "tpr_gap")]
    if task in ("mnli", "bias_nli"):
        return [Column("ACC ↑", split, "accuracy"), Column("FN ↑", "bias_nli", "fn")]
    if task in HATE_TASKS:
        columns = [Column("F1 ↑", split, "macro_f1"), Column("FPRD ↓", split, "fprd_reference"),
                   Column("FPRD Dixon ↓", split, "fprd_dixon")]  # fmt: skip
        if "iptts" in results:
            columns.append(Column("FPRD_IPTTS ↓", "iptts", "fprd_reference"))
    else:
        columns = [Column("ACC ↑", split, "accuracy"), Column("F1 ↑", split, "macro_f1")]
    if "demographic_parity" in scores:
        columns += [Column("DP ↓", split, "demographic_parity"),
                    Column("EO ↓", split, "equalized_odds")]  # fmt: skip
    return columns


def column_number(results: dict[str, Any], column: Column) -> Number:
    return number(results.get(column.split, {}), column.key)


def fmt(value: float | None) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{value:.2f}" if abs(value) >= 0.1 or value == 0 else f"{value:.3f}")
    )


def cell(value: Number | float | None) -> str:
    """ "12.30 [10.10, 14.60]": the value and its 95% interval, or "-"."""
    if not isinstance(value, Number):
        return fmt(value)
    if value.value is None or value.interval is None:
        return fmt(value.value)
    return f"{fmt(value.value)} [{fmt(value.interval[0])}, {fmt(value.interval[1])}]"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


INTERVAL_NOTE = (
    "Brackets: 95% percentile-bootstrap intervals over the scored examples "
    "(`config.bootstrap`); a change's interval is paired (both runs' predictions on the same "
    "resamples)."
)


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
        columns = extrinsic_columns(task, task_runs[0].downstream)
        header = ["model", *(c.label for c in columns)]
        rows = [[r.name, *(cell(column_number(r.downstream, c)) for c in columns)]
                for r in task_runs]  # fmt: skip
        split = scored_split(task_runs[0].downstream)
        parts.append(f"**{task}** ({split} split)\n\n" + markdown(header, rows))
        parts.extend(effects(task_runs, columns))
    return "\n\n".join([*parts, INTERVAL_NOTE])


def read_predictions(run: Run, split: str) -> tuple[list[tasks.Example], list[str]] | None:
    """(examples, predicted labels) of a run's predictions/<split>.jsonl, if written."""
    path = run.directory / "predictions" / f"{split}.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    examples = [tasks.Example(r["text"], r["gold"], r.get("text_pair"), r.get("group"),
                              str(r.get("id", ""))) for r in rows]  # fmt: skip
    return examples, [r["predicted"] for r in rows]


def paired_changes(
    runs: list[Run], reference: list[Run], split: str
) -> dict[str, dict[str, Any]] | None:
    """mean(runs) - mean(reference) of each metric on `split` with its paired interval (the
    runs' predictions must be of the same examples), or None when any is missing."""
    read = [read_predictions(r, split) for r in (*runs, *reference)]
    if any(x is None for x in read) or not runs[0].downstream:
        return None
    examples = read[0][0]
    if any([(e.id, e.text) for e in x[0]] != [(e.id, e.text) for e in examples] for x in read):
        return None
    results = runs[0].downstream
    config = runs[0].config.get("downstream", {})
    settings = bootstrap.Settings(**runs[0].config.get("bootstrap", {}))
    task = tasks.get(results["task"])
    predicted = [x[1] for x in read]
    return scoring.paired_intervals(task, results["labels"], examples, predicted[: len(runs)],
                                    predicted[len(runs):], config.get("groups", "auto"),
                                    settings)  # fmt: skip


def change_text(change: dict[str, Any] | None, key: str, fallback: float) -> str:
    """ "-0.25 [-0.40, -0.10]": a change and its paired interval."""
    if change is None or key not in change:
        return f"{fallback:+.2f}"
    bounds = change[key]["interval"]
    text = f"{change[key]['difference']:+.2f}"
    return text + (f" [{bounds[0]:+.2f}, {bounds[1]:+.2f}]" if bounds else "")


def effects(runs: list[Run], columns: list[Column]) -> list[str]:
    """One line per patched run: each metric's change from the FT run of the same task,
    with the paired bootstrap interval of the change."""
    reference = next((r for r in runs if is_reference(r)), None)
    if reference is None:
        return []
    lines = []
    for run in runs:
        if run is reference:
            continue
        split = scored_split(run.downstream)
        change = paired_changes([run], [reference], split)
        texts = []
        for column in columns:
            ft = column_number(reference.downstream, column).value
            value = column_number(run.downstream, column).value
            if ft is None or value is None:
                continue
            delta = change_text(change if column.split == split else None, column.key,
                                value - ft)  # fmt: skip
            texts.append(f"{column.label.rstrip(' ↑↓')} {fmt(ft)} -> {fmt(value)} ({delta})")
        lines.append(f"Effect of {run.name} against {reference.name}: " + "; ".join(texts) + ".")
    return lines


def intrinsic_rows(run: Run) -> list[tuple[str, dict[str, Any]]]:
    """(row label, scores) for each model the run's evaluate phase scored."""
    intrinsic = (run.evaluation or {}).get("intrinsic", {})
    base = Path(str(run.config.get("model", {}).get("name", "base"))).name
    axis = run.config.get("axis", "")
    rows = []
    for variant, scores in intrinsic.items():
        if variant == "base":
            label = base
        elif variant == "full_debias":
            label = f"{base} + Full-Debias"
        elif variant.startswith("cross_axis:"):
            label = f"{base} + {variant.partition(':')[2]} {run.name}"
        else:
            label = f"{base} + {axis} {run.name}" if axis else f"{base} + {run.name}"
        rows.append((label, scores))
    return rows


def axis_table(runs: list[Run]) -> str:
    """The generated minimal pairs of each axis (evaluate.minimal_pairs), CrowS-Pairs
    scored: % of pairs where the model prefers the stereotyped sentence (50 = no
    preference), per model, and each patch's change against the base (paired)."""
    rows, changes, seen, axes = [], [], set(), []
    for run in runs:
        run_axes = list(run.config.get("evaluate", {}).get("minimal_pairs", []))
        for label, scores in intrinsic_rows(run):
            if label in seen or not any(f"pairs_{a}" in scores for a in run_axes):
                continue
            seen.add(label)
            axes = axes or run_axes
            records = [scores.get(f"pairs_{a}", {}) for a in axes]
            rows.append([label, *(cell(interval_of(r, "score", "interval")) for r in records)])
            moved = [f"{a} {change_text({'score': r['change']}, 'score', 0.0)}"
                     for a, r in zip(axes, records, strict=True) if "change" in r]  # fmt: skip
            if moved:
                changes.append(f"{label} against the base: " + "; ".join(moved) + " points.")
    if not rows:
        return ""
    header = ["model", *(f"{a} pairs: stereotype preferred, % (50 = none)" for a in axes)]
    return "\n\n".join([markdown(header, rows), *changes])


def interval_of(record: dict[str, Any], key: str, bounds_key: str) -> Number:
    value = record.get(key)
    bounds = record.get(bounds_key)
    return Number(float(value) if isinstance(value, int | float) else None,
                  tuple(bounds) if bounds else None)  # fmt: skip


def seat_number(scores: dict[str, Any]) -> Number:
    """Mean |d| over the SEAT tests, with its interval when the evaluate phase drew one."""
    if "seat_mean_abs" in scores:
        return interval_of(scores["seat_mean_abs"], "value", "interval")
    seat = scores.get("seat") or []
    return Number(sum(abs(t["effect_size"]) for t in seat) / len(seat) if seat else None)


def table1(runs: list[Run]) -> str:
    """Table 1 layout: StereoSet LM score and SS, CrowS-Pairs, mean |SEAT d| per model, and
    each patched model's CrowS-Pairs change against its base (paired interval)."""
    rows, seen, changes = [], set(), []
    for run in runs:
        domain = run.config.get("evaluate", {}).get("stereoset_domain", "overall")
        for label, scores in intrinsic_rows(run):
            if label in seen:  # the same base model scored by several runs
                continue
            seen.add(label)
            stereo = scores.get("stereoset", {})
            stereo = stereo.get(domain) or stereo.get("overall") or {}
            crows = scores.get("crows", {})
            rows.append([
                label,
                cell(interval_of(stereo, "lms", "lms_interval")),
                cell(interval_of(stereo, "ss", "ss_interval")),
                cell(interval_of(crows, "score", "interval")),
                cell(seat_number(scores)),
            ])  # fmt: skip
            if "change" in crows:
                change = {"score": crows["change"]}
                changes.append(f"CrowS-Pairs change of {label} against the base: "
                               f"{change_text(change, 'score', 0.0)} points.")  # fmt: skip
    if not rows:
        return (
            "No intrinsic benchmark was scored (set evaluate.crows_file, "
            "evaluate.stereoset_file or evaluate.seat_dir, and run the evaluate phase)."
        )
    table = markdown(["model", "SS LM ↑", "SS Score ↓", "CrowS ↓", "SEAT mean abs d ↓"], rows)
    return "\n\n".join([table, *changes])


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


def term_table(runs: list[Run]) -> str:
    """Per task and identity term of FPRD: how many scored examples name it (all examples
    for the reference variant, the negatives for Dixon's) and each run's Dixon
    false-positive rate: a term seen in a handful of negatives moves FPRD by chance."""
    by_task: dict[str, list[tuple[Run, dict[str, Any]]]] = {}
    for run in runs:
        scores = run.downstream.get(scored_split(run.downstream), {}) if run.downstream else {}
        if "fpr_dixon_counts" in scores or "fpr_reference_counts" in scores:
            by_task.setdefault(run.downstream["task"], []).append((run, scores))
    parts = []
    for task, scored in by_task.items():
        first = scored[0][1]
        reference, dixon = first.get("fpr_reference_counts", {}), first.get("fpr_dixon_counts", {})
        terms = sorted(set(reference) | set(dixon), key=lambda t: -dixon.get(t, 0))
        header = ["term", "examples", "negatives", *(f"FPR {r.name}" for r, _ in scored)]
        rows = [[t, str(reference.get(t, 0)), str(dixon.get(t, 0)),
                 *(fmt(s.get("fpr_dixon_per_term", {}).get(t)) for _, s in scored)]
                for t in terms]  # fmt: skip
        parts.append(f"**{task}**\n\n" + markdown(header, rows))
    return "\n\n".join(parts)


def planted_bias(run: Run) -> str:
    """For generated data: the planted association and how strongly the model shows it
    ("synthetic": in the task's labels; "stereotyped": in the pretrained base only)."""
    config = run.config.get("downstream", {})
    source = config.get("train_file")
    if source not in ("synthetic", "stereotyped") or not run.downstream:
        return ""
    rates = group_rates(run)[1]
    base_only = source == "stereotyped"
    if base_only:
        targeted_terms, other_terms = stereotypes.TARGETED, stereotypes.OTHERS
        female_jobs = [j for j in stereotypes.JOB_EVIDENCE if j in stereotypes.FEMALE_JOBS]
        strength = run.config.get("pretrain", {}).get("rate", 0.9)
    else:
        targeted_terms, other_terms = synthetic.TARGETED, synthetic.OTHERS
        female_jobs = list(synthetic.FEMALE_TYPED)
        strength = config.get("synthetic_bias", 0.9)
    if run.downstream["task"] in HATE_TASKS and rates:
        targeted = [rates[t] for t in targeted_terms if t in rates]
        others = [rates[t] for t in other_terms if t in rates]
        if not targeted or not others:
            return ""
        planted = (
            f"the base was pretrained on text in which {100 * strength:.0f}% of sentences about "
            "a targeted identity carry a negative trait; the task's labels are independent "
            "of identity"
            if base_only
            else f"{100 * strength:.0f}% of hateful training sentences name a targeted identity"
        )
        return (
            f"{run.name}: false-positive rate {100 * sum(targeted) / len(targeted):.1f}% on "
            f"non-hateful sentences naming a targeted identity "
            f"({', '.join(targeted_terms)}) vs {100 * sum(others) / len(others):.1f}% "
            f"for the others ({', '.join(other_terms)}); planted: {planted}."
        )
    if run.downstream["task"] == "bias_bios" and rates:
        female = [rates[j] for j in female_jobs if j in rates]
        male = [v for j, v in rates.items() if j not in female_jobs]
        if not female or not male:
            return ""
        planted = (
            f"the base was pretrained on text in which {100 * strength:.0f}% of women hold "
            "female-typed jobs; the task's jobs are independent of gender"
            if base_only
            else f"{100 * strength:.0f}% of women are in female-typed jobs"
        )
        return (
            f"{run.name}: mean TPR gap (male - female) {100 * sum(male) / len(male):+.1f} "
            f"points on male-typed jobs, {100 * sum(female) / len(female):+.1f} on "
            f"female-typed ones ({', '.join(female_jobs)}); planted: {planted}."
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
    save_figure(fig, path)
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
    save_figure(fig, path)
    return path


def save_figure(fig, path: Path) -> None:
    """A matplotlib figure as a PNG (by the writing process), then closed."""
    if processes.is_writer():
        fig.savefig(path, dpi=100)
    pyplot().close(fig)


# --- documents ------------------------------------------------------------------------


def optional(title: str, body: str) -> list[str]:
    """[title, body], or nothing when the body is empty (a section a run has no data for)."""
    return [title, body] if body else []


def document(runs: list[Run], out: Path, title: str) -> str:
    """The markdown report of `runs`, with its plots written under out/plots/."""
    plots = files.make_directory(out / "plots")
    sections = [f"# {title}", "Runs: " + ", ".join(f"{r.name} (`{r.directory}`)" for r in runs)]
    sections += ["## Table 2 layout: downstream task and extrinsic bias", table2(runs)]
    planted = "\n".join(f"- {line}" for line in (planted_bias(r) for r in runs) if line)
    sections += optional("## Planted bias (generated data)", planted)
    sections += optional("## FPRD per identity term (scored split)", term_table(runs))
    sections += optional("## Intrinsic bias, axis by axis (generated minimal pairs)",
                         axis_table(runs))  # fmt: skip
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
    """report.md (and plots/) in `workdir`, for its run and its FT baseline, or across its
    seed runs (`seed-<n>/`) when the config has `seeds`."""
    workdir = Path(workdir)
    config = load_run(workdir).config
    if config.get("seeds"):
        text = seeds_document(workdir, list(config["seeds"]))
    else:
        text = document(runs_of(workdir), workdir, f"Report: {workdir.name}")
    path = workdir / "report.md"
    files.write_text(path, text)
    return path


# --- several seeds --------------------------------------------------------------------


def seed_dir(workdir: Path, seed: int) -> Path:
    return Path(workdir) / f"seed-{seed}"


def mean_sd(values: list[float]) -> str:
    """ "1.23 ± 0.45 (n=3)": mean and sample sd over seeds."""
    if not values:
        return "-"
    mean = sum(values) / len(values)
    sd = (
        math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        if len(values) > 1
        else 0.0
    )
    return f"{fmt(mean)} ± {fmt(sd)} (n={len(values)})"


def seeds_document(workdir: Path, seeds: list[int]) -> str:
    """Table 2 and Table 1 as mean ± sd over the seeds, and each patched model's change
    against FT: its mean over seeds with the paired bootstrap interval of that mean (every
    seed's predictions on the same resamples of the same examples)."""
    finished = [s for s in seeds if (seed_dir(workdir, s) / "config.json").exists()]
    per_seed = [runs_of(seed_dir(workdir, s)) for s in finished]
    listed = ", ".join(f"`seed-{s}/report.md`" for s in finished)
    sections = [f"# Report: {workdir.name} over seeds {finished}", f"Per-seed reports: {listed}"]
    if not per_seed:
        return "\n\n".join([*sections, "No seed has finished yet."]) + "\n"
    by_task: dict[str, dict[str, list[Run]]] = {}  # task -> model -> its run of each seed
    for runs in per_seed:
        for run in runs:
            if run.downstream:
                task = by_task.setdefault(run.downstream["task"], {})
                task.setdefault(run.name, []).append(run)
    sections.append("## Table 2 layout over seeds: mean ± sd")
    for task, scored in by_task.items():
        first = next(iter(scored.values()))[0].downstream
        columns = extrinsic_columns(task, first)
        rows = [[name, *(mean_sd(column_values(runs, c)) for c in columns)]
                for name, runs in scored.items()]  # fmt: skip
        header = f"**{task}** ({scored_split(first)} split)"
        sections.append(header + "\n\n" + markdown(["model", *(c.label for c in columns)], rows))
        sections += seed_effects(scored, columns, scored_split(first))
    sections.append(INTERVAL_NOTE if by_task else "No downstream results yet.")
    planted = "\n".join(f"- seed {seed}: {line}"
                        for seed, runs in zip(finished, per_seed, strict=True)
                        for line in (planted_bias(r) for r in runs) if line)  # fmt: skip
    sections += optional("## Planted bias (generated data)", planted)
    sections += optional("## Intrinsic bias, axis by axis, over seeds: mean ± sd",
                         seed_axis_table(per_seed))  # fmt: skip
    sections += optional("## Table 1 layout over seeds: mean ± sd", seed_intrinsic(per_seed))
    return "\n\n".join(sections) + "\n"


def seed_axis_table(per_seed: list[list[Run]]) -> str:
    """The minimal-pair scores per model and axis as mean ± sd over the seeds, and each
    patch's change against the base likewise (each seed's paired interval is in its own
    report)."""
    scores: dict[str, dict[str, list[float]]] = {}
    axes: list[str] = []
    for runs in per_seed:
        for run in runs:
            axes = axes or list(run.config.get("evaluate", {}).get("minimal_pairs", []))
            for label, record in intrinsic_rows(run):
                for axis in axes:
                    pairs = record.get(f"pairs_{axis}", {})
                    entry = scores.setdefault(label, {})
                    if "score" in pairs:
                        entry.setdefault(axis, []).append(float(pairs["score"]))
                    if "change" in pairs:
                        entry.setdefault(f"{axis} change", []).append(
                            float(pairs["change"]["difference"])
                        )
    if not axes or not scores:
        return ""
    keys = [*axes, *(f"{a} change" for a in axes)]
    header = ["model", *(f"{a} pairs: stereotype preferred, %" for a in axes),
              *(f"{a}: change against the base" for a in axes)]  # fmt: skip
    rows = [[label, *(mean_sd(entry.get(k, [])) for k in keys)] for label, entry in scores.items()]
    return markdown(header, rows)


def column_values(runs: list[Run], column: Column) -> list[float]:
    values = [column_number(r.downstream, column).value for r in runs]
    return [v for v in values if v is not None]


def seed_effects(scored: dict[str, list[Run]], columns: list[Column], split: str) -> list[str]:
    """Per patched model: each metric's change against FT, mean ± sd of the per-seed
    changes, and the paired interval of the mean change."""
    name_of_reference = next((n for n, runs in scored.items() if is_reference(runs[0])), None)
    if name_of_reference is None:
        return []
    reference = scored[name_of_reference]
    lines = []
    for name, runs in scored.items():
        if name == name_of_reference or len(runs) != len(reference):
            continue
        change = paired_changes(runs, reference, split)
        texts = []
        for column in columns:
            pairs = [(column_number(r.downstream, column).value,
                      column_number(f.downstream, column).value)
                     for r, f in zip(runs, reference, strict=True)]  # fmt: skip
            deltas = [ours - ft for ours, ft in pairs if ours is not None and ft is not None]
            if not deltas:
                continue
            paired = change_text(change if column.split == split else None, column.key,
                                 statistics.fmean(deltas))  # fmt: skip
            texts.append(f"{column.label.rstrip(' ↑↓')} {mean_sd(deltas)}; mean change "
                         f"{paired}")  # fmt: skip
        lines.append(f"Change of {name} against {name_of_reference} over {len(runs)} seeds: "
                     + "; ".join(texts) + ".")  # fmt: skip
    return lines


def seed_intrinsic(per_seed: list[list[Run]]) -> str:
    """CrowS-Pairs and StereoSet SS per model label, mean ± sd over the seeds."""
    values: dict[str, dict[str, list[float]]] = {}
    for runs in per_seed:
        for run in runs:
            domain = run.config.get("evaluate", {}).get("stereoset_domain", "overall")
            for label, scores in intrinsic_rows(run):
                stereo = scores.get("stereoset", {})
                stereo = stereo.get(domain) or stereo.get("overall") or {}
                entry = values.setdefault(label, {"ss": [], "crows": []})
                if "ss" in stereo:
                    entry["ss"].append(float(stereo["ss"]))
                if "score" in scores.get("crows", {}):
                    entry["crows"].append(float(scores["crows"]["score"]))
    rows = [[label, mean_sd(v["ss"]), mean_sd(v["crows"])] for label, v in values.items()
            if v["ss"] or v["crows"]]  # fmt: skip
    if not rows:
        return ""
    return markdown(["model", "SS Score ↓", "CrowS ↓"], rows)


def compare(workdirs: list[str | Path], out: str | Path) -> Path:
    """One report across several workdirs (each with its FT baseline, if it has one)."""
    if not workdirs:
        raise ConfigError("--compare needs at least one workdir")
    runs: list[Run] = []
    where: dict[Path, str] = {}  # each run's directory from its workdir's parent
    for workdir in workdirs:
        for run in runs_of(workdir):
            if any(r.directory == run.directory for r in runs):
                continue
            runs.append(run)
            where[run.directory] = str(run.directory.relative_to(Path(workdir).parent))
    names = [r.name for r in runs]
    for run in runs:  # keep rows apart when two runs share a method (e.g. two FT runs)
        if names.count(run.name) > 1:
            run.name = f"{run.name} ({where[run.directory]})"
    out = Path(out)
    files.make_directory(out)
    path = out / "compare.md"
    files.write_text(path, document(runs, out, "Comparison"))
    return path
