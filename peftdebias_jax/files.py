"""Small file helpers shared across the library: JSON files whose errors name the file and
line, and directories written beside their destination and swapped in whole. Writes happen
on the writing process only (`processes.is_writer`: process 0 of a distributed run)."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from peftdebias_jax import processes


def read_json(path: str | Path, what: str, error: type[Exception]) -> Any:
    """Parsed JSON of `path`; a missing file or bad JSON raises `error` naming the path
    (and the line and column)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except json.JSONDecodeError as err:
        raise error(
            f"{path}: not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}"
        ) from None


def write_text(path: str | Path, text: str) -> None:
    """`text` as the file `path` (UTF-8), written by the writing process only."""
    if processes.is_writer():
        Path(path).write_text(text, encoding="utf-8")


def write_json(path: str | Path, value: Any, indent: int | None = 2) -> None:
    """`value` as a JSON file (numbers and the like that JSON lacks written as strings)."""
    write_text(path, json.dumps(value, indent=indent, default=str) + "\n")


def exists_for_all(path: str | Path) -> bool:
    """Whether `path` exists as the writing process sees it, the same answer on every
    process (a decision all of them take together, before any writes again)."""
    return bool(processes.same_everywhere(Path(path).exists()))


def make_directory(path: str | Path) -> Path:
    """`path` and its parents, made by the writing process."""
    path = Path(path)
    if processes.is_writer():
        path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def staged_directory(target: str | Path, create: bool = True) -> Iterator[Path]:
    """Yields a staging directory beside `target` (made when `create`; else absent, for a
    writer that makes it); when the block succeeds it replaces `target` (the old copy is
    removed only after the move), and when it fails the staging directory is removed and
    `target` stays as it was. Every process of a distributed run enters it with the same
    staging path (for Orbax's shared saves); process 0 moves the result into place."""
    target = Path(target).absolute()
    tag = int(processes.same_everywhere(uuid.uuid4().int % 2**32))
    staging = target.with_name(f".{target.name}.tmp-{tag:08x}")
    writer = processes.is_writer()
    if writer:
        staging.parent.mkdir(parents=True, exist_ok=True)
        if create:
            staging.mkdir()
    processes.sync(f"staging {target}")
    try:
        yield staging
        processes.sync(f"staged {target}")
        old = None
        if writer and target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            target.rename(old)
        if writer:
            staging.rename(target)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if writer and staging.exists():
            shutil.rmtree(staging)
    processes.sync(f"placed {target}")


STAGED = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[0-9a-f]{8}$")


def recover_staged(root: str | Path) -> list[str]:
    """What a killed `staged_directory` left under `root`, put right: a staging copy
    (`.X.tmp-*`) is removed; a previous copy moved aside (`.X.old-*`) is put back when X
    is missing (the kill came between the two renames), else removed. Returns what it did
    (nothing on a process that does not write)."""
    done = []
    if not processes.is_writer():
        return done
    for path in sorted(Path(root).rglob(".*"), key=lambda p: len(p.parts), reverse=True):
        match = STAGED.match(path.name)
        if match is None or not path.is_dir():
            continue
        target = path.with_name(match["name"])
        if match["kind"] == "old" and not target.exists():
            path.rename(target)
            done.append(f"restored {target}")
        else:
            shutil.rmtree(path)
            done.append(f"removed {path}")
    return done
