"""Prompt tuning (Lester et al. 2021): `prompt_length` trainable embeddings prepended to the
input word embeddings; positions count them first, as HF peft does for BERT, and the encoder
returns states at the real positions only. Init U(-0.5, 0.5) as the `adapters` library."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from peftdebias_jax.models.seams import Patch
from peftdebias_jax.peft.initializers import symmetric_uniform


@dataclasses.dataclass(frozen=True)
class PromptTuning(Patch):
    """`prompt_tuning`: soft tokens under `<base>/embeddings/prompt_<name>/embedding`."""

    name: str = "prompt"
    prompt_length: int = 10
    random_uniform_scale: float = 0.5

    method = "prompt_tuning"
    kind = "prompt"

    def extra_embeddings(self, state, batch_size, hidden_size, dtype, deterministic):
        scale = self.random_uniform_scale
        table = nn.Embed(
            self.prompt_length,
            hidden_size,
            embedding_init=symmetric_uniform(scale),
            name=self.scope,
        )(jnp.arange(self.prompt_length))
        return jnp.broadcast_to(table.astype(dtype), (batch_size, *table.shape))
