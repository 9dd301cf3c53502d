"""The last block on a few rows only (`output_positions`): same states, logits and
gradients as running it everywhere and reading those rows afterwards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from patch_fixtures import randomize_patch

from peftdebias_jax import models, peft

PATCHES = {
    "none": None,
    "seq_bn": peft.PatchConfig("seq_bn", reduction_factor=4),
    "lora": peft.PatchConfig("lora", r=4, target_modules=("query", "value")),
    "prefix": peft.PatchConfig("prefix_tuning", flat=True, prefix_length=3),
    "prompt": peft.PatchConfig("prompt_tuning", prompt_length=2),
}


def tiny(kind: str, layers: int = 2) -> models.EncoderConfig:
    return models.EncoderConfig(
        model_type=kind, vocab_size=53, hidden_size=24, num_hidden_layers=layers,
        num_attention_heads=4, intermediate_size=40, max_position_embeddings=40,
        type_vocab_size=2 if kind == "bert" else 1, pad_token_id=1 if kind == "roberta" else 0,
    )  # fmt: skip


def build(kind: str, head: str, patch: str, layers: int = 2):
    patches = {} if PATCHES[patch] is None else {"debias": PATCHES[patch]}
    module, params = models.from_config(tiny(kind, layers), head, 3, patches, seed=1)
    if patches:
        params = randomize_patch(params, "debias", seed=2)
    return module, params


def batch(kind: str):
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 53, size=(3, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0  # a padded row: its padding must stay excluded from the keys
    positions = np.array([[1, 4], [0, 5], [8, 2]], np.int32)
    return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("patch", list(PATCHES))
def test_mlm_logits_and_gradients_match_the_full_pass(kind, patch):
    module, params = build(kind, "mlm", patch)
    ids, mask, positions = batch(kind)

    def full(p):
        logits = module.apply({"params": p}, ids, mask)
        return jnp.take_along_axis(logits, positions[..., None], axis=1)

    def rows(p):
        return module.apply({"params": p}, ids, mask, mlm_positions=positions)

    np.testing.assert_allclose(rows(params), full(params), rtol=1e-5, atol=1e-5)

    def loss(logits_fn):
        return lambda p: jnp.sum(jax.nn.log_softmax(logits_fn(p))[..., 7])

    expected, got = jax.grad(loss(full))(params), jax.grad(loss(rows))(params)
    for (path, want), have in zip(
        jax.tree_util.tree_leaves_with_path(expected), jax.tree_util.tree_leaves(got), strict=True
    ):
        np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-6, err_msg=str(path))


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("patch", ["none", "prompt", "prefix"])
@pytest.mark.parametrize("layers", [2, 0])
def test_encoder_rows_equal_the_full_states_at_those_rows(kind, patch, layers):
    module, params = build(kind, "none", patch, layers)
    encoder = models.encoder.Encoder(module.config, patches=module.patches)
    variables = {"params": params[module.config.base_name]}
    ids, mask, positions = batch(kind)
    states, _ = encoder.apply(variables, ids, mask)
    picked, _ = encoder.apply(variables, ids, mask, output_positions=positions)
    want = jnp.take_along_axis(states, positions[..., None], axis=1)
    assert picked.shape == (3, 2, 24)
    np.testing.assert_allclose(picked, want, rtol=1e-5, atol=1e-5)


def test_classifier_logits_equal_the_pooler_over_the_full_pass():
    """The classifier runs the last block on the first token only; its logits equal the
    head applied to the pooled output of a full pass."""
    module, params = build("bert", "classifier", "seq_bn")
    ids, mask, _ = batch("bert")
    logits = module.apply({"params": params}, ids, mask)
    plain = models.EncoderModel(module.config, "none", add_pooling_layer=True,
                                patches=module.patches)  # fmt: skip
    out = plain.apply({"params": {k: v for k, v in params.items() if k != "classifier"}}, ids, mask)
    head = params["classifier"]
    want = out.pooler_output @ head["kernel"] + head["bias"]
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-7)
