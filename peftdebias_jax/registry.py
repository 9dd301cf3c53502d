"""Named plug-ins of one kind (trainable sets, bias scores, neutralizers, groupings): a
fork adds one by writing one function and registering it under a name its config uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from peftdebias_jax.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])


class Registry(dict[str, Callable[..., Any]]):
    """{name: function}; `key` is the config key that names one and `where` the registry's
    import path (both for errors)."""

    def __init__(self, what: str, key: str, where: str) -> None:
        super().__init__()
        self.what, self.key, self.where = what, key, where

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: `@REGISTRY.register("name")` over the plug-in function."""

        def add(function: F) -> F:
            if name in self:
                raise ValueError(f"{self.what} {name!r} is registered already")
            self[name] = function
            return function

        return add

    def lookup(self, name: str) -> Callable[..., Any]:
        """The function registered as `name`; an unknown name lists the known ones."""
        if name not in self:
            raise ConfigError(
                f"{self.key}={name!r}: unknown {self.what}; the known ones are {sorted(self)} "
                f"(add one with @{self.where}.register({name!r}))"
            )
        return self[name]
