"""Several processes as one run (TPU pod slices, GPU clusters): start-up before any other
JAX call, process 0 as the one writer of files, and barriers after what it writes.

Every process runs the same program on its own rows of each batch; the state is
replicated, so each holds every number. Only process 0 touches the shared workdir; the
others wait at `sync` until what they will read next is on disk. With one process every
helper here is a no-op.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from peftdebias_jax.errors import ConfigError

log = logging.getLogger(__name__)
SETTINGS_KEY = "config.parallel"


class StartupError(ConfigError):
    """The processes of a distributed run could not find each other (nothing ran yet)."""


def cluster_arguments(settings: Any) -> dict[str, Any]:
    """`jax.distributed.initialize` arguments from config.parallel: the explicit ones set
    (coordinator_address, num_processes, process_id), the rest left to JAX's detection of
    TPU, SLURM or Open MPI clusters; checked for consistency first."""
    address = str(settings.coordinator_address or "")
    count, index = int(settings.num_processes), int(settings.process_id)
    given = {"coordinator_address": address or None}
    if count:
        given["num_processes"] = count
    if index >= 0:
        given["process_id"] = index
    if address and (":" not in address or not address.rpartition(":")[2].isdigit()):
        raise ConfigError(
            f"{SETTINGS_KEY}.coordinator_address={address!r}: expected host:port, "
            "e.g. 10.0.0.1:1234 (process 0's machine)"
        )
    if count < 0 or (count and not 0 <= index < count) or (index >= 0 and not count):
        raise ConfigError(
            f"{SETTINGS_KEY}.num_processes={count}, process_id={index}: give both, with "
            "0 <= process_id < num_processes, or neither (detected from the cluster)"
        )
    if (count or index >= 0) and not address:
        raise ConfigError(
            f"{SETTINGS_KEY}.num_processes / process_id are set but coordinator_address is "
            "not: give process 0's host:port too"
        )
    return {k: v for k, v in given.items() if v is not None}


def check_coordinator(address: str, process_id: int, timeout: float) -> None:
    """A wrong or unreachable coordinator as one message within `timeout` seconds (JAX
    itself aborts the process with a C++ stack trace): process 0 must be able to listen
    on the address, every other process must reach it."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if process_id == 0:
        try:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
                s.bind((host, int(port)))
        except OSError as err:
            raise StartupError(
                f"{SETTINGS_KEY}.coordinator_address={address}: process 0 runs the "
                f"coordinator there but cannot listen on it ({err.strerror or err}); give "
                "an address of process 0's machine and a free port"
            ) from None
        return
    deadline = time.monotonic() + timeout
    while True:  # process 0 may start later than this one
        try:
            socket.create_connection((host, int(port)), timeout=timeout).close()
            return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise StartupError(
                    f"{SETTINGS_KEY}.coordinator_address={address}: process {process_id} "
                    f"could not reach the coordinator within {timeout:g} s "
                    f"({err.strerror or err}); start process 0 with the same address, or "
                    "fix the address or port"
                ) from None
            time.sleep(0.25)


def start(settings: Any) -> None:
    """Joins the processes of a distributed run (`settings.distributed`); must come
    before any other JAX call, and does nothing when already joined or not asked."""
    if not settings.distributed or jax.distributed.is_initialized():
        return
    arguments = cluster_arguments(settings)
    timeout = int(settings.startup_timeout)
    if timeout <= 0:
        raise ConfigError(f"{SETTINGS_KEY}.startup_timeout must be > 0 seconds, got {timeout}")
    if "process_id" in arguments:
        check_coordinator(arguments["coordinator_address"], arguments["process_id"], timeout)
    # processes on CPUs exchange their parts of a batch through gloo
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    log.info(
        "joining the distributed run (%s); waiting up to %d s", arguments or "detected", timeout
    )
    try:
        jax.distributed.initialize(**arguments, initialization_timeout=timeout)
    except RuntimeError as err:
        if "before any JAX" in str(err) or "must be called before" in str(err):
            raise StartupError(
                f"{SETTINGS_KEY}.distributed: JAX was already in use, so the processes can "
                "no longer join; start the run with it (run.py does) before other JAX calls"
            ) from None
        raise StartupError(f"{SETTINGS_KEY}: the processes did not join ({err})") from None
    except ValueError as err:
        raise StartupError(
            f"{SETTINGS_KEY}: no cluster detected and none given ({err}); set "
            f"{SETTINGS_KEY}.coordinator_address, num_processes and process_id"
        ) from None
    log.info("process %d of %d, %d devices", jax.process_index(), jax.process_count(),
             jax.device_count())  # fmt: skip


def count() -> int:
    return jax.process_count()


def is_writer() -> bool:
    """Whether this process writes files (process 0; the only one of a one-process run)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Every process waits here until all reach the same `name` (process 0's writes
    before it are then on disk for the others to read)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def same_everywhere(value: Any) -> Any:
    """Process 0's `value` (a number or array) on every process."""
    if jax.process_count() == 1:
        return value
    return multihost_utils.broadcast_one_to_all(np.asarray(value))


def largest(value: int) -> int:
    """The largest of every process's `value`."""
    if jax.process_count() == 1:
        return value
    return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def share(total: int) -> slice:
    """This process's contiguous part of `total` rows scored apart from the others (equal
    parts of ceil(total / processes), the last ones shorter); `joined` puts them together."""
    per = -(-total // jax.process_count())
    start = min(total, jax.process_index() * per)
    return slice(start, min(total, start + per))


def joined(local: np.ndarray, total: int) -> np.ndarray:
    """Every process's `share` of `total` rows, in order, on every process."""
    if jax.process_count() == 1:
        return local
    per = -(-total // jax.process_count())
    padded = np.zeros((per, *local.shape[1:]), local.dtype)
    padded[: len(local)] = local
    return np.asarray(multihost_utils.process_allgather(padded, tiled=True))[:total]
