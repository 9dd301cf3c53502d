"""Command line.

Run a config:   python run.py --config=configs/<axis>_<method>.py[:preset] [--workdir=DIR]
Overrides:      --config.upstream.learning_rate=1e-5 and the like (ml_collections)
Compare runs:   python run.py --compare DIR [DIR ...] [--workdir=OUT]   (OUT/compare.md)
Rerun phases:   --rerun=upstream,downstream (or all) after changing what they computed
--verbose:      the resolved config on the console and full tracebacks on errors
Exit status:    0 done; 2 a bad command, config or input (nothing was lost); 1 a failure
                while running; 130 / 143 interrupted by SIGINT / SIGTERM (rerun to resume)
"""

import os
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from configs import common as config_presets
from peftdebias_jax import phases, processes, report
from peftdebias_jax.command_line import (
    Failure,
    config_argument,
    describe_failure,
    quiet_libraries,
    unknown_override,
    usage,
)
from peftdebias_jax.training import compile_cache, interrupts, memory

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
_RERUN = flags.DEFINE_list(
    "rerun",
    [],
    "Phases to compute again although finished (their outputs are removed first), e.g. "
    "upstream,downstream, or all; needed when settings changed what a finished phase computed",
)
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Print the resolved config, and full tracebacks on errors"
)
CONFIGS = Path(__file__).resolve().parent / "configs"


def parse(argv: list[str]) -> list[str]:
    """absl's flag parsing, with one short message (exit 2) for a bad command line."""
    if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
        print(usage(__doc__, CONFIGS, config_presets.PRESETS))
        sys.exit(0)
    spec = config_argument(argv)
    if spec is not None and not Path(spec.partition(":")[0]).is_file():
        stop(f"--config={spec}: no such config file; see `python run.py --help` for the configs")
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        stop(f"{err}".splitlines()[0])
    except (AttributeError, KeyError) as err:  # an override of a key the config lacks
        stop(unknown_override(argv, spec, phases.load_config) or f"bad override: {err}")


def stop(message: str, status: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def main(argv: list[str]) -> None:
    memory.configure_xla_flags()  # before JAX starts its back end
    compile_cache.enable(_COMPILE_CACHE.value)
    logging.set_verbosity(logging.INFO)
    quiet_libraries()  # before transformers is first imported
    interrupts.install()
    workdir = None
    try:
        if _COMPARE.value:
            if len(argv) < 2:
                stop("--compare needs workdirs: python run.py --compare DIR [DIR ...]")
            path = report.compare(argv[1:], _WORKDIR.value or "runs/compare")
            print(path.read_text())
            print(f"comparison: {path}")
            return
        if len(argv) > 1:
            stop(f"unexpected arguments: {argv[1:]}")
        if _CONFIG.value is None:
            stop("--config is required, e.g. --config=configs/race_adapter.py:demo")
        processes.start(_CONFIG.value.parallel)  # before any other JAX call
        if not processes.is_writer():  # process 0 reports progress for the run
            logging.set_verbosity(logging.WARNING)
        filename = config_flags.get_config_filename(flags.FLAGS["config"])
        workdir = Path(_WORKDIR.value or phases.default_workdir(filename))
        overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
        print(f"config: {filename}" + (f" with {' '.join(overrides)}" if overrides else ""))
        phases.run(_CONFIG.value, workdir, verbose=_VERBOSE.value, rerun=_RERUN.value)
    except Exception as err:  # every failure: one message, the traceback only on request
        failure = describe_failure(err, workdir, _VERBOSE.value)
        report_failure(failure)
    except KeyboardInterrupt as err:
        report_failure(describe_failure(err, workdir, _VERBOSE.value))


def report_failure(failure: Failure) -> None:
    print(f"error: {failure.message}", file=sys.stderr)
    if failure.hint:
        print(failure.hint, file=sys.stderr)
    sys.exit(failure.status)


if __name__ == "__main__":
    app.run(main, flags_parser=parse)
