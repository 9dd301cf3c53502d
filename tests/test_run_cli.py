"""run.py resolves a config, prints it, writes it to the workdir and builds the model."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from config_fixtures import load_config as load_named

from peftdebias_jax import command_line, phases
from peftdebias_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*_*.py") if not p.stem.startswith("_"))


def load_config(path: Path, preset: str | None):
    return load_named(path.stem, preset)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_resolves_in_every_preset(path):
    axis = path.stem.split("_")[0]
    baseline = path.stem.endswith(("_ft", "_full_debias", "_beft", "_fisher_lowrank"))
    if path.stem.endswith("_transfer"):
        assert load_config(path, None).downstream.task in ("mnli", "lhc")
    for preset in (None, "demo", "smoke", "minilm"):
        config = load_config(path, preset)
        assert config.axis == axis
        assert (config.patch.method == "none") == baseline
    paper = load_config(path, None)
    assert paper.model.name == "bert-base-uncased" and paper.upstream.num_steps == 10_000
    assert load_config(path, "smoke").model.init == "random"


def test_unknown_preset_is_an_error():
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        load_config(ROOT / "configs" / "race_adapter.py", "fast")


def test_smoke_model_builds():
    config = load_config(ROOT / "configs" / "gender_lora.py", "smoke")
    module, params = phases.common.build_model(config)
    assert module.config.hidden_size == config.model.architecture.hidden_size
    assert phases.common.count_params(params) > 0


def test_default_workdir():
    assert phases.default_workdir("configs/race_adapter.py:demo") == Path("runs/race_adapter-demo")
    assert phases.default_workdir("configs/race_adapter.py") == Path("runs/race_adapter")


def test_run_py_smoke(tmp_path):
    workdir = tmp_path / "work"
    result = subprocess.run(
        [
            sys.executable,
            "run.py",
            "--config=configs/race_adapter.py:smoke",
            "--config.upstream.learning_rate=0.001",
            f"--workdir={workdir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resolved config: {workdir / 'config.json'}" in result.stdout
    assert "trainable params:" in result.stdout
    assert "upstream step 4/4" in result.stderr, "the progress line"
    assert (workdir / "patch" / "patch.json").exists() and (workdir / "metrics.jsonl").exists()
    written = json.loads((workdir / "config.json").read_text())
    assert written["upstream"]["learning_rate"] == 0.001
    assert written["axis"] == "race" and written["patch"]["method"] == "seq_bn"


def test_run_py_rejects_config_typo(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "run.py",
            "--config=configs/race_adapter.py:smoke",
            "--config.upstream.lrr=1",
            f"--workdir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "lrr" in result.stderr
    assert not (tmp_path / "config.json").exists()


def test_unknown_phase_is_an_error_before_anything_runs(tmp_path):
    config = load_config(ROOT / "configs" / "race_adapter.py", "smoke")
    config.phases = ("upstrem",)
    with pytest.raises(ConfigError, match=r"config\.phases: unknown \['upstrem'\]"):
        phases.run(config, tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_run_py_drops_transformers_remark_that_pytorch_is_missing():
    """The plain install has no PyTorch, and transformers, imported for its tokenizers, says
    that models won't be available: run.py's loggers drop that remark (it misleads a JAX
    user) and keep transformers' other warnings."""
    heard: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: heard.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        command_line.quiet_libraries()
        logger.warning("PyTorch was not found. Models won't be available and only tokenizers, "
                       "configuration and file/data utilities can be used.")  # fmt: skip
        logger.warning("Token indices sequence length is longer than the specified maximum")
    finally:
        logger.removeHandler(handler)
    assert heard == ["Token indices sequence length is longer than the specified maximum"]
