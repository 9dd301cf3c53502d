"""Host memory release around compiled steps, and the XLA CPU flags run.py sets."""

import gc
import platform

import jax
import numpy as np
import pytest

from peftdebias_jax.training import memory


def test_configure_xla_flags_adds_missing_flags_and_keeps_the_users():
    environ = {}
    memory.configure_xla_flags(environ)
    assert environ["XLA_FLAGS"].split() == list(memory.XLA_CPU_FLAGS)

    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    memory.configure_xla_flags(environ)
    assert environ["XLA_FLAGS"].split() == [
        "--xla_force_host_platform_device_count=4",
        *memory.XLA_CPU_FLAGS,
    ]

    name = memory.XLA_CPU_FLAGS[0].split("=")[0]
    environ = {"XLA_FLAGS": f"{name}=true"}  # the user's choice wins
    memory.configure_xla_flags(environ)
    assert environ["XLA_FLAGS"] == f"{name}=true"


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_host_memory_returns_freed_heap_to_the_os():
    # 100 KB blocks (below glibc's mmap threshold: heap) pinned apart by small live blocks,
    # so that freeing the big ones leaves holes that glibc does not trim by itself.
    big = [bytearray(100_000) for _ in range(2000)]
    pins = [bytearray(2_000) for _ in range(2000)]
    for block in big:
        block[::4096] = b"\1" * len(block[::4096])  # touch every page
    del big
    before = resident_mb()
    assert memory.release_host_memory() is True
    after = resident_mb()
    assert before - after > 100, (before, after)
    del pins


def test_tree_bytes_counts_array_leaves():
    import jax.numpy as jnp
    import numpy as np

    tree = {"a": jnp.zeros((4, 8), jnp.float32), "b": [np.zeros(3, np.int8)], "c": None}
    assert memory.tree_bytes(tree) == 4 * 8 * 4 + 3


def test_compiled_ahead_compiles_once_and_leaves_the_collector_on():
    """One compile per key, run with the garbage collector paused; it is on again after,
    also when compiling fails."""
    cache = {}
    double = jax.jit(lambda x: 2 * x)
    first = memory.compiled_ahead(double, cache, "k", np.ones(3, np.float32))
    assert memory.compiled_ahead(double, cache, "k", np.ones(3, np.float32)) is first
    np.testing.assert_allclose(first(np.ones(3, np.float32)), 2.0)
    assert gc.isenabled()
    with pytest.raises(AttributeError):
        memory.compiled_ahead(jax.jit(lambda x: x.no_such), cache, "bad", np.ones(3))
    assert gc.isenabled() and "bad" not in cache


@pytest.mark.parametrize(("threshold", "generation"), [(2**40, 1), (0, 2)])
def test_compiled_ahead_collects_the_whole_heap_only_after_a_big_programs_compile(
    monkeypatch, threshold, generation
):
    """A full collection walks the whole heap (tenths of a second each time); after a small
    program's compile the young generations, which hold tracing's garbage, are enough."""
    monkeypatch.setattr(memory, "FULL_COLLECT_MIN_BYTES", threshold)
    seen = []

    def record(phase, info):
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(record)
    try:
        memory.compiled_ahead(jax.jit(lambda x: 3 * x), {}, "k", np.ones(3, np.float32))
    finally:
        gc.callbacks.remove(record)
    assert generation in seen and max(seen) == generation, seen
