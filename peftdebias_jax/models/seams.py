"""The seams where debias patches plug into the encoder.

A patch is an object with a `name` and any of the hook methods below. The encoder calls
each hook from inside the Flax module that owns the seam, so a hook may create parameters
(`nn.Dense(..., name=f"lora_{self.name}")`), which then live under that module's scope.
Every default is the identity, so a model without patches computes exactly the plain encoder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    import jax

    Array = jax.Array

# The two residual sub-layers of a transformer block where adapters sit.
ATTENTION_OUTPUT = "attention_output"  # after the attention output projection
FFN_OUTPUT = "output"  # after the feed-forward output projection


class Patch:
    """Base class of a named patch: every hook is a no-op until a subclass overrides it."""

    name: str = "patch"

    def extra_embeddings(self, batch_size: int, hidden_size: int, dtype: Any) -> Array | None:
        """Embeddings [B, P, H] prepended to the word embeddings (prompt tuning), or None."""
        return None

    def dense_delta(self, path: str, x: Array, features: int, deterministic: bool) -> Array | None:
        """A term added to the output of the dense layer at `path` (LoRA), or None.

        `path` is the Hugging Face module path below the encoder, e.g.
        "encoder.layer.3.attention.self.query".
        """
        return None

    def key_value_prefix(
        self, layer_index: int, batch_size: int, num_heads: int, head_dim: int, dtype: Any
    ) -> tuple[Array, Array] | None:
        """Keys and values [B, P, heads, head_dim] attended before the real tokens, or None."""
        return None

    def adapt_sublayer(
        self,
        slot: str,
        layer_index: int,
        hidden: Array,
        residual: Array,
        layer_norm: Callable[[Array], Array],
        deterministic: bool,
    ) -> Array:
        """Rewrites a sub-layer's output `hidden` before the block computes
        `layer_norm(hidden + residual)` (bottleneck adapters). `slot` is ATTENTION_OUTPUT or
        FFN_OUTPUT."""
        return hidden
