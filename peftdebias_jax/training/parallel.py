"""How a pure step is compiled: one device (`jit`), a device mesh (`jit` with the batch
sharded along "data"), or `pmap`. The step itself never knows; only `pmap` needs it to
sum across devices, which the step builders take as `axis_name`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from peftdebias_jax.errors import ConfigError

log = logging.getLogger(__name__)
MODES = ("auto", "single", "jit", "pmap")
AXIS = "data"


def initialize_distributed(enabled: bool) -> None:
    """Multi-host runs: connect the processes (coordinator from the environment)."""
    if enabled and jax.process_count() == 1:
        jax.distributed.initialize()
        log.info("process %d of %d", jax.process_index(), jax.process_count())


def resolve_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"config.parallel.mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        return "jit" if jax.device_count() > 1 else "single"
    return mode


class Runner:
    """Places state and batches on devices and runs compiled steps; counts compiles."""

    def __init__(self, mode: str, batch_size: int, field: str = "batch_size") -> None:
        self.mode = resolve_mode(mode)
        self.devices = jax.devices()
        count = len(self.devices) if self.mode != "single" else 1
        if batch_size % count:
            raise ConfigError(
                f"{field}={batch_size} must be divisible by the {count} devices of mode "
                f"{self.mode!r}"
            )
        self.batch_size = batch_size
        self.shapes: dict[str, set] = {}
        if self.mode in ("jit", "pmap"):
            devices = self.devices if self.mode == "jit" else jax.local_devices()
            self.mesh = Mesh(np.asarray(devices), (AXIS,))
            self.replicated = NamedSharding(self.mesh, PartitionSpec())
            self.sharded = NamedSharding(self.mesh, PartitionSpec(AXIS))

    @property
    def axis_name(self) -> str | None:
        return AXIS if self.mode == "pmap" else None

    def local_rows(self) -> slice:
        """This process's rows of a global batch (multi-host: each reads its own shard)."""
        per_process = self.batch_size // jax.process_count()
        start = jax.process_index() * per_process
        return slice(start, start + per_process)

    def compile(self, step: Callable, name: str, donate: bool = True) -> Callable:
        """`step(state, batch)` compiled for this mode; logs each new batch shape."""
        donate_argnums = (0,) if donate else ()
        if self.mode == "single":
            compiled = jax.jit(step, donate_argnums=donate_argnums)
        elif self.mode == "jit":
            compiled = jax.jit(
                step,
                in_shardings=(self.replicated, self.sharded),
                out_shardings=self.replicated,
                donate_argnums=donate_argnums,
            )
        else:
            compiled = jax.pmap(step, axis_name=AXIS, donate_argnums=donate_argnums)

        def run(state, batch):
            shape = tuple(batch["input_ids"].shape)
            seen = self.shapes.setdefault(name, set())
            if shape not in seen:
                seen.add(shape)
                log.info("compiling %s for batch shape %s (compile #%d)", name, shape, len(seen))
            return compiled(state, batch)

        return run

    def put_state(self, state: Any) -> Any:
        """A device copy of `state` (steps donate it, so the caller's arrays stay valid)."""
        state = jax.tree_util.tree_map(np.asarray, jax.device_get(state))
        if self.mode == "single":
            return jax.device_put(state, self.devices[0])
        if self.mode == "jit":
            return jax.device_put(state, self.replicated)
        n = jax.local_device_count()  # pmap: a leading device axis, one copy per device
        stacked = jax.tree_util.tree_map(lambda x: np.broadcast_to(x, (n, *np.shape(x))), state)
        return jax.device_put(stacked, self.sharded)

    def get_state(self, state: Any) -> Any:
        """The state as one (host-fetchable) copy."""
        if self.mode == "pmap":
            return jax.tree_util.tree_map(lambda x: x[0], state)
        return state

    def put_batch(self, batch: dict[str, np.ndarray]) -> Any:
        if self.mode == "single":
            return jax.device_put(batch, self.devices[0])
        if self.mode == "jit":
            return {
                k: jax.make_array_from_process_local_data(self.sharded, v) for k, v in batch.items()
            }
        n = jax.local_device_count()
        shards = {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in batch.items()}
        return jax.device_put(shards, self.sharded)

    def gather_rows(self, outputs: Any) -> Any:
        """Per-row outputs of a batch as one [batch, ...] host array (pmap: join devices)."""
        outputs = jax.device_get(outputs)
        if self.mode == "pmap":
            return jax.tree_util.tree_map(lambda x: x.reshape(-1, *x.shape[2:]), outputs)
        return outputs

    def get_metrics(self, metrics: Any) -> Any:
        """Per-step metrics on one device (pmap returns one identical copy per device)."""
        return self.get_state(metrics)
