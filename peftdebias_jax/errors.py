"""Exceptions with messages that name the file, field or key at fault."""


class PeftDebiasError(Exception):
    """Base class of the library's errors."""


class ConfigError(PeftDebiasError, ValueError):
    """A config (config.json or an ml_collections config) is missing a field or has a bad one."""


class CheckpointError(PeftDebiasError, ValueError):
    """A weights file is unreadable, truncated, or disagrees with the model it should fill."""


def headline(err: BaseException, limit: int | None = None) -> str:
    """ "TypeName: the first line of its message" (at most `limit` characters of it): how a
    one-line report names an error from a library."""
    lines = str(err).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(err).__name__}: {first[:limit] if limit else first}"
