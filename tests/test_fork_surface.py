"""A fork's surface: new masks, scores, neutralizers and groupings are one registered
function each; unknown names are errors listing the known ones; the example script runs;
reports name each run's trainable kind and show what the mask phases chose."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from config_fixtures import load_config

from peftdebias_jax import phases, report
from peftdebias_jax.errors import ConfigError
from peftdebias_jax.importance import bias_scores, fisher
from peftdebias_jax.trainable_sets import TRAINABLE_SETS

ROOT = Path(__file__).resolve().parents[1]


def test_example_script_trains_new_masks_with_public_names_only(tmp_path):
    result = subprocess.run(
        [sys.executable, "examples/custom_mask.py", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    counts = [int(n.replace(",", "")) for n in re.findall(r"trainable params: ([\d,]+)",
                                                          result.stdout)]  # fmt: skip
    # smoke model: 2 layers of hidden 32; value kernel + bias of both, classifier 32 x 2 + 2
    assert counts[0] == 2 * (32 * 32 + 32) + 66
    # the entry mask: about 5% of the two 32 x 32 kernels, biases and classifier in full
    assert 2 * 32 + 66 + 95 <= counts[1] <= 2 * 32 + 66 + 115
    for name in ("top_values", "top5_magnitude"):
        results = json.loads((tmp_path / name / "downstream_results.json").read_text())
        assert "demographic_parity" in results["test"], "DP/EO over the new grouping"
        assert f"| {name} |" in (tmp_path / name / "report.md").read_text()
    source = (ROOT / "examples" / "custom_mask.py").read_text()
    imports = re.findall(r"^from (peftdebias_jax\S*) import (.+)$", source, flags=re.M)
    public = {"peftdebias_jax": "masks, phases",
              "peftdebias_jax.evaluation.extrinsic": "GROUPINGS",
              "peftdebias_jax.trainable_sets": "TRAINABLE_SETS"}  # fmt: skip
    assert dict(imports) == public and "sys.path" not in source


@pytest.mark.parametrize(
    ("key", "value", "known"),
    [
        ("downstream.trainable", "nope", "['all', 'beft', 'bitfit', 'lowrank']"),
        ("downstream.groups", "nope", "['auto']"),
    ],
)
def test_unknown_names_list_the_known_ones(tmp_path, key, value, known):
    config = load_config("race_ft", "smoke")
    config.phases = ("downstream",)
    section, field = key.split(".")
    config[section][field] = value
    with pytest.raises(ConfigError, match=re.escape(f"config.{key}='{value}': unknown")) as err:
        phases.run(config, tmp_path)
    assert known in str(err.value)


def test_new_score_and_neutralizer_from_outside(monkeypatch):
    monkeypatch.setattr(bias_scores, "CHANGE_SCORES", type(bias_scores.CHANGE_SCORES)(
        "bias change score", "config.beft.criterion", "bias_scores.CHANGE_SCORES"))  # fmt: skip
    bias_scores.CHANGE_SCORES.register("l2")(
        lambda b, b0, where: float(np.linalg.norm(np.asarray(b) - np.asarray(b0)))
    )
    layer = {"bert": {"encoder": {"layer_0": {"attention": {"self": {"value": {
        "bias": np.zeros(4)}}}}}}}  # fmt: skip
    moved = {"bert": {"encoder": {"layer_0": {"attention": {"self": {"value": {
        "bias": np.full(4, 0.5)}}}}}}}  # fmt: skip
    assert bias_scores.change_scores(moved, layer, "l2")["b_v"] == pytest.approx([1.0])
    assert bias_scores.criteria() == ("l2", "fisher")

    monkeypatch.setitem(fisher.NEUTRALIZERS, "max", lambda norm, fishers, lam, q: (
        {p: np.max([n[p] for n in norm], 0) for p in norm[0]}, None))  # fmt: skip
    f0, f1 = {("w",): np.array([1.0, 3.0])}, {("w",): np.array([3.0, 1.0])}
    importance, _ = fisher.neutralize({0: f0, 1: f1}, "max")
    np.testing.assert_allclose(importance[("w",)], [1.5, 1.5])
    with pytest.raises(ConfigError, match=r"unknown neutralizer; the known ones are \["):
        fisher.neutralize({0: f0, 1: f1}, "maximum")


def test_reports_name_the_trainable_kind():
    assert report.model_name({"patch": {"method": "none"}}) == "FT"
    assert report.model_name({"downstream": {"trainable": "lowrank"}}) == "Fisher low-rank"
    assert report.model_name({"downstream": {"trainable": "beft"}}) == "BEFT"
    seq_bn = {"patch": {"method": "seq_bn"}, "downstream": {"trainable": "bitfit"}}
    assert report.model_name(seq_bn) == "Adapter + BitFit"
    assert "all" in TRAINABLE_SETS


def test_mask_phases_record_groups_and_candidates_and_report_them(tmp_path):
    config = load_config("race_fisher_lowrank", "smoke")
    phases.run(config, tmp_path / "fisher")
    record = json.loads((tmp_path / "fisher" / "fisher.json").read_text())
    assert record["grouping"] == "auto"
    assert set(record["group_names"]) == set(record["group_sizes"])
    text = (tmp_path / "fisher" / "report.md").read_text()
    assert "| Fisher low-rank |" in text and "## Parameter masks" in text
    assert "Fisher low-rank (reconstructed)" in text

    beft = load_config("race_beft", "smoke")
    beft.beft.mode = "v1_select"
    beft.beft.criterion = "magnitude"
    beft.phases = ("bias_select", "downstream", "report")
    phases.run(beft, tmp_path / "beft")
    scores = json.loads((tmp_path / "beft" / "bias_scores.json").read_text())
    assert scores["candidates"] == list(beft.beft.candidates)
    text = (tmp_path / "beft" / "report.md").read_text()
    assert "| BEFT |" in text and f"selected {scores['selected']} among the candidates" in text
