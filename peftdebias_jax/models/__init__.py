"""Flax BERT/RoBERTa encoders that load Hugging Face checkpoints."""

from peftdebias_jax.models.config import EncoderConfig
from peftdebias_jax.models.model import EncoderModel, EncoderOutput, abstract_params, init_params
from peftdebias_jax.models.pretrained import (
    from_config,
    from_pretrained,
    has_mlm_head,
    load_tokenizer,
    patch_paths,
    resolve_checkpoint_dir,
    save_pretrained,
)
from peftdebias_jax.models.seams import Patch
from peftdebias_jax.models.surgery import untie_decoder
from peftdebias_jax.models.weights import hf_key, to_state_dict

__all__ = [
    "EncoderConfig",
    "EncoderModel",
    "EncoderOutput",
    "Patch",
    "abstract_params",
    "from_config",
    "from_pretrained",
    "has_mlm_head",
    "hf_key",
    "init_params",
    "load_tokenizer",
    "patch_paths",
    "resolve_checkpoint_dir",
    "save_pretrained",
    "to_state_dict",
    "untie_decoder",
]
