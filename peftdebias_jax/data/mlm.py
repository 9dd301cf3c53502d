"""Dynamic BERT masking inside the jitted step (transformers' DataCollatorForLanguageModeling).

Each non-special position is selected with probability `rate` (15%); a selected token
becomes [MASK] with probability 0.8, a uniformly random id from the whole vocabulary with
probability 0.1, and stays unchanged otherwise. Special tokens ([CLS], [SEP], [PAD],
[UNK], [MASK]) and padding are never selected. Randomness is drawn per row from
`fold_in(rng, row_index)`, so a batch masks the same way however it is sharded.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def special_ids_of(tokenizer) -> tuple[int, ...]:
    """The ids the reference collator never masks: every special token of the tokenizer."""
    return tuple(sorted({int(i) for i in tokenizer.all_special_ids}))


def maskable(input_ids: jax.Array, attention_mask: jax.Array, special_ids: Sequence[int]):
    """True where a token may be selected: attended and not a special token."""
    special = jnp.isin(input_ids, jnp.asarray(np.asarray(special_ids, np.int32)))
    return attention_mask.astype(bool) & ~special


def mask_row(
    rng: jax.Array,
    ids: jax.Array,
    allowed: jax.Array,
    mask_id: int,
    vocab_size: int,
    rate: float,
) -> tuple[jax.Array, jax.Array]:
    """One row: (masked ids, selected positions)."""
    select_key, kind_key, token_key = jax.random.split(rng, 3)
    selected = jax.random.bernoulli(select_key, rate, ids.shape) & allowed
    draw = jax.random.uniform(kind_key, ids.shape)
    to_mask = selected & (draw < 0.8)
    to_random = selected & (draw >= 0.8) & (draw < 0.9)
    random_ids = jax.random.randint(token_key, ids.shape, 0, vocab_size, dtype=ids.dtype)
    out = jnp.where(to_mask, jnp.asarray(mask_id, ids.dtype), ids)
    return jnp.where(to_random, random_ids, out), selected


def mask_tokens(
    rng: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    row_index: jax.Array,
    *,
    special_ids: Sequence[int],
    mask_id: int,
    vocab_size: int,
    rate: float = 0.15,
) -> tuple[jax.Array, jax.Array]:
    """(masked inputs [B, L], selected positions [B, L] bool); labels are `input_ids`."""
    allowed = maskable(input_ids, attention_mask, special_ids)
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(row_index)
    return jax.vmap(mask_row, in_axes=(0, 0, 0, None, None, None))(
        keys, input_ids, allowed, mask_id, vocab_size, rate
    )
