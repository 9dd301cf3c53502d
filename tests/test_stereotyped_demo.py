"""The demo as the README runs it (configs/race_adapter.py:demo, one seed here): the
pretrained base carries the planted stereotypes on held-out minimal pairs of both axes,
the matching patch moves its axis toward 50%, the other axis's patch leaves that axis
largely alone, the patch is transferred to a second task of its axis, and every fairness
number in the report carries an interval."""

import json

import pytest
from config_fixtures import load_config
from test_end_to_end import WITH_INTERVAL, assert_every_number_has_an_interval, table_cells

from peftdebias_jax import phases


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    config = load_config("race_adapter", "demo")
    config.pretrain.output = config.model.name = str(root / "base")
    config.seeds, config.seed = (), 0  # the demo's first seed
    phases.run(config, root / "run")
    return root / "run"


def pairs(demo, variant: str, axis: str) -> dict:
    return json.loads((demo / "evaluation.json").read_text())["intrinsic"][variant][f"pairs_{axis}"]


def test_the_base_prefers_the_planted_stereotypes(demo):
    for axis in ("gender", "race"):
        base = pairs(demo, "base", axis)
        assert base["interval"][0] > 60, (axis, base)


PATCHES = {"race": "base+debias", "gender": "cross_axis:gender"}  # the run's, the other's


@pytest.mark.parametrize("axis", ["race", "gender"])
def test_the_matching_patch_moves_its_axis_toward_fifty(demo, axis):
    base, patched = pairs(demo, "base", axis), pairs(demo, PATCHES[axis], axis)
    assert patched["change"]["interval"][1] < 0, patched
    assert abs(patched["score"] - 50) < abs(base["score"] - 50) - 5, (base, patched)


@pytest.mark.parametrize(("axis", "other"), [("race", "gender"), ("gender", "race")])
def test_a_patch_leaves_the_other_axis_largely_alone(demo, axis, other):
    own = pairs(demo, PATCHES[axis], axis)["change"]["difference"]
    elsewhere = pairs(demo, PATCHES[axis], other)["change"]["difference"]
    assert abs(elsewhere) < abs(own) / 2, (own, elsewhere)


def test_every_fairness_number_in_the_report_has_an_interval(demo):
    text = (demo / "report.md").read_text()
    assert_every_number_has_an_interval(text)
    section = text.split("## Intrinsic bias, axis by axis")[1].split("\n## ")[0]
    rows = table_cells(section, "| base |")
    assert len(rows) == 3 and all(WITH_INTERVAL.match(c) for row in rows for c in row), rows
    assert "against the base: gender" in section and "## FPRD per identity term" in text
    effect = next(line for line in text.splitlines() if line.startswith("Effect of Adapter"))
    assert effect.count("[") == 5, effect  # F1, FPRD, FPRD Dixon, DP, EO: paired intervals


def test_the_patch_is_transferred_to_the_other_task_of_its_axis(demo):
    """The transfer phase: the run's patch frozen on lhc beside FT on lhc, both scored on
    the same test examples, with the change's paired intervals in the report."""
    moved = json.loads((demo / "transfer" / "config.json").read_text())
    assert moved["downstream"]["task"] == "lhc"
    assert moved["downstream"]["patches"] == [str(demo / "patch")]
    for sub in ("transfer", "transfer/baseline"):
        assert json.loads((demo / sub / "downstream_results.json").read_text())["task"] == "lhc"
    text = (demo / "report.md").read_text()
    assert "**lhc** (test split)" in text and "| FT on lhc |" in text
    effect = next(line for line in text.splitlines()
                  if line.startswith("Effect of Adapter on lhc against FT on lhc"))  # fmt: skip
    assert effect.count("[") == 5, effect
