"""PatchConfig: a patch method and its hyper-parameters, with the PEFT libraries' names.

    PatchConfig("lora", r=8, alpha=16, target_modules=["query", "value"])
    PatchConfig("seq_bn", reduction_factor=16)       # alias "pfeiffer"
    PatchConfig("double_seq_bn")                     # alias "houlsby"
    PatchConfig("prefix_tuning", flat=True)          # alias "prefix_tuning_flat"
    PatchConfig("prompt_tuning", prompt_length=10)

`build(name)` makes the Flax patch whose leaves live under scopes named after `name`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from peftdebias_jax.errors import ConfigError
from peftdebias_jax.models.seams import Patch
from peftdebias_jax.peft.adapter import DoubleSeqBn, SeqBn
from peftdebias_jax.peft.lora import LoRA
from peftdebias_jax.peft.prefix import PrefixTuning
from peftdebias_jax.peft.prompt import PromptTuning

METHODS: dict[str, type[Patch]] = {
    "lora": LoRA,
    "seq_bn": SeqBn,
    "double_seq_bn": DoubleSeqBn,
    "prefix_tuning": PrefixTuning,
    "prompt_tuning": PromptTuning,
}
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "pfeiffer": ("seq_bn", {}),
    "houlsby": ("double_seq_bn", {}),
    "prefix_tuning_flat": ("prefix_tuning", {"flat": True}),
}


def hyperparameter_names(method: str) -> list[str]:
    return [f.name for f in dataclasses.fields(METHODS[method]) if f.name != "name"]


class PatchConfig:
    """Method + hyper-parameters of one patch; validated against the method's fields."""

    def __init__(self, method: str, **hparams: Any) -> None:
        canonical, implied = ALIASES.get(method, (method, {}))
        if canonical not in METHODS:
            known = sorted([*METHODS, *ALIASES])
            raise ConfigError(f"unknown patch method {method!r}; expected one of {known}")
        valid = hyperparameter_names(canonical)
        unknown = sorted(set(hparams) - set(valid))
        if unknown:
            raise ConfigError(
                f"patch method {method!r} has no hyper-parameter {unknown[0]!r}; "
                f"its hyper-parameters are {valid}"
            )
        merged = {**implied, **hparams}
        self.method = canonical
        self.hparams = {k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()}
        self.build("check")  # validates values now, not at first use

    def build(self, name: str) -> Patch:
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"patch name {name!r} must be letters, digits, '_' or '-'")
        try:
            return METHODS[self.method](name=name, **self.hparams)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"patch method {self.method!r}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """Method and every hyper-parameter (defaults filled in), JSON-ready."""
        patch = self.build("check")
        values = {k: getattr(patch, k) for k in hyperparameter_names(self.method)}
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        return {"method": self.method, **values}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PatchConfig:
        raw = dict(raw)
        if "method" not in raw:
            raise ConfigError(f"patch config {raw} has no 'method'")
        raw.pop("name", None)
        return cls(raw.pop("method"), **raw)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PatchConfig) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(repr(self))

    def __repr__(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.hparams.items())
        return f"PatchConfig({self.method!r}{args})"
