"""Bottleneck adapters with the `adapters` library's semantics.

seq_bn (Pfeiffer et al. 2021), one adapter after each FFN output, the block's own
LayerNorm applied before and after (METHOD.md §3.4.1):
    u = LN(h + x);  y = LN(up(relu(down(u))) + h + x)
double_seq_bn (Houlsby et al. 2019), after the attention output and the FFN output:
    y = LN(up(swish(down(h))) + h + x)
Weights init N(0, 0.02) and biases 0 ("bert"); "mam_adapter" zero-initialises `up`, which
makes a fresh adapter the identity.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax

from peftdebias_jax.models.dropout import Dropout
from peftdebias_jax.models.encoder import ACTIVATIONS
from peftdebias_jax.models.matmul import kernel_dot_general
from peftdebias_jax.models.seams import ATTENTION_OUTPUT, FFN_OUTPUT, Patch
from peftdebias_jax.peft.initializers import torch_linear_kernel


class Bottleneck(nn.Module):
    """down -> activation -> up, scaled; params `down/*`, `up/*`."""

    bottleneck: int
    non_linearity: str
    init_weights: str
    scaling: float
    dropout: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        hidden = x.shape[-1]
        if self.init_weights == "bert":
            down_init = up_init = nn.initializers.normal(0.02)
        elif self.init_weights == "mam_adapter":
            down_init = torch_linear_kernel()
            up_init = nn.initializers.zeros
        else:
            raise ValueError(
                f"init_weights must be 'bert' or 'mam_adapter', got {self.init_weights!r}"
            )
        down = nn.Dense(
            self.bottleneck, dtype=x.dtype, kernel_init=down_init,
            dot_general=kernel_dot_general, name="down",
        )(x)  # fmt: skip
        down = ACTIVATIONS[self.non_linearity](down)
        up = nn.Dense(
            hidden, dtype=x.dtype, kernel_init=up_init, dot_general=kernel_dot_general, name="up"
        )(down)
        up = up * self.scaling
        return Dropout(self.dropout)(up, deterministic=deterministic)


@dataclasses.dataclass(frozen=True)
class SeqBn(Patch):
    """Sequential bottleneck adapter (`seq_bn`, alias `pfeiffer`)."""

    name: str = "adapter"
    reduction_factor: float = 16
    non_linearity: str = "relu"
    original_ln_before: bool = True
    mh_adapter: bool = False
    output_adapter: bool = True
    init_weights: str = "bert"
    scaling: float = 1.0
    dropout: float = 0.0

    method = "seq_bn"
    kind = "adapter"

    def __post_init__(self) -> None:
        if not self.reduction_factor > 0:
            raise ValueError(f"reduction_factor must be > 0, got {self.reduction_factor!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(
                f"non_linearity {self.non_linearity!r} is not one of {sorted(ACTIVATIONS)}"
            )

    def bottleneck_size(self, hidden_size: int) -> int:
        return max(1, int(hidden_size // self.reduction_factor))

    def adapt_sublayer(self, state, slot, layer_index, hidden, residual, layer_norm, deterministic):
        wanted = (slot == ATTENTION_OUTPUT and self.mh_adapter) or (
            slot == FFN_OUTPUT and self.output_adapter
        )
        if not wanted:
            return hidden
        inputs = layer_norm(hidden + residual) if self.original_ln_before else hidden
        adapter = Bottleneck(
            self.bottleneck_size(hidden.shape[-1]),
            self.non_linearity,
            self.init_weights,
            self.scaling,
            self.dropout,
            name=self.scope,
        )
        return hidden + adapter(inputs, deterministic)


@dataclasses.dataclass(frozen=True)
class DoubleSeqBn(SeqBn):
    """Houlsby adapter (`double_seq_bn`, alias `houlsby`): after attention and after the FFN."""

    name: str = "adapter"
    non_linearity: str = "swish"
    original_ln_before: bool = False
    mh_adapter: bool = True

    method = "double_seq_bn"
