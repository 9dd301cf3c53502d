"""Debias patches: LoRA, bottleneck adapters, prefix and prompt tuning, as named Flax modules."""

from peftdebias_jax.models.seams import Patch
from peftdebias_jax.peft.adapter import DoubleSeqBn, SeqBn
from peftdebias_jax.peft.config import ALIASES, METHODS, PatchConfig
from peftdebias_jax.peft.lora import LoRA
from peftdebias_jax.peft.prefix import PrefixTuning
from peftdebias_jax.peft.prompt import PromptTuning

__all__ = [
    "ALIASES",
    "METHODS",
    "DoubleSeqBn",
    "LoRA",
    "Patch",
    "PatchConfig",
    "PrefixTuning",
    "PromptTuning",
    "SeqBn",
]
