"""Flax Linen BERT/RoBERTa encoder whose parameter names map 1:1 to Hugging Face keys.

Scope names mirror transformers' module names (`encoder/layer_3/attention/self/query`),
so `weights.hf_key` converts a parameter path to its checkpoint key mechanically.
The blocks are post-LN, as in BERT; patches plug in through the hooks of `seams.Patch`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftdebias_jax.models.attention import attend
from peftdebias_jax.models.config import EncoderConfig
from peftdebias_jax.models.dropout import Dropout
from peftdebias_jax.models.gelu import exact_gelu
from peftdebias_jax.models.matmul import kernel_matmul
from peftdebias_jax.models.seams import ATTENTION_OUTPUT, FFN_OUTPUT, Patch

Array = jax.Array


def _tanh_gelu(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=True)


# transformers' ACT2FN semantics ("gelu" is the exact erf GELU); adapters use the same names.
ACTIVATIONS = {
    "gelu": exact_gelu,
    "gelu_new": _tanh_gelu,
    "gelu_fast": _tanh_gelu,
    "gelu_pytorch_tanh": _tanh_gelu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
}


def activation(name: str):
    """The activation called `name` (see ACTIVATIONS)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}")
    return ACTIVATIONS[name]


def compute_dtype(config: EncoderConfig):
    return jnp.dtype(config.dtype)


def normal_init(config: EncoderConfig):
    return nn.initializers.normal(stddev=config.initializer_range)


def layer_norm(config: EncoderConfig, name: str) -> nn.LayerNorm:
    # Two-pass variance, as torch computes it, for float parity with transformers.
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps,
        dtype=compute_dtype(config),
        param_dtype=jnp.float32,
        use_fast_variance=False,
        name=name,
    )


