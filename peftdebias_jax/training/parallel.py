"""How a pure step is compiled: one device (`jit`), a device mesh (`jit` with the batch
sharded along "data"), or `pmap`. The step itself never knows; only `pmap` needs it to
sum across devices, which the step builders take as `axis_name`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from peftdebias_jax import processes
from peftdebias_jax.errors import ConfigError
from peftdebias_jax.training import memory, steps

log = logging.getLogger(__name__)
MODES = ("auto", "single", "jit", "pmap")
AXIS = "data"


def resolve_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"config.parallel.mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        return "jit" if jax.device_count() > 1 else "single"
    return mode


class Runner:
    """Places state and batches on devices and runs compiled steps; counts compiles and the
    seconds spent waiting for them (`compile_seconds`, which throughput figures leave out)."""

    def __init__(
        self, mode: str, batch_size: int, field: str = "batch_size", compile_ahead: bool = False
    ) -> None:
        """`compile_ahead`: `CompiledStep.ahead` compiles in a background thread (jit and
        single modes; pmap compiles each shape at its first call)."""
        self.mode = resolve_mode(mode)
        if self.mode in ("single", "pmap") and processes.count() > 1:
            raise ConfigError(
                f"config.parallel.mode={self.mode!r} runs on one process's devices, and this "
                f"run has {processes.count()} processes: use 'jit' (or 'auto'), which shards "
                "every batch over all of their devices"
            )
        self.devices = jax.devices()
        self.check_rows(batch_size, field)
        self.batch_size = batch_size
        self.compile_seconds = 0.0
        self.compile_ahead = compile_ahead and self.mode != "pmap"
        self._background: concurrent.futures.ThreadPoolExecutor | None = None
        if self.mode in ("jit", "pmap"):
            devices = self.devices if self.mode == "jit" else jax.local_devices()
            self.mesh = Mesh(np.asarray(devices), (AXIS,))
            self.replicated = NamedSharding(self.mesh, PartitionSpec())
            self.sharded = NamedSharding(self.mesh, PartitionSpec(AXIS))
            self.stacked = NamedSharding(self.mesh, PartitionSpec(None, AXIS))  # [K, batch]

    @property
    def axis_name(self) -> str | None:
        return AXIS if self.mode == "pmap" else None

    def check_rows(self, batch_size: int, field: str) -> None:
        """Refuse a batch of `batch_size` rows (set by config key `field`) that the devices
        cannot split evenly."""
        count = self.rows_multiple
        if batch_size % count:
            raise ConfigError(
                f"{field}={batch_size} must be divisible by the {count} devices of mode "
                f"{self.mode!r}"
            )

    @property
    def rows_multiple(self) -> int:
        """What every batch's row count must be a multiple of: the devices it splits over."""
        return len(self.devices) if self.mode != "single" else 1

    def local_rows(self, batch_size: int | None = None) -> slice:
        """This process's rows of a global batch of `batch_size` rows (the training batch
        by default; multi-host: each process reads its own shard)."""
        per_process = (batch_size or self.batch_size) // jax.process_count()
        start = jax.process_index() * per_process
        return slice(start, start + per_process)

    def compile(self, step: Callable, name: str, donate: bool = True) -> CompiledStep:
        """`step(state, batch)` compiled for this mode; logs each new batch shape."""
        return CompiledStep(self, self._jit(step, donate, repeated=False), name, repeated=False)

    def compile_repeated(self, step: Callable, name: str) -> CompiledStep:
        """`step` compiled as `run(state, batches, count)` (steps.repeated, state donated):
        up to K steps in one call, with batches and count from `put_batches`."""
        return CompiledStep(self, self._jit(steps.repeated(step), True, True), name, True)

    def _jit(self, fn: Callable, donate: bool, repeated: bool) -> Any:
        donate_argnums = (0,) if donate else ()
        if self.mode == "single":
            return jax.jit(fn, donate_argnums=donate_argnums)
        if self.mode == "jit":
            return jax.jit(
                fn,
                in_shardings=(
                    (self.replicated, self.stacked, self.replicated)
                    if repeated
                    else (self.replicated, self.sharded)
                ),
                out_shardings=self.replicated,
                donate_argnums=donate_argnums,
            )
        return jax.pmap(fn, axis_name=AXIS, donate_argnums=donate_argnums)

    def background(self) -> concurrent.futures.ThreadPoolExecutor:
        """The one thread that compiles programs ahead of their first call, one at a time
        (a compile holds about one core and a few hundred MB for a BERT-base step)."""
        if self._background is None:
            self._background = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="compile-ahead"
            )
        return self._background

    def stop_background(self) -> None:
        """Drops the compiles not yet started and waits for the running one (at most one)."""
        if self._background is not None:
            self._background.shutdown(wait=True, cancel_futures=True)
            self._background = None

    def put_state(self, state: Any) -> Any:
        """A device copy of `state` that steps can donate: the caller's arrays stay valid,
        and every buffer is one XLA allocated (a compiled copy). A buffer placed from host
        memory (on CPU, e.g. a numpy view of another device buffer) may alias that memory,
        and XLA cannot donate it: every step would then allocate its outputs anew (1.3 GB
        more at peak for BERT-base fine-tuning)."""
        copy = functools.partial(jax.tree_util.tree_map, jnp.copy)
        if self.mode == "pmap":  # a leading device axis, one copy per device
            n = jax.local_device_count()
            host = jax.tree_util.tree_map(np.asarray, jax.device_get(state))
            stacked = jax.tree_util.tree_map(lambda x: np.broadcast_to(x, (n, *np.shape(x))), host)
            return jax.pmap(copy)(jax.device_put(stacked, self.sharded))
        target = SingleDeviceSharding(self.devices[0]) if self.mode == "single" else self.replicated
        return jax.jit(copy, out_shardings=target)(jax.device_put(state, target))

    def get_state(self, state: Any) -> Any:
        """The state as one (host-fetchable) copy."""
        if self.mode == "pmap":
            return jax.tree_util.tree_map(lambda x: x[0], state)
        return state

    def put_batch(self, batch: dict[str, np.ndarray]) -> Any:
        return self._place_rows(batch, 0)

    def put_batches(self, batches: list[dict[str, np.ndarray]], slots: int) -> tuple[Any, Any]:
        """(stacked batches, count) for a `compile_repeated` step: the batches stacked along a
        new leading axis of `slots` entries (padded with copies of the last, never run)."""
        return self._put_stacked(batches, slots)

    def batch_specs(self, batches: list[dict[str, np.ndarray]], slots: int) -> tuple[Any, Any]:
        """What `put_batches` would place, as shapes, dtypes and shardings (`ahead`'s)."""
        return jax.tree_util.tree_map(abstract, self._put_stacked(batches, slots))

    def _put_stacked(self, batches: list[dict[str, np.ndarray]], slots: int) -> tuple[Any, Any]:
        if not 0 < len(batches) <= slots:
            raise ValueError(f"{len(batches)} batches for {slots} slots")
        padded = batches + [batches[-1]] * (slots - len(batches))
        stacked = {k: np.stack([b[k] for b in padded]) for k in batches[0]}
        rows, count = self._place_rows(stacked, 1), np.int32(len(batches))
        if self.mode == "pmap":  # one count per device
            return rows, jax.device_put(np.full(jax.local_device_count(), count), self.sharded)
        target = self.devices[0] if self.mode == "single" else self.replicated
        return rows, jax.device_put(count, target)

    def _place_rows(self, arrays: dict[str, np.ndarray], axis: int) -> Any:
        """Host arrays on the devices, split across them along their batch-row `axis` (jit:
        sharded along it; pmap: a leading device axis, rows split per device)."""
        if self.mode == "single":
            return jax.device_put(arrays, self.devices[0])
        if self.mode == "jit":
            sharding = self.sharded if axis == 0 else self.stacked
            return {
                k: jax.make_array_from_process_local_data(sharding, v) for k, v in arrays.items()
            }
        n = jax.local_device_count()
        shards = {
            k: np.moveaxis(v.reshape(*v.shape[:axis], n, -1, *v.shape[axis + 1 :]), axis, 0)
            for k, v in arrays.items()
        }
        return jax.device_put(shards, self.sharded)

    def gather_rows(self, outputs: Any) -> Any:
        """Per-row outputs of a batch as one [batch, ...] host array (pmap: join devices;
        jit returns them whole to every process)."""
        outputs = jax.device_get(outputs)
        if self.mode == "pmap":
            return jax.tree_util.tree_map(lambda x: x.reshape(-1, *x.shape[2:]), outputs)
        return outputs

    def get_metrics(self, metrics: Any) -> Any:
        """Per-step metrics on one device (pmap returns one identical copy per device)."""
        return self.get_state(metrics)


