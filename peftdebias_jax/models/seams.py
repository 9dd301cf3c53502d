"""The seams where debias patches plug into the encoder.

A patch is an object with a `name` and any of the hook methods below. The encoder calls
each hook from inside the Flax module that owns the seam, so a hook may create parameters
(`nn.Dense(..., name=f"lora_{self.name}")`), which then live under that module's scope.
`setup_state` runs once per forward pass in the encoder's scope (for parameters shared by
all layers, e.g. a prefix MLP); what it returns is handed to every other hook as `state`.
Every default is the identity, so a model without patches computes exactly the plain encoder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    import jax

    from peftdebias_jax.models.config import EncoderConfig

    Array = jax.Array

# The two residual sub-layers of a transformer block where adapters sit.
ATTENTION_OUTPUT = "attention_output"  # after the attention output projection
FFN_OUTPUT = "output"  # after the feed-forward output projection


# The kinds of scope that hold patch leaves ("<kind>_<name>", e.g. "lora_race"): a subclass
# names its kind, and one regex over these kinds selects every leaf of one patch.
PATCH_KINDS = ("lora", "adapter", "prefix", "prompt", "patch")


class Patch:
    """Base class of a named patch: every hook is a no-op until a subclass overrides it."""

    name: str = "patch"
    method: str = "custom"
    kind: str = "patch"  # one of PATCH_KINDS: the scope's prefix

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind not in PATCH_KINDS:
            raise TypeError(f"{cls.__name__}.kind={cls.kind!r} is not one of {PATCH_KINDS}")

    @property
    def scope(self) -> str:
        """The Flax scope name that holds this patch's leaves (e.g. "lora_race")."""
        return f"{self.kind}_{self.name}"

    def setup_state(self, config: EncoderConfig, batch_size: int, deterministic: bool) -> Any:
        """Called once per forward pass in the encoder scope; the result reaches every hook."""
        return None

    def extra_embeddings(
        self, state: Any, batch_size: int, hidden_size: int, dtype: Any, deterministic: bool
    ) -> Array | None:
        """Embeddings [B, P, H] prepended to the word embeddings (prompt tuning), or None."""
        return None

    def dense_delta(
        self, state: Any, path: str, x: Array, features: int, deterministic: bool
    ) -> Array | None:
        """A term added to the output of the dense layer at `path` (LoRA), or None.

        `path` is the Hugging Face module name, e.g. "bert.encoder.layer.3.attention.self.query".
        """
        return None

    def key_value_prefix(
        self,
        state: Any,
        layer_index: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        dtype: Any,
        deterministic: bool,
    ) -> tuple[Array, Array] | None:
        """Keys and values [B, P, heads, head_dim] attended before the real tokens, or None."""
        return None

    def adapt_sublayer(
        self,
        state: Any,
        slot: str,
        layer_index: int,
        hidden: Array,
        residual: Array,
        layer_norm: Callable[[Array], Array],
        deterministic: bool,
    ) -> Array:
        """Rewrites a sub-layer's output `hidden` before the block computes
        `layer_norm(hidden + residual)` (bottleneck adapters). `slot` is ATTENTION_OUTPUT or
        FFN_OUTPUT. Patches apply in order, which is the `adapters` library's Stack."""
        return hidden
