"""LoRA (Hu et al. 2021): y = W x + b + (alpha / r) * B A dropout(x), with A Kaiming-uniform
and B zero, so a fresh patch leaves the model unchanged. Names follow HF peft / adapters."""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftdebias_jax.models.dropout import Dropout
from peftdebias_jax.models.matmul import kernel_matmul
from peftdebias_jax.models.seams import Patch
from peftdebias_jax.peft.initializers import torch_linear_kernel


class LoRADelta(nn.Module):
    """The low-rank update of one dense layer; params `lora_A` [in, r] and `lora_B` [r, out]."""

    r: int
    scaling: float
    dropout: float
    features: int

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        a = self.param("lora_A", torch_linear_kernel(), (x.shape[-1], self.r), jnp.float32)
        b = self.param("lora_B", nn.initializers.zeros, (self.r, self.features), jnp.float32)
        x = Dropout(self.dropout)(x, deterministic=deterministic)
        return kernel_matmul(kernel_matmul(x, a.astype(x.dtype)), b.astype(x.dtype)) * self.scaling


BASE_NAMES = ("bert", "roberta")  # the first part of a module path in a model with a head


@dataclasses.dataclass(frozen=True)
class LoRA(Patch):
    """LoRA on the encoder's dense layers (pooler included) named by `target_modules`.

    A list/tuple holds module-name suffixes ("query" matches "...attention.self.query"); a
    string is a regex that must fully match the Hugging Face module name, with or without
    the base model's prefix (r"bert\\.encoder\\.layer\\.\\d+\\.attention\\.self\\.query" as
    in BertForMaskedLM, or r"encoder\\.layer\\.\\d+\\.attention\\.self\\.query" as in BertModel).
    Head layers (`cls.*`, `classifier*`) are never adapted; peft would also adapt a head
    layer whose name matches, e.g. `cls.predictions.transform.dense` for "dense".
    """

    name: str = "lora"
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ("query", "value")

    method = "lora"
    kind = "lora"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.r < 1:
            raise ValueError(f"LoRA r must be >= 1, got {self.r}")

    def targets(self, path: str) -> bool:
        if isinstance(self.target_modules, str):  # BertModel names lack the "bert." prefix
            bare = path.split(".", 1)[1] if path.split(".", 1)[0] in BASE_NAMES else path
            return any(re.fullmatch(self.target_modules, p) for p in (path, bare))
        return any(path == t or path.endswith("." + t) for t in self.target_modules)

    def dense_delta(self, state, path, x, features, deterministic):
        if not self.targets(path):
            return None
        delta = LoRADelta(self.r, self.alpha / self.r, self.dropout, features, name=self.scope)
        return delta(x, deterministic)
