"""Tiny transformers (PyTorch) models saved to disk: the oracle the Flax encoder must match."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

WORDS = ["the", "nurse", "said", "she", "he", "was", "tired", "doctor", "is", "a", "good", "one"]
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]


def tiny_config(kind: str, **overrides) -> transformers.PretrainedConfig:
    """A small random architecture; initializer_range is large so outputs are far from 0."""
    cls = transformers.BertConfig if kind == "bert" else transformers.RobertaConfig
    fields = dict(
        vocab_size=97,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=40,
        max_position_embeddings=64,
        type_vocab_size=2,
        initializer_range=0.2,
        num_labels=5,
    )
    fields.update(overrides)
    return cls(**fields)


def save_model(model_cls, config, directory: Path, seed: int = 0, **save_kwargs) -> torch.nn.Module:
    """Builds `model_cls(config)` with seeded weights, saves it, returns it in eval mode."""
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases, so every parameter matters
        for name, param in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(directory, **save_kwargs)
    return model


def padded_batch(kind: str, vocab_size: int, length: int = 11, seed: int = 0):
    """Three sequences, two padded, with sentence-pair token types."""
    rng = np.random.default_rng(seed)
    pad = 0 if kind == "bert" else 1
    ids = rng.integers(5, vocab_size, size=(3, length))
    lengths = [length, length - 4, 3]
    mask = np.zeros_like(ids)
    types = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        ids[row, n:] = pad
        types[row, n // 2 : n] = 1
    return ids.astype(np.int32), mask.astype(np.int32), types.astype(np.int32)


def torch_outputs(model, ids, mask, types) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            token_type_ids=torch.tensor(types, dtype=torch.long),
        )
    return {k: v.numpy() for k, v in out.items() if isinstance(v, torch.Tensor)}
