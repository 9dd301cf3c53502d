"""SIGINT and SIGTERM (Ctrl-C; how TPU VMs and clusters preempt a job) as a request that
the training loop honours at the end of its current compiled call: it saves a checkpoint
there and raises `Interrupted`, so rerunning the same command resumes bit-identically.
Outside a training loop, or on a second signal, the signal interrupts at once."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from peftdebias_jax import processes
from peftdebias_jax.errors import PeftDebiasError

EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal's number


class Interrupted(PeftDebiasError):
    """Training stopped on a signal after saving a checkpoint at `step`."""

    def __init__(self, phase: str, step: int, signum: int) -> None:
        self.phase, self.step, self.signum = phase, step, signum
        name = signal.Signals(signum).name
        super().__init__(
            f"{name}: {phase} interrupted at step {step} (checkpoint saved); rerun the same "
            "command to resume"
        )

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS.get(self.signum, 130)


class _Requests:
    """The signal received while a training loop was listening, if any."""

    def __init__(self) -> None:
        self.listening = 0
        self.signum: int | None = None

    def handle(self, signum: int, frame) -> None:
        if self.listening and self.signum is None:
            self.signum = signum  # the loop stops at the end of its current call
            return
        raise KeyboardInterrupt(signal.Signals(signum).name)


REQUESTS = _Requests()


def install() -> None:
    """Routes SIGINT and SIGTERM through REQUESTS (from the main thread; a no-op elsewhere,
    where Python cannot set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in EXIT_STATUS:
        signal.signal(signum, REQUESTS.handle)


@contextlib.contextmanager
def listening() -> Iterator[None]:
    """While the block runs, a first signal is only recorded (see `take`); one the block
    left untaken interrupts when it ends."""
    REQUESTS.listening += 1
    try:
        yield
    finally:
        REQUESTS.listening -= 1
    if not REQUESTS.listening and take() is not None:
        raise KeyboardInterrupt("signal received at the end of training")


def take() -> int | None:
    """The signal number a listening loop should stop for (then forgotten), or None. Every
    process of a distributed run gets the same answer (a signal any of them received), so
    all stop after the same step."""
    signum, REQUESTS.signum = REQUESTS.signum, None
    return processes.largest(signum or 0) or None
