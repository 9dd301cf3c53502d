"""Every config end to end (:smoke), input checks before training, the planted bias of the
synthetic data, and the report / --compare output."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from config_fixtures import load_config

from peftdebias_jax import phases, report
from peftdebias_jax.data import synthetic
from peftdebias_jax.data.records import DataError
from peftdebias_jax.errors import ConfigError
from peftdebias_jax.phases import downstream

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*_*.py") if not p.stem.startswith("_"))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_smoke_end_to_end(tmp_path, name):
    config = load_config(name, "smoke")
    if name == "gender_transfer":  # its Bias-NLI probes: exercised in test_downstream.py
        config.downstream.bias_nli_occupations = ""
    phases.run(config, tmp_path)
    for product in ("config.json", "metrics.jsonl", "downstream_results.json",
                    "evaluation.json", "report.md"):  # fmt: skip
        assert (tmp_path / product).exists(), product
    if "upstream" in config.phases:
        product = "dense_model" if config.upstream.dense else "patch"
        assert (tmp_path / product).is_dir()
    if config.patch.method != "none":
        info = json.loads((tmp_path / "patch" / "patch.json").read_text())
        assert info["patch"]["method"] == config.patch.method and info["axis"] == config.axis
    if "bias_select" in config.phases:
        scores = json.loads((tmp_path / "bias_scores.json").read_text())
        layers = config.model.architecture.num_hidden_layers
        assert all(len(v) == layers for v in scores["per_layer"].values())
        assert scores["selected"] in config.beft.candidates
        assert (tmp_path / "plots" / "bias_scores.png").exists()
    if "fisher_lowrank" in config.phases:
        record = json.loads((tmp_path / "fisher.json").read_text())
        assert record["paths"] and len(record["group_sizes"]) == 2
        errors = next(iter(record["errors"].values()))
        assert errors["fisher_weighted"] <= errors["plain_svd"] + 1e-9
        assert (tmp_path / "fisher").is_dir() and (tmp_path / "lowrank").is_dir()
    results = json.loads((tmp_path / "downstream_results.json").read_text())
    assert results["task"] == config.downstream.task
    assert "Table 2 layout" in (tmp_path / "report.md").read_text()


def test_missing_input_file_fails_before_any_training(tmp_path, monkeypatch):
    monkeypatch.setattr(
        phases.upstream, "fit", lambda **_: pytest.fail("upstream training started")
    )
    monkeypatch.setattr(downstream, "fit", lambda **_: pytest.fail("training started"))
    config = load_config("race_adapter", "smoke")
    config.downstream.test_file = str(tmp_path / "gab" / "test.jsonl")
    config.evaluate.crows_file = str(tmp_path / "crows.csv")
    with pytest.raises(DataError) as err:
        phases.run(config, tmp_path / "work")
    message = str(err.value)
    assert "config.downstream.test_file: " + str(tmp_path / "gab" / "test.jsonl") in message
    assert "config.evaluate.crows_file" in message
    assert not (tmp_path / "work").exists()


def test_transfer_phase_moves_the_patch_to_the_other_task(tmp_path):
    """The transfer phase: this run's patch frozen on config.transfer.task, beside FT
    there; the report gives that task its own table, measured against its own FT."""
    config = load_config("race_adapter", "smoke")
    config.phases = ("upstream", "downstream", "baseline", "transfer", "report")
    phases.run(config, tmp_path)
    moved = json.loads((tmp_path / "transfer" / "config.json").read_text())
    assert moved["downstream"]["task"] == "lhc" == config.transfer.task
    assert moved["downstream"]["patches"] == [str(tmp_path / "patch")]
    assert (tmp_path / "transfer" / "baseline" / "downstream_results.json").exists()
    names = [r.name for r in report.runs_of(tmp_path)]
    assert names == ["FT", "Adapter", "FT on lhc", "Adapter on lhc"]
    text = (tmp_path / "report.md").read_text()
    assert "Effect of Adapter on lhc against FT on lhc" in text
    assert "Effect of Adapter against FT:" in text


def test_transfer_phase_needs_a_patch(tmp_path):
    config = load_config("race_ft", "smoke")
    config.phases = ("transfer",)
    with pytest.raises(ConfigError, match="has none"):
        phases.run(config, tmp_path)


def fine_tune(tmp_path: Path, name: str, bias: float) -> report.Run:
    """FT on the synthetic task with the given planted bias, long enough to learn it."""
    config = load_config(name, "smoke")
    config.downstream.update(synthetic_size=400, synthetic_bias=bias, epochs=8, batch_size=16,
                             learning_rate=3e-3, eval_every=200, checkpoint_every=200)  # fmt: skip
    # the reference's fixed hate weight (x10), under which these thresholds were set: with the
    # train split's own weights (x1.4) the unbiased control's targeted-vs-other gap on this
    # 400-example test split varies from -0.23 to +0.18 across seeds (noise, not bias)
    config.downstream.class_weights = "reference"
    config.phases = ("downstream",)
    workdir = tmp_path / f"{name}-{bias}"
    phases.run(config, workdir)
    return report.load_run(workdir)


def mean(values) -> float:
    return sum(values) / len(values)


def test_planted_race_bias_is_detected_by_fprd(tmp_path):
    """Hateful synthetic sentences name a targeted identity 90% of the time; FT learns the
    shortcut and flags non-hateful sentences that name one. Without the planted
    association (0.5) the identity gaps vanish."""
    rates, runs = {}, {}
    for bias in (0.9, 0.5):
        run = runs[bias] = fine_tune(tmp_path, "race_ft", bias)
        per_term = run.downstream["test"]["fpr_dixon_per_term"]
        rates[bias] = (mean([per_term[t] for t in synthetic.TARGETED]),
                       mean([per_term[t] for t in synthetic.OTHERS]))  # fmt: skip
        assert run.downstream["test"]["macro_f1"] > 70, "the task itself is learned"
    targeted, others = rates[0.9]
    assert targeted - others > 0.3, rates
    assert abs(rates[0.5][0] - rates[0.5][1]) < 0.15, rates
    assert "false-positive rate" in report.planted_bias(runs[0.9])


def test_planted_gender_bias_is_detected_by_tpr_gap(tmp_path):
    """Women are nurses or teachers 90% of the time: with the job cue withheld the model
    guesses from gender, so male TPR is lower on the female-typed jobs and higher on the
    male-typed job it guesses for men (the two male-typed jobs are equally frequent, so which
    one it picks, and the gap on the other, small test counts, vary with the random
    stream)."""
    biased = fine_tune(tmp_path, "gender_ft", 0.9).downstream["test"]
    fair = fine_tune(tmp_path, "gender_ft", 0.5).downstream["test"]
    gaps = biased["tpr_gaps"]
    assert mean([gaps[j] for j in synthetic.FEMALE_TYPED]) < -0.2, gaps
    assert max(gaps[j] for j in ("surgeon", "software_engineer")) > 0.2, gaps
    assert biased["tpr_gap"] > fair["tpr_gap"] + 10, (biased["tpr_gap"], fair["tpr_gap"])


NUMBER = r"-?\d+\.\d+"
WITH_INTERVAL = re.compile(rf"^{NUMBER} \[{NUMBER}, {NUMBER}\]$")


def table_cells(text: str, first_row: str) -> list[list[str]]:
    """The cells after the label of every row of the markdown table holding `first_row`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_row))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")][1:])
    return rows


