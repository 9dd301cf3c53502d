"""EncoderModel: the encoder under its Hugging Face scope ("bert"/"roberta") plus one head."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from peftdebias_jax.models.config import EncoderConfig
from peftdebias_jax.models.dropout import Dropout
from peftdebias_jax.models.encoder import Dense, Encoder
from peftdebias_jax.models.heads import BertOnlyMLMHead, RobertaClassificationHead, RobertaLMHead
from peftdebias_jax.models.seams import Patch
from peftdebias_jax.models.weights import leaf_paths

Array = jax.Array
HEADS = ("mlm", "classifier", "none")


@flax.struct.dataclass
class EncoderOutput:
    """What head="none" returns: per-token states and, when the model has one, the pooler."""

    last_hidden_state: Array
    pooler_output: Array | None = None


class EncoderModel(nn.Module):
    """BERT/RoBERTa encoder with a masked-LM head, a classifier head, or no head.

    Returns vocabulary logits [B, S, V] (mlm), label logits [B, num_labels] (classifier),
    or an `EncoderOutput` (none). Sentence pairs (NLI) are passed as `token_type_ids`.
    """

    config: EncoderConfig
    head: str = "none"
    num_labels: int | None = None
    add_pooling_layer: bool = False
    patches: Sequence[Patch] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.head == "classifier" and not self.num_labels:
            raise ValueError('head="classifier" needs num_labels >= 1')

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        deterministic: bool = True,
        mlm_positions: Array | None = None,
        mlm_rows: Array | None = None,
        segment_ids: Array | None = None,
        segment_starts: Array | None = None,
    ) -> Array | EncoderOutput:
        """`mlm_positions` [B, P] (head="mlm"): vocabulary logits [B, P, V] at those
        positions only, instead of [B, S, V] everywhere (scoring and masked-LM training
        need a few positions; the decoder is the largest matmul of the model). Heads that
        read a few positions (those, or the classifier's first token) run the last block
        on those rows only: same outputs, a fraction of the last block's FLOPs.
        `mlm_rows` [T] (with `mlm_positions`): logits [T, V] at only those of the B * P
        rows, flattened (a batch selects far fewer than P positions per row in all).
        Packed rows (`data.packing`): `segment_ids` [B, S] number each row's examples 1, 2,
        ... (0 = padding), and the classifier then reads each example's first token at
        `segment_starts` [B, P]: logits [B, P, labels], as each example alone would get."""
        cfg = self.config
        bert_classifier = self.head == "classifier" and cfg.model_type == "bert"
        encoder = Encoder(
            cfg,
            add_pooling_layer=self.add_pooling_layer or bert_classifier,
            patches=tuple(self.patches),
            name=cfg.base_name,
        )
        positions = None  # the states the head reads; the last block runs only there
        if self.head == "mlm":
            positions = mlm_positions
        elif self.head == "classifier" and segment_ids is not None:
            if segment_starts is None:
                raise ValueError("a classifier on packed rows needs segment_starts")
            positions = segment_starts
        elif self.head == "classifier":  # both classifier heads read the first token
            positions = jnp.zeros((input_ids.shape[0], 1), jnp.int32)
        hidden, pooled = encoder(
            input_ids, attention_mask, token_type_ids, deterministic, positions, segment_ids
        )
        if self.head == "none":
            return EncoderOutput(hidden, pooled)
        if self.head == "mlm":
            if mlm_rows is not None:
                hidden = hidden.reshape(-1, hidden.shape[-1])[mlm_rows]
            table = encoder.variables["params"]["embeddings"]["word_embeddings"]["embedding"]
            if cfg.model_type == "roberta":
                return RobertaLMHead(cfg, name="lm_head")(hidden, table)
            return BertOnlyMLMHead(cfg, name="cls")(hidden, table)
        if cfg.model_type == "roberta":
            head = RobertaClassificationHead(cfg, self.num_labels, name="classifier")
            return head(hidden if segment_ids is not None else hidden[:, 0], deterministic)
        rate = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
        pooled = Dropout(rate)(pooled, deterministic=deterministic)
        return Dense(self.num_labels, cfg, "classifier", name="classifier")(pooled)

    def dummy_inputs(self, batch: int = 1, length: int = 8) -> tuple[Array, Array]:
        """Inputs of the right kind for `init` / `jax.eval_shape`."""
        ids = jnp.full((batch, length), 2 if self.config.model_type == "bert" else 0, jnp.int32)
        return ids, jnp.ones((batch, length), jnp.int32)


def init_params(module: EncoderModel, rng: jax.Array) -> dict:
    """Freshly initialised parameters (transformers' initialisation: N(0, 0.02), zero bias)."""
    ids, mask = module.dummy_inputs()
    return module.init(rng, ids, mask)["params"]


def init_leaves(
    module: EncoderModel, rng: jax.Array, paths: Sequence[tuple[str, ...]]
) -> dict[tuple[str, ...], jax.Array]:
    """The leaves at `paths` of `init_params(module, rng)`, computing only those: one
    compiled program whose other outputs XLA drops. Loading a checkpoint then never holds
    a second, random copy of the weights it replaces."""
    if not paths:
        return {}
    ids, mask = module.dummy_inputs()

    def pick(key: jax.Array) -> list[jax.Array]:
        leaves = dict(leaf_paths(module.init(key, ids, mask)["params"]))
        return [leaves[path] for path in paths]

    return dict(zip(paths, jax.jit(pick)(rng), strict=True))


def abstract_params(module: EncoderModel) -> dict:
    """Shapes and dtypes of the parameters, without allocating them."""
    ids, mask = module.dummy_inputs()
    return jax.eval_shape(module.init, jax.random.key(0), ids, mask)["params"]
