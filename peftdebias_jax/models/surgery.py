"""Model surgery: changes to a model's structure that keep its function."""

from __future__ import annotations

import jax
import numpy as np

from peftdebias_jax.models.model import EncoderModel


def untie_decoder(module: EncoderModel, params: dict) -> tuple[EncoderModel, dict]:
    """The MLM model with its decoder an untied copy of the word embeddings (to be frozen
    while the embeddings train), as the reference's dense CDA training does."""
    if not module.config.tie_word_embeddings:
        return module, params
    untied = module.clone(config=module.config.replace(tie_word_embeddings=False))
    params = jax.tree_util.tree_map(lambda x: x, params)  # a new dict tree
    table = params[module.config.base_name]["embeddings"]["word_embeddings"]["embedding"]
    head = params["lm_head"] if "lm_head" in params else params["cls"]["predictions"]
    head["decoder"] = {"kernel": np.array(table).T.copy(), "bias": head.pop("bias")}
    return untied, params