def assert_every_number_has_an_interval(text: str) -> None:
    """Every cell of Table 2 (after the header) is a number with its [low, high]."""
    section = text.split("## Table 2 layout")[1].split("\n## ")[0]
    rows = table_cells(section, "| FT |")
    assert rows and all(WITH_INTERVAL.match(c) for row in rows for c in row), rows


def test_seeds_run_per_seed_and_report_mean_sd_and_paired_intervals(tmp_path):
    config = load_config("race_adapter", "smoke")
    config.phases = ("upstream", "downstream", "baseline", "report")
    config.seeds = (1, 2, 3)
    # the stereotyped task's splits are the same for every seed: the seeds' predictions
    # are of the same test examples, so the mean change gets a paired interval
    config.upstream.train_file = config.downstream.train_file = "stereotyped"
    phases.run(config, tmp_path)
    for seed in (1, 2, 3):
        sub = json.loads((tmp_path / f"seed-{seed}" / "config.json").read_text())
        assert sub["seed"] == seed and not sub["seeds"]
        assert_every_number_has_an_interval((tmp_path / f"seed-{seed}" / "report.md").read_text())
    text = (tmp_path / "report.md").read_text()
    rows = table_cells(text, "| FT |")
    assert len(rows) == 2 and all(re.match(rf"^{NUMBER} ± {NUMBER} \(n=3\)$", c)
                                  for row in rows for c in row), rows  # fmt: skip
    change = next(line for line in text.splitlines() if line.startswith("Change of Adapter"))
    assert "over 3 seeds" in change, change
    assert re.search(r"mean change [+-][\d.]+ \[[+-][\d.]+, [+-][\d.]+\]", change), change
    table = report.compare([tmp_path], tmp_path / "compare").read_text()
    assert table.count("| FT (") == 3 and f"| Adapter ({tmp_path.name}/seed-2) |" in table
    with pytest.raises(ConfigError, match="repeats"):
        config.seeds = (1, 1)
        phases.run(config, tmp_path / "again")


def test_report_with_baseline_and_compare(tmp_path):
    config = load_config("race_adapter", "smoke")
    config.phases = ("upstream", "downstream", "baseline", "report")
    phases.run(config, tmp_path / "adapter")
    text = (tmp_path / "adapter" / "report.md").read_text()
    assert "| FT |" in text and "| Adapter |" in text and "Effect of Adapter against FT" in text
    assert_every_number_has_an_interval(text)
    effect = next(line for line in text.splitlines() if line.startswith("Effect of Adapter"))
    assert re.search(r"FPRD Dixon [\d.]+ -> [\d.]+ \([+-][\d.]+ \[[+-][\d.]+, [+-][\d.]+\]\)",
                     effect), effect  # fmt: skip
    assert "## FPRD per identity term" in text and "| negatives |" in text
    for plot in ("group_bias.png", "loss_curves.png"):
        assert (tmp_path / "adapter" / "plots" / plot).read_bytes()[:4] == b"\x89PNG"
    lora = load_config("race_lora", "smoke")
    lora.phases = ("upstream", "downstream")
    phases.run(lora, tmp_path / "lora")
    result = subprocess.run(
        [sys.executable, "run.py", "--compare", str(tmp_path / "adapter"), str(tmp_path / "lora"),
         f"--workdir={tmp_path / 'compare'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "compare" / "compare.md").read_text()
    for row in ("| FT |", "| Adapter |", "| LoRA |"):
        assert row in table and row in result.stdout
    with pytest.raises(Exception, match="not a workdir"):
        report.compare([tmp_path / "nothing"], tmp_path / "out")
