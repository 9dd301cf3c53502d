"""Load configs/*.py the way run.py does (get_config(preset)), for in-process tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_config(name: str, preset: str | None = None):
    path = ROOT / "configs" / f"{name}.py"
    sys.path.insert(0, str(ROOT))
    try:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(preset)
    finally:
        sys.path.remove(str(ROOT))