class Dense(nn.Module):
    """y = x W + b, plus whatever the patches add at this module path (the LoRA seam)."""

    features: int
    config: EncoderConfig
    hf_path: str
    patches: Sequence[Patch] = ()

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True, states: Sequence = ()) -> Array:
        dtype = compute_dtype(self.config)
        kernel = self.param(
            "kernel", normal_init(self.config), (x.shape[-1], self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        y = kernel_matmul(x.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype)
        for patch, state in zip(self.patches, states, strict=True):
            delta = patch.dense_delta(state, self.hf_path, x, self.features, deterministic)
            if delta is not None:
                y = y + delta.astype(dtype)
        return y


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout; the prompt-tuning seam."""

    config: EncoderConfig
    patches: Sequence[Patch] = ()

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array,
        token_type_ids: Array,
        deterministic: bool,
        states: Sequence = (),
        segment_ids: Array | None = None,
    ) -> tuple[Array, Array, int]:
        cfg = self.config
        dtype = compute_dtype(cfg)
        batch, _ = input_ids.shape
        words = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=normal_init(cfg),
            param_dtype=jnp.float32,
            name="word_embeddings",
        )(input_ids).astype(dtype)
        prompts = [
            p
            for p in (
                patch.extra_embeddings(state, batch, cfg.hidden_size, dtype, deterministic)
                for patch, state in zip(self.patches, states, strict=True)
            )
            if p is not None
        ]
        num_prompt = sum(p.shape[1] for p in prompts)
        if prompts:
            words = jnp.concatenate([*(p.astype(dtype) for p in prompts), words], axis=1)
            ones = jnp.ones((batch, num_prompt), attention_mask.dtype)
            attention_mask = jnp.concatenate([ones, attention_mask], axis=1)
            zeros = jnp.zeros((batch, num_prompt), token_type_ids.dtype)
            token_type_ids = jnp.concatenate([zeros, token_type_ids], axis=1)
        if segment_ids is None:
            position_ids = self.position_ids(input_ids, num_prompt)
        elif num_prompt:
            raise ValueError(
                "prompt tuning cannot run on packed rows (segment_ids): its prompt states would "
                "be shared by every example of a row; batch such a patch without packing"
            )
        else:
            position_ids = self.segment_position_ids(segment_ids)
        positions = nn.Embed(
            cfg.max_position_embeddings,
            cfg.hidden_size,
            embedding_init=normal_init(cfg),
            param_dtype=jnp.float32,
            name="position_embeddings",
        )(position_ids)
        token_types = nn.Embed(
            cfg.type_vocab_size,
            cfg.hidden_size,
            embedding_init=normal_init(cfg),
            param_dtype=jnp.float32,
            name="token_type_embeddings",
        )(token_type_ids)
        x = words + token_types.astype(dtype) + positions.astype(dtype)
        x = layer_norm(cfg, "LayerNorm")(x)
        x = Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
        return x, attention_mask, num_prompt

    def position_ids(self, input_ids: Array, num_prompt: int) -> Array:
        """BERT counts 0, 1, ...; RoBERTa counts from pad_token_id + 1 over non-pad tokens."""
        cfg = self.config
        batch, length = input_ids.shape
        if cfg.model_type == "roberta":
            not_pad = (input_ids != cfg.pad_token_id).astype(jnp.int32)
            real = (jnp.cumsum(not_pad, axis=1) + num_prompt) * not_pad + cfg.pad_token_id
            if num_prompt:
                prompt = jnp.arange(1, num_prompt + 1, dtype=jnp.int32) + cfg.pad_token_id
                real = jnp.concatenate([jnp.broadcast_to(prompt, (batch, num_prompt)), real], 1)
            return real
        return jnp.broadcast_to(
            jnp.arange(length + num_prompt, dtype=jnp.int32), (batch, length + num_prompt)
        )

    def segment_position_ids(self, segment_ids: Array) -> Array:
        """Positions of packed rows: each example counts from its own first token, as it
        would alone in a row (BERT 0, 1, ...; RoBERTa pad_token_id + 1, ...; padding as
        position_ids gives it)."""
        cfg = self.config
        offsets = offsets_in_segment(segment_ids)
        if cfg.model_type == "roberta":
            return jnp.where(segment_ids > 0, offsets + 1, 0) + cfg.pad_token_id
        return offsets


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product attention; LoRA seams on q/k/v, prefix seam on k/v."""

    config: EncoderConfig
    layer_index: int
    patches: Sequence[Patch] = ()

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask_bias: Array,
        deterministic: bool,
        states: Sequence = (),
        rows: Array | None = None,
    ) -> Array:
        """Attended states [B, S, H], or [B, P, H] with queries only at `rows` [B, P]."""
        cfg = self.config
        dtype = compute_dtype(cfg)
        batch = x.shape[0]
        heads, head_dim = cfg.num_attention_heads, cfg.head_dim
        prefix = f"{cfg.base_name}.encoder.layer.{self.layer_index}.attention.self"

        def project(name: str, inputs: Array) -> Array:  # heads-major [B, heads, S, head_dim]
            dense = Dense(cfg.hidden_size, cfg, f"{prefix}.{name}", self.patches, name=name)
            out = dense(inputs, deterministic, states)
            return out.reshape(batch, inputs.shape[1], heads, head_dim).transpose(0, 2, 1, 3)

        queries = x if rows is None else gather_rows(x, rows)
        if rows is not None and mask_bias.shape[2] > 1:  # a bias per query (packed rows)
            mask_bias = jnp.take_along_axis(mask_bias, rows[:, None, :, None], axis=2)
        query, key, value = project("query", queries), project("key", x), project("value", x)
        for patch, state in zip(self.patches, states, strict=True):
            kv = patch.key_value_prefix(
                state, self.layer_index, batch, heads, head_dim, dtype, deterministic
            )
            if kv is None:
                continue
            key = jnp.concatenate([kv[0].astype(dtype).transpose(0, 2, 1, 3), key], axis=2)
            value = jnp.concatenate([kv[1].astype(dtype).transpose(0, 2, 1, 3), value], axis=2)
            open_keys = jnp.zeros((*mask_bias.shape[:-1], kv[0].shape[1]), mask_bias.dtype)
            mask_bias = jnp.concatenate([open_keys, mask_bias], axis=-1)
        keep = Dropout(cfg.attention_probs_dropout_prob).multiplier(
            (batch, heads, query.shape[2], key.shape[2]), dtype, deterministic
        )
        out = attend(query, key, value, mask_bias, keep, 1.0 / math.sqrt(head_dim))
        out = out.transpose(0, 2, 1, 3)
        return out.reshape(batch, queries.shape[1], cfg.hidden_size)


class ResidualOutput(nn.Module):
    """dense -> dropout -> [adapter seam] -> LayerNorm(hidden + residual): BERT's *Output."""

    config: EncoderConfig
    layer_index: int
    slot: str
    hf_path: str
    patches: Sequence[Patch] = ()

    @nn.compact
    def __call__(
        self, hidden: Array, residual: Array, deterministic: bool, states: Sequence = ()
    ) -> Array:
        cfg = self.config
        dense = Dense(cfg.hidden_size, cfg, f"{self.hf_path}.dense", self.patches, name="dense")
        hidden = dense(hidden, deterministic, states)
        hidden = Dropout(cfg.hidden_dropout_prob)(hidden, deterministic=deterministic)
        norm = layer_norm(cfg, "LayerNorm")
        for patch, state in zip(self.patches, states, strict=True):
            hidden = patch.adapt_sublayer(
                state, self.slot, self.layer_index, hidden, residual, norm, deterministic
            )
        return norm(hidden + residual)


class Attention(nn.Module):
    config: EncoderConfig
    layer_index: int
    patches: Sequence[Patch] = ()

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask_bias: Array,
        deterministic: bool,
        states: Sequence = (),
        rows: Array | None = None,
    ) -> Array:
        cfg = self.config
        attended = SelfAttention(cfg, self.layer_index, self.patches, name="self")(
            x, mask_bias, deterministic, states, rows
        )
        path = f"{cfg.base_name}.encoder.layer.{self.layer_index}.attention.output"
        output = ResidualOutput(
            cfg, self.layer_index, ATTENTION_OUTPUT, path, self.patches, name="output"
        )
        residual = x if rows is None else gather_rows(x, rows)
        return output(attended, residual, deterministic, states)


