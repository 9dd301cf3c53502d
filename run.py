"""Command line: python run.py --config=configs/<axis>_<method>.py[:preset] [--workdir=DIR]

Overrides: --config.upstream.learning_rate=1e-5 and the like (ml_collections).
"""

import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

from peftdebias_jax import phases

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/race_adapter.py:demo"
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory (default runs/<config>[-<preset>])"
)
flags.mark_flag_as_required("config")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    for noisy in ("absl", "jax", "orbax"):  # Orbax logs every file it writes at INFO
        std_logging.getLogger(noisy).setLevel(std_logging.WARNING)
    filename = config_flags.get_config_filename(flags.FLAGS["config"])
    workdir = _WORKDIR.value or phases.default_workdir(filename)
    phases.run(_CONFIG.value, workdir)


if __name__ == "__main__":
    app.run(main)
