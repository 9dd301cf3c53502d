"""The report phase: report.md and plots/ in the workdir (rebuilt every time: it only
reads results)."""

from __future__ import annotations

from pathlib import Path

import ml_collections

from peftdebias_jax import report as report_md


def report(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    """report.md and plots/ in the workdir (rebuilt every time: it only reads results)."""
    path = report_md.write(workdir)
    print(f"report: {path}")
    return path