class Layer(nn.Module):
    """One post-LN transformer block: attention sub-layer, then feed-forward sub-layer."""

    config: EncoderConfig
    layer_index: int
    patches: Sequence[Patch] = ()

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask_bias: Array,
        deterministic: bool,
        states: Sequence = (),
        rows: Array | None = None,
    ) -> Array:
        """[B, S, H] -> [B, S, H]; with `rows` [B, P], the block's output at those rows
        only (everything after the attention scores is row-wise, so only the queries and
        the rest of the block shrink; keys and values still cover every position)."""
        cfg = self.config
        x = Attention(cfg, self.layer_index, self.patches, name="attention")(
            x, mask_bias, deterministic, states, rows
        )
        path = f"{cfg.base_name}.encoder.layer.{self.layer_index}"
        hidden = Intermediate(cfg, f"{path}.intermediate", self.patches, name="intermediate")(
            x, deterministic, states
        )
        output = ResidualOutput(
            cfg, self.layer_index, FFN_OUTPUT, f"{path}.output", self.patches, name="output"
        )
        return output(hidden, x, deterministic, states)


class Intermediate(nn.Module):
    """The feed-forward expansion: dense -> activation (transformers' *Intermediate)."""

    config: EncoderConfig
    hf_path: str
    patches: Sequence[Patch] = ()

    @nn.compact
    def __call__(self, x: Array, deterministic: bool, states: Sequence = ()) -> Array:
        cfg = self.config
        dense = Dense(
            cfg.intermediate_size, cfg, f"{self.hf_path}.dense", self.patches, name="dense"
        )
        return activation(cfg.hidden_act)(dense(x, deterministic, states))


