"""Host memory around compiled steps (CPU peak RSS).

A train step's scratch (activations, gradients, optimizer temporaries: 1.2-1.6 GB for
BERT-base) is allocated on top of whatever the process holds when it first runs. glibc
keeps most memory freed by initialisation and by compiling, so without a release the peak
is init + compile garbage + scratch. `release_host_memory` hands it back between compiling
and running (`parallel.Runner` calls it); `XLA_CPU_FLAGS` shrinks the scratch itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
import os
import time
from collections.abc import Hashable
from typing import Any

import jax

log = logging.getLogger(__name__)

# XLA's CPU scheduler that keeps independent work apart for concurrency also keeps more
# buffers live: off, BERT-base fine-tuning's scratch is 1.37 GB instead of 1.57 GB.
XLA_CPU_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)
# Dropping JAX's caches makes every later small program compile again (seconds per run of
# a tiny test model); worth it before a train step only when the state is this large.
DROP_CACHES_MIN_BYTES = 256 * 2**20
# A full garbage collection walks the whole heap: 0.2-0.5 s once the libraries are loaded,
# 27 s of the demo's 334 s over its 90 small compiles. Below this many bytes of
# arguments a compile is followed by a young-generation collection instead, which holds all
# of tracing's garbage (tracing runs with the collector off).
FULL_COLLECT_MIN_BYTES = 256 * 2**20


def tree_bytes(tree: Any) -> int:
    """Bytes of the arrays in a pytree."""
    return sum(int(getattr(x, "nbytes", 0)) for x in jax.tree_util.tree_leaves(tree))


def configure_xla_flags(environ: dict | None = None) -> None:
    """Add `XLA_CPU_FLAGS` to XLA_FLAGS unless the user set those flags; call before JAX
    starts its back end (run.py does it first thing). A user's own value wins."""
    environ = os.environ if environ is None else environ
    current = environ.get("XLA_FLAGS", "")
    missing = [f for f in XLA_CPU_FLAGS if f.split("=")[0] not in current]
    if missing:
        environ["XLA_FLAGS"] = " ".join([current, *missing]).strip()


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_host_memory(drop_caches: bool = False, full: bool = True) -> bool:
    """Give freed host memory back to the OS: collect garbage (every generation, or with
    `full` False only the young ones), optionally drop JAX's caches of compiled programs
    (the one-off ones of initialisation and loading: 170 MB after a BERT-base random init),
    then trim glibc's heap. True if the heap was trimmed."""
    gc.collect(2 if full else 1)
    if drop_caches:
        jax.clear_caches()
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def compiled_ahead(
    jitted: Any, cache: dict, key: Hashable, *args: Any, drop_caches: bool = False
) -> Any:
    """`jitted` compiled for `args` and kept in `cache[key]`: compiled before it first runs,
    with the compiler's freed memory returned in between (a jitted call compiles and runs in
    one go, so that garbage would sit under the program's scratch). `drop_caches` first
    drops JAX's caches of one-off programs (for the job's big step). Call the result with
    the non-static arguments."""
    executable = cache.get(key)
    if executable is None:
        if drop_caches:
            release_host_memory(drop_caches=True)
        began = time.perf_counter()
        # tracing makes millions of short-lived objects; the collector's full passes over
        # them cost seconds per big step, and release_host_memory collects right after
        gc.disable()
        try:
            # pmap has no separate trace stage: its lower() traces too (reported as 0 s)
            traced = jitted.trace(*args) if hasattr(jitted, "trace") else None
            traced_at = time.perf_counter()
            lowered = jitted.lower(*args) if traced is None else traced.lower()
            lowered_at = time.perf_counter()
            executable = cache[key] = lowered.compile()
        finally:
            gc.enable()
        log.info(
            "%s: traced in %.1f s, lowered in %.1f s, compiled in %.1f s",
            key,
            traced_at - began,
            lowered_at - traced_at,
            time.perf_counter() - lowered_at,
        )
        release_host_memory(full=tree_bytes(args) >= FULL_COLLECT_MIN_BYTES)
    return executable
