"""Command line.

Run a config:   python run.py --config=configs/<axis>_<method>.py[:demo|:smoke] [--workdir=DIR]
Overrides:      --config.upstream.learning_rate=1e-5 and the like (ml_collections)
Compare runs:   python run.py --compare DIR [DIR ...] [--workdir=OUT]   (OUT/compare.md)
"""

import logging as std_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

from peftdebias_jax import phases, report
from peftdebias_jax.training import compile_cache, memory

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/race_adapter.py:demo"
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory (default runs/<config>[-<preset>], or runs/compare)"
)
_COMPILE_CACHE = flags.DEFINE_string(
    "compile_cache",
    os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(compile_cache.DEFAULT_DIR),
    "Directory of compiled XLA programs reused across runs and seeds ('' = off)",
)
_COMPARE = flags.DEFINE_bool(
    "compare", False, "Tabulate finished workdirs given as arguments instead of running"
)


def main(argv: list[str]) -> None:
    memory.configure_xla_flags()  # before JAX starts its back end
    compile_cache.enable(_COMPILE_CACHE.value)
    logging.set_verbosity(logging.INFO)
    for noisy in ("absl", "jax", "orbax", "matplotlib"):  # Orbax logs every file it writes
        std_logging.getLogger(noisy).setLevel(std_logging.WARNING)
    if _COMPARE.value:
        if len(argv) < 2:
            raise app.UsageError("--compare needs workdirs: python run.py --compare DIR [DIR ...]")
        path = report.compare(argv[1:], _WORKDIR.value or "runs/compare")
        print(path.read_text())
        print(f"comparison: {path}")
        return
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config=configs/race_adapter.py:demo")
    filename = config_flags.get_config_filename(flags.FLAGS["config"])
    workdir = _WORKDIR.value or phases.default_workdir(filename)
    phases.run(_CONFIG.value, workdir)


if __name__ == "__main__":
    app.run(main)