class Pooler(nn.Module):
    """tanh(dense(first)): BERT's pooled [CLS] vector from the first token's states [..., H]
    (a LoRA seam, as in peft)."""

    config: EncoderConfig
    patches: Sequence[Patch] = ()

    @nn.compact
    def __call__(self, first: Array, deterministic: bool, states: Sequence = ()) -> Array:
        cfg = self.config
        path = f"{cfg.base_name}.pooler.dense"
        dense = Dense(cfg.hidden_size, cfg, path, self.patches, name="dense")
        return jnp.tanh(dense(first, deterministic, states))


class Encoder(nn.Module):
    """Embeddings + transformer stack (+ optional pooler); returns states at real positions."""

    config: EncoderConfig
    add_pooling_layer: bool = False
    patches: Sequence[Patch] = ()

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        deterministic: bool = True,
        output_positions: Array | None = None,
        segment_ids: Array | None = None,
    ) -> tuple[Array, Array | None]:
        """States [B, S, H] at the real positions, or [B, P, H] at `output_positions`
        [B, P] only: then the last block runs on those P rows (a head that reads a few
        positions, e.g. [CLS] or the masked tokens, skips most of the last block's work).
        `segment_ids` [B, S] (packed rows: 1, 2, ... per example, 0 for padding): each
        example sees only itself, as if alone in a row (`data.packing`); the pooled output
        is then one per `output_positions` entry (each example's first token), or None
        without them."""
        cfg = self.config
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        batch = input_ids.shape[0]
        states = tuple(p.setup_state(cfg, batch, deterministic) for p in self.patches)
        x, attention_mask, num_prompt = Embeddings(cfg, self.patches, name="embeddings")(
            input_ids, attention_mask, token_type_ids, deterministic, states, segment_ids
        )
        if segment_ids is None:
            mask_bias = additive_mask(attention_mask)
        else:
            mask_bias = segment_mask(segment_ids)
        stack = EncoderStack(cfg, self.patches, name="encoder")
        rows = None if output_positions is None else output_positions + num_prompt
        x = stack(x, mask_bias, deterministic, states, rows)
        if rows is None:
            x = x[:, num_prompt:]
        pooled = None
        if self.add_pooling_layer and (segment_ids is None or rows is not None):
            first = x if segment_ids is not None else x[:, 0]
            pooled = Pooler(cfg, self.patches, name="pooler")(first, deterministic, states)
        return x, pooled


class EncoderStack(nn.Module):
    config: EncoderConfig
    patches: Sequence[Patch] = ()

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask_bias: Array,
        deterministic: bool,
        states: Sequence = (),
        rows: Array | None = None,
    ) -> Array:
        """[B, S, H], or [B, P, H] at `rows` [B, P] (the last block runs on those rows)."""
        count = self.config.num_hidden_layers
        if rows is not None and count == 0:
            return gather_rows(x, rows)
        for i in range(count):
            layer = Layer(self.config, i, self.patches, name=f"layer_{i}")
            x = layer(x, mask_bias, deterministic, states, rows if i == count - 1 else None)
        return x


def gather_rows(x: Array, rows: Array) -> Array:
    """x [B, S, H] at rows [B, P] -> [B, P, H]."""
    return jnp.take_along_axis(x, rows[..., None], axis=1)


def additive_mask(attention_mask: Array) -> Array:
    """[B, S] 1/0 mask -> [B, 1, 1, S] float32 bias: 0 where attended, dtype-min where not."""
    keep = attention_mask[:, None, None, :].astype(bool)
    return jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def segment_mask(segment_ids: Array) -> Array:
    """[B, S] segment ids (0 = padding) -> [B, 1, S, S] float32 bias: each query attends to
    the keys of its own segment only (a padding query to none: its output is unused)."""
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    keep = same & (segment_ids[:, None, None, :] > 0)
    return jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def offsets_in_segment(segment_ids: Array) -> Array:
    """[B, S] segment ids -> each token's offset from the first token of its run of equal
    ids (segments are contiguous)."""
    index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    changed = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1
    )
    starts = jax.lax.cummax(jnp.where(changed, index, 0), axis=1)
    return index - starts
