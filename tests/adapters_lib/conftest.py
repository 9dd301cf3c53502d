"""These tests need the `adapters` library (transformers 4.57.x): they run in their own
environment, `pytest tests/adapters_lib` there (see the README's test command)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
