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
    """Call `update` every few steps; `close` ends the line."""

    def __init__(self, total: int, start: int, name: str, stream=None) -> None:
        self.total, self.start, self.name = total, start, name
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
        rate = self.examples / elapsed if elapsed > 0 else 0.0
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        shown = " | ".join(f"{k} {v:.4f}" for k, v in values.items())
        line = (
            f"{self.name} step {step}/{self.total} | {shown} | {rate:.1f} ex/s | "
            f"ETA {format_seconds(eta)}"
        )
        end = "\r" if self.tty else "\n"
        self.stream.write(line + end)
        self.stream.flush()
        return line

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
