"""What run.py tells a person: the usage with the configs and presets, a short message for a
bad override, and one message and exit status for every failure (the traceback goes to
the workdir's error.log, or to the console with --verbose)."""

from __future__ import annotations

import difflib
import errno
import logging
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from peftdebias_jax import processes
from peftdebias_jax.errors import ConfigError, PeftDebiasError, headline
from peftdebias_jax.training.interrupts import Interrupted

RESUME = "rerun the same command to resume (finished phases and checkpoints are kept)"
ERROR_LOG = "error.log"
# Loggers that speak of the libraries' own work (Orbax logs every file it writes).
NOISY_LOGGERS = ("absl", "jax", "orbax", "matplotlib")
# transformers' advice that does not apply here: this library uses it for tokenizers only.
MISLEADING = ("PyTorch was not found",)


def quiet_libraries() -> None:
    """Only warnings from the libraries' loggers, and none of transformers' remarks that
    mislead a JAX user (that PyTorch is missing: the plain install never needs it)."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("transformers").addFilter(
        lambda record: not record.getMessage().startswith(MISLEADING)
    )


def usage(doc: str, configs: Path, presets: Sequence[str]) -> str:
    """run.py's docstring, then each config file with its first docstring line, and the
    presets."""
    lines = [doc.strip(), "", "Configs (--config=configs/<name>.py[:preset]):"]
    for path in sorted(p for p in configs.glob("*_*.py") if not p.name.startswith("_")):
        text = path.read_text()
        paragraph = text.split('"""')[1].strip().split("\n\n")[0] if '"""' in text else ""
        summary = " ".join(paragraph.split()).split(": ")[0].split(". ")[0]
        summary = summary if len(summary) <= 72 else summary[:71].rstrip() + "…"
        lines.append(f"  {path.stem:<24}{summary}")
    named = ", ".join(f'"{p}"' if p else '"" (the paper setting)' for p in presets)
    lines += ["", f"Presets: {named}"]
    return "\n".join(lines)


def config_argument(argv: Sequence[str]) -> str | None:
    """The value of --config=... (or --config ...), if given."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def unknown_override(
    argv: Sequence[str], spec: str | None, load: Callable[[str], object]
) -> str | None:
    """For the first --config.<path>=... whose key the config lacks: the key and the
    closest existing ones; None when every override names a key (or none can be read)."""
    if spec is None:
        return None
    config = load(spec)
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config.") :].split("=", 1)[0].split(".")
        node = config
        for depth, key in enumerate(path):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if key not in keys:
                where = ".".join(["config", *path[:depth]])
                close = difflib.get_close_matches(key, keys, n=3)
                hint = (
                    f"did you mean {', '.join(close)}?" if close else f"its keys: {', '.join(keys)}"
                )
                return f"--config.{'.'.join(path)}: {where} has no key {key!r}; {hint}"
            node = node[key]
    return None


@dataclass(frozen=True)
class Failure:
    """What the person is told: one message, an optional next line, the exit status."""

    message: str
    hint: str
    status: int


def describe_failure(err: BaseException, workdir: Path | None, verbose: bool) -> Failure:
    """The message and exit status for `err` (2: the command, config or input is at
    fault; 1: a failure while running; 130/143: interrupted), with where the traceback is."""
    if isinstance(err, Interrupted):
        return Failure(str(err), "", err.exit_status)
    if isinstance(err, KeyboardInterrupt):
        status = 143 if "SIGTERM" in str(err) else 130
        return Failure(f"interrupted; {RESUME}", "", status)
    message, status = classify(err)
    return Failure(message, traceback_hint(err, workdir, verbose), status)


def classify(err: BaseException) -> tuple[str, int]:
    if isinstance(err, ConfigError):  # DataError too
        return str(err), 2
    if isinstance(err, PeftDebiasError):
        return str(err), 1
    if isinstance(err, UnicodeDecodeError):
        return f"an input file is not UTF-8 text ({err.reason} at byte {err.start})", 2
    if isinstance(err, OSError):
        where = err.filename or "a file"
        if err.errno == errno.ENOSPC:
            return f"{where}: the disk is full; free space, then {RESUME}", 1
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"{where}: not writable ({err.strerror}); choose another --workdir", 2
        if isinstance(err, NotADirectoryError | FileExistsError):
            return f"{where}: a file is in the way of a directory; choose another --workdir", 2
        if isinstance(err, FileNotFoundError):
            return f"{where}: no such file or directory", 2
        return f"{where}: {err.strerror or err}", 1
    return headline(err), 1


def traceback_hint(err: BaseException, workdir: Path | None, verbose: bool) -> str:
    """The traceback itself (--verbose), or where it was written (workdir/error.log)."""
    text = "".join(traceback.format_exception(err))
    if verbose:
        return text.rstrip()
    if not processes.is_writer():  # process 0 alone writes the workdir
        return text.rstrip()
    if workdir is not None and Path(workdir).is_dir():
        try:
            (Path(workdir) / ERROR_LOG).write_text(text)
            return f"(the traceback is in {Path(workdir) / ERROR_LOG}; --verbose prints it)"
        except OSError:
            pass
    return "(--verbose prints the traceback)"
