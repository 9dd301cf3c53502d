"""Small file helpers shared across the library: JSON files whose errors name the file and
line, and directories written beside their destination and swapped in whole."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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


@contextlib.contextmanager
def staged_directory(target: str | Path) -> Iterator[Path]:
    """Yields an empty staging directory beside `target`; when the block succeeds it
    replaces `target` (the old copy is removed only after the move), and when it fails the
    staging directory is removed and `target` stays as it was."""
    target = Path(target).absolute()
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield staging
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            target.rename(old)
        staging.rename(target)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


STAGED = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[0-9a-f]{8}$")


def recover_staged(root: str | Path) -> list[str]:
    """What a killed `staged_directory` left under `root`, put right: a staging copy
    (`.X.tmp-*`) is removed; a previous copy moved aside (`.X.old-*`) is put back when X
    is missing (the kill came between the two renames), else removed. Returns what it did."""
    done = []
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
