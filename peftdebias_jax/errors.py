"""Exceptions with messages that name the file, field or key at fault."""


class PeftDebiasError(Exception):
    """Base class of the library's errors."""


class ConfigError(PeftDebiasError, ValueError):
    """A config (config.json or an ml_collections config) is missing a field or has a bad one."""


class CheckpointError(PeftDebiasError, ValueError):
    """A weights file is unreadable, truncated, or disagrees with the model it should fill."""
