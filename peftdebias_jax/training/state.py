"""TrainState: step, parameters (the one tree: base + patches + head), optimizer state, rng."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Everything a train step changes. `rng` is the run's base key; step s draws its
    randomness from fold_in(rng, s), so a resumed run draws exactly what it would have."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    anchor: Any = None  # the trainable leaves' starting values, for an L1 pull towards them

    @classmethod
    def create(
        cls, params: Any, tx: optax.GradientTransformation, seed: int, anchor: Any = None
    ) -> TrainState:
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=jax.random.PRNGKey(seed),
            anchor=anchor,
        )


def adamw(
    learning_rate: float, num_steps: int, clip_norm: float | None, weight_decay: float = 0.0
) -> optax.GradientTransformation:
    """The reference optimizer: global-norm clipping, then AdamW (0.9, 0.999, 1e-8) with a
    linear decay from `learning_rate` to 0 over `num_steps`, no warm-up."""
    schedule = optax.linear_schedule(learning_rate, 0.0, num_steps)
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay))
    return optax.chain(*parts)
