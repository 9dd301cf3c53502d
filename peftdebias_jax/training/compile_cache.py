"""JAX's persistent cache of compiled programs, on by default for the command line: a
rerun, a resumed run and every seed after the first then load the programs they share
instead of compiling them again (on small models compiling is most of a phase's time)."""

from __future__ import annotations

import os
from pathlib import Path

import jax

DEFAULT_DIR = Path.home() / ".cache" / "peftdebias_jax" / "xla"
MIN_COMPILE_TIME_VARIABLE = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"  # a user's wins


def enable(directory: str | os.PathLike | None) -> Path | None:
    """Caches compiled programs in `directory` (created); None or "" leaves JAX's own
    setting (JAX_COMPILATION_CACHE_DIR, if the user set one). Returns the directory used."""
    if not directory:
        current = jax.config.jax_compilation_cache_dir
        return Path(current) if current else None
    path = Path(directory).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # every program, not only those that compile in over a second (JAX's default): a small
    # model's steps compile in 0.2-0.9 s each, and a run of several phases has dozens
    if MIN_COMPILE_TIME_VARIABLE not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path
