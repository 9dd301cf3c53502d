"""A progress line: step, loss, examples/s and ETA (redrawn in place on a terminal)."""

from __future__ import annotations

import sys
import time


def format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}"


class Progress:
    """Call `update` every few steps; `close` ends the line. `quiet`: compute, draw nothing
    (the processes of a distributed run other than process 0)."""

    def __init__(self, total: int, start: int, name: str, stream=None, quiet: bool = False) -> None:
        self.total, self.start, self.name, self.quiet = total, start, name, quiet
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.began: float | None = None  # set at the first update: compiling is not counted
        self.first_step = start
        self.examples = 0

    def update(self, step: int, examples: int, **values: float) -> str:
        now = time.perf_counter()
        if self.began is None:
            self.began, self.first_step = now, step
        else:
            self.examples += examples
        elapsed = now - self.began
        done = step - self.first_step
        shown = " | ".join(f"{k} {v:.4f}" for k, v in values.items())
        # the first update only starts the clock (its interval includes compiling)
        measured = self.examples and elapsed > 0
        speed = f"{self.examples / elapsed:.1f} ex/s" if measured else "-- ex/s"
        eta = format_seconds(elapsed / done * (self.total - step)) if done > 0 else "--"
        line = f"{self.name} step {step}/{self.total} | {shown} | {speed} | ETA {eta}"
        if not self.quiet:
            self.stream.write(line + ("\r" if self.tty else "\n"))
            self.stream.flush()
        return line

    def close(self) -> None:
        if self.tty and not self.quiet:
            self.stream.write("\n")
            self.stream.flush()
