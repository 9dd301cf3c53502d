"""The demo as the README runs it (`run.py --config=configs/race_adapter.py:demo`, one
seed here, XLA's default compiler settings): the pretrained base carries the planted
stereotypes on held-out minimal pairs of both axes, the matching patch moves its axis
toward 50%, the other axis's patch leaves that axis largely alone, the patch is
transferred to a second task of its axis, and every fairness number in the report carries
an interval."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import user_environment
from test_end_to_end import WITH_INTERVAL, assert_every_number_has_an_interval, table_cells

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's first seed, run as a user runs it: its claims rest on the numbers the
    user gets, not on those of the tests' cheaper compiler settings (conftest.py)."""
    root = tmp_path_factory.mktemp("demo")
    base = root / "base"
    command = [sys.executable, "run.py", "--config=configs/race_adapter.py:demo",
               f"--workdir={root / 'run'}", "--config.seeds=()", "--config.seed=0",
               f"--config.pretrain.output={base}", f"--config.model.name={base}"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=user_environment(), capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
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
