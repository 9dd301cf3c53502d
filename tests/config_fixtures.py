"""Load configs/*.py the way run.py does (get_config(preset)), for in-process tests."""

from __future__ import annotations

from pathlib import Path

from peftdebias_jax import phases

ROOT = Path(__file__).resolve().parents[1]


def load_config(name: str, preset: str | None = None):
    return phases.load_config(f"{ROOT / 'configs' / name}.py:{preset or ''}")
