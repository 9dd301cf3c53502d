"""Prefix tuning (Li & Liang 2021) with the `adapters` library's layout.

Per layer l, `prefix_length` key and value vectors are concatenated before the real keys
and values and always attended. The flat variant trains them directly (one tensor
[P, 2L, heads, head_dim] ~ N(0, 1); slot 2l is layer l's keys, 2l+1 its values); the
reparameterised variant computes them as MLP(wte(0..P-1)) with a `bottleneck_size` hidden
layer. Parameters sit under `<base>/prefix_<name>/`, computed once per forward pass.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftdebias_jax.models.dropout import Dropout
from peftdebias_jax.models.encoder import ACTIVATIONS
from peftdebias_jax.models.seams import Patch
from peftdebias_jax.peft.initializers import torch_linear_bias, torch_linear_kernel


class PrefixStates(nn.Module):
    """All layers' prefix keys/values [P, 2L, heads, head_dim] (flat or via the MLP)."""

    prefix_length: int
    num_layers: int
    num_heads: int
    head_dim: int
    flat: bool
    bottleneck_size: int
    non_linearity: str

    @nn.compact
    def __call__(self) -> jax.Array:
        shape = (self.prefix_length, 2 * self.num_layers, self.num_heads, self.head_dim)
        if self.flat:
            return self.param("control_trans", nn.initializers.normal(1.0), shape, jnp.float32)
        hidden = self.num_heads * self.head_dim
        wte = nn.Embed(
            self.prefix_length, hidden, embedding_init=nn.initializers.normal(1.0), name="wte"
        )(jnp.arange(self.prefix_length))
        h = nn.Dense(
            self.bottleneck_size,
            kernel_init=torch_linear_kernel(),
            bias_init=torch_linear_bias(hidden),
            name="control_trans_0",
        )(wte)
        h = ACTIVATIONS[self.non_linearity](h)
        out = nn.Dense(
            2 * self.num_layers * hidden,
            kernel_init=torch_linear_kernel(),
            bias_init=torch_linear_bias(self.bottleneck_size),
            name="control_trans_2",
        )(h)
        return out.reshape(shape)


@dataclasses.dataclass(frozen=True)
class PrefixTuning(Patch):
    """`prefix_tuning` (alias `prefix_tuning_flat` sets flat=True)."""

    name: str = "prefix"
    prefix_length: int = 30
    flat: bool = False
    bottleneck_size: int = 512
    non_linearity: str = "tanh"
    dropout: float = 0.0

    method = "prefix_tuning"
    kind = "prefix"

    def setup_state(self, config, batch_size, deterministic):
        states = PrefixStates(
            self.prefix_length,
            config.num_hidden_layers,
            config.num_attention_heads,
            config.head_dim,
            self.flat,
            self.bottleneck_size,
            self.non_linearity,
            name=self.scope,
        )
        return states()

    def key_value_prefix(
        self, state, layer_index, batch_size, num_heads, head_dim, dtype, deterministic
    ):
        shape = (batch_size, self.prefix_length, num_heads, head_dim)
        keys = jnp.broadcast_to(state[:, 2 * layer_index].astype(dtype), shape)
        values = jnp.broadcast_to(state[:, 2 * layer_index + 1].astype(dtype), shape)
        drop = Dropout(self.dropout)
        return drop(keys, deterministic=deterministic), drop(values, deterministic=deterministic)
