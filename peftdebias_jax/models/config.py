"""EncoderConfig: a BERT/RoBERTa architecture, read from a Hugging Face config.json."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from peftdebias_jax.errors import ConfigError
from peftdebias_jax.files import read_json

SUPPORTED_MODEL_TYPES = ("bert", "roberta")
SUPPORTED_ACTIVATIONS = (
    "gelu",
    "gelu_new",
    "gelu_fast",
    "gelu_pytorch_tanh",
    "quick_gelu",
    "relu",
    "silu",
    "swish",
    "tanh",
)
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Hyper-parameters of a post-LN BERT-family encoder; field names follow transformers."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    model_type: str = "bert"
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    classifier_dropout: float | None = None
    tie_word_embeddings: bool = True
    dtype: str = "float32"  # compute dtype; parameters are always float32

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported; expected one of "
                f"{SUPPORTED_MODEL_TYPES}"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"hidden_act {self.hidden_act!r} is not supported; expected one of "
                f"{SUPPORTED_ACTIVATIONS}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not one of {COMPUTE_DTYPES}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def base_name(self) -> str:
        """Scope of the encoder weights, as in Hugging Face checkpoints ("bert" / "roberta")."""
        return self.model_type

    def replace(self, **changes: Any) -> EncoderConfig:
        return dataclasses.replace(self, **changes)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json fields transformers reads for this architecture."""
        out = dataclasses.asdict(self)
        out.pop("dtype")
        return out

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> EncoderConfig:
        """Builds a config from a parsed config.json; errors name `source` and the field."""
        if "model_type" not in raw:
            raise ConfigError(f"{source}: field 'model_type' is missing")
        pos_type = raw.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise ConfigError(
                f"{source}: field 'position_embedding_type' is {pos_type!r}; only 'absolute' "
                "position embeddings are supported"
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for name, field in fields.items():
            if name == "dtype":
                continue
            if name not in raw:
                if field.default is dataclasses.MISSING:
                    raise ConfigError(f"{source}: required field {name!r} is missing")
                continue
            value = raw[name]
            expected = {"int": int, "float": float, "bool": bool, "str": str}.get(
                str(field.type).replace(" | None", "")
            )
            if value is None and "None" in str(field.type):
                kwargs[name] = None
                continue
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if expected is not None and not isinstance(value, expected):
                raise ConfigError(
                    f"{source}: field {name!r} should be {expected.__name__}, "
                    f"got {type(value).__name__} {value!r}"
                )
            if expected is int and value <= 0 and name != "pad_token_id":
                raise ConfigError(f"{source}: field {name!r} must be positive, got {value}")
            kwargs[name] = value
        try:
            return cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None


def read_config_json(path: str | Path) -> dict[str, Any]:
    """A config.json as a dict; errors name the file (and line)."""
    raw = read_json(path, "file", ConfigError)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return raw
