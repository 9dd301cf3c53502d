"""Parameter-mask research: which weights matter, and for whom. `bias_scores` ranks bias
terms (BEFT, magnitude, Fisher); `fisher` measures per-group Fisher importance and
neutralizes it; `lowrank` factorizes weights under an importance weighting."""

from peftdebias_jax.importance import bias_scores, fisher, lowrank

__all__ = ["bias_scores", "fisher", "lowrank"]