def abstract(x: Any) -> jax.ShapeDtypeStruct:
    """A placed array's shape, dtype, sharding and weak type (what a program is compiled for)."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding, weak_type=x.aval.weak_type)


class CompiledStep:
    """A step compiled once per batch shape: at its first call, or before it in the
    runner's background thread (`ahead`), so that a later length bucket's compile overlaps
    training on the earlier ones instead of stopping it."""

    def __init__(self, runner: Runner, jitted: Any, name: str, repeated: bool) -> None:
        self.runner, self.jitted, self.name, self.repeated = runner, jitted, name, repeated
        self.executables: dict[tuple, Any] = {}  # batch shape -> executable, or its Future

    def __call__(self, state: Any, batch: Any, *rest: Any) -> Any:
        shape = tuple(batch["input_ids"].shape)
        executable = self.executables.get(shape)
        if isinstance(executable, concurrent.futures.Future) and executable.cancelled():
            executable = None  # dropped by stop_background before it started
        if isinstance(executable, concurrent.futures.Future):
            began = time.perf_counter()
            executable = self.executables[shape] = executable.result()
            waited = time.perf_counter() - began
            self.runner.compile_seconds += waited
            if waited >= 0.1:
                log.info("waited %.1f s for %s's batch shape %s to finish compiling",
                         waited, self.name, shape)  # fmt: skip
        elif executable is None:
            executable = self._compile(shape, False, state, batch, *rest)
        return executable(state, batch, *rest)

    def ahead(self, state: Any, batch: Any, *rest: Any) -> None:
        """Starts compiling for these arguments (placed as the call will place them, or
        `Runner.batch_specs`) in the background, unless their shape has its program or
        the runner compiles nothing ahead (`compile_ahead` off, or pmap). Only shapes and
        shardings are read here: `state` may be donated right after."""
        shape = tuple(batch["input_ids"].shape)
        if shape in self.executables or not self.runner.compile_ahead:
            return
        specs = jax.tree_util.tree_map(abstract, (state, batch, *rest))
        self.executables[shape] = self.runner.background().submit(
            self._compile, shape, True, *specs
        )

    def _compile(self, shape: tuple, background: bool, state: Any, batch: Any, *rest: Any) -> Any:
        count = len(self.executables) + (not background)
        log.info("compiling %s for batch shape %s (compile #%d)", self.name, shape, count)
        # before a big train step's first program, the one-off ones (init, loading) are
        # dropped; its later programs (other buckets) reuse what is cached then
        big = (
            self.repeated
            and not self.executables
            and memory.tree_bytes(state) >= memory.DROP_CACHES_MIN_BYTES
        )
        began = time.perf_counter()
        executable = memory.compiled_ahead(self.jitted, {}, shape, state, batch, *rest,
                                           drop_caches=big)  # fmt: skip
        seconds = time.perf_counter() - began
        if not background:
            self.executables[shape] = executable
            self.runner.compile_seconds += seconds
        log.info("compiled %s for batch shape %s in %.1f s%s", self.name, shape, seconds,
                 " (in the background)" if background else "")  # fmt: skip
        return executable
