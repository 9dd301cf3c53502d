"""Task heads with transformers' names: masked LM (BERT `cls`, RoBERTa `lm_head`) and
RoBERTa's classification head (BERT's is the pooler + one `classifier` Dense, in model.py)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftdebias_jax.models.config import EncoderConfig
from peftdebias_jax.models.dropout import Dropout
from peftdebias_jax.models.encoder import Dense, activation, compute_dtype, layer_norm
from peftdebias_jax.models.matmul import bias_add

Array = jax.Array


def decode(module: nn.Module, hidden: Array, word_embeddings: Array) -> Array:
    """hidden -> vocabulary logits, with params `bias` (tied) or `decoder/{kernel,bias}`
    (untied) created on `module`, so they sit where transformers keeps them."""
    cfg: EncoderConfig = module.config
    dtype = compute_dtype(cfg)
    if cfg.tie_word_embeddings:
        kernel = word_embeddings.T
        bias = module.param("bias", nn.initializers.zeros, (cfg.vocab_size,), jnp.float32)
    else:  # transformers then uses decoder.weight and decoder.bias (not predictions.bias)
        init = nn.initializers.normal(cfg.initializer_range)
        shape = (cfg.hidden_size, cfg.vocab_size)
        decoder = module.param(
            "decoder",
            lambda rng: {
                "kernel": init(rng, shape, jnp.float32),
                "bias": jnp.zeros((cfg.vocab_size,), jnp.float32),
            },
        )
        kernel, bias = decoder["kernel"], decoder["bias"]
    return bias_add(jnp.dot(hidden.astype(dtype), kernel.astype(dtype)), bias.astype(dtype))


class BertPredictionHeadTransform(nn.Module):
    config: EncoderConfig

    @nn.compact
    def __call__(self, hidden: Array) -> Array:
        cfg = self.config
        hidden = Dense(cfg.hidden_size, cfg, "cls.predictions.transform.dense", name="dense")(
            hidden
        )
        hidden = activation(cfg.hidden_act)(hidden)
        return layer_norm(cfg, "LayerNorm")(hidden)


class BertLMPredictionHead(nn.Module):
    """transform (dense, act, LayerNorm) -> decoder; params `transform/*`, `bias`."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, hidden: Array, word_embeddings: Array) -> Array:
        hidden = BertPredictionHeadTransform(self.config, name="transform")(hidden)
        return decode(self, hidden, word_embeddings)


class BertOnlyMLMHead(nn.Module):
    """BERT's `cls` scope: `cls/predictions/...`."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, hidden: Array, word_embeddings: Array) -> Array:
        return BertLMPredictionHead(self.config, name="predictions")(hidden, word_embeddings)


class RobertaLMHead(nn.Module):
    """RoBERTa's `lm_head`: dense -> exact GELU -> layer_norm -> decoder (+ bias)."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, hidden: Array, word_embeddings: Array) -> Array:
        cfg = self.config
        hidden = Dense(cfg.hidden_size, cfg, "lm_head.dense", name="dense")(hidden)
        hidden = activation("gelu")(hidden)
        hidden = layer_norm(cfg, "layer_norm")(hidden)
        return decode(self, hidden, word_embeddings)


class RobertaClassificationHead(nn.Module):
    """RoBERTa's `classifier`: dropout -> dense -> tanh -> dropout -> out_proj on the
    states of <s> (the first token) [..., H]."""

    config: EncoderConfig
    num_labels: int

    @nn.compact
    def __call__(self, first: Array, deterministic: bool) -> Array:
        cfg = self.config
        rate = cfg.classifier_dropout
        rate = cfg.hidden_dropout_prob if rate is None else rate
        x = Dropout(rate)(first, deterministic=deterministic)
        x = jnp.tanh(Dense(cfg.hidden_size, cfg, "classifier.dense", name="dense")(x))
        x = Dropout(rate)(x, deterministic=deterministic)
        return Dense(self.num_labels, cfg, "classifier.out_proj", name="out_proj")(x)
