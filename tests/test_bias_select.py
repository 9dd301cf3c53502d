"""BitFit / BEFT: the BEFT score on known vectors, trainable counts on BERT-base shapes, and
the zero gradient of the key bias in softmax attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftdebias_jax import masks, models
from peftdebias_jax.importance import bias_scores


def test_beft_score_on_known_vectors():
    b0 = np.array([3.0, -1.0, 2.0])
    assert bias_scores.beft_score(b0, b0) == pytest.approx(0.0)
    assert bias_scores.beft_score(np.array([1.0, 0.0]), np.array([0.0, 5.0])) == pytest.approx(1.0)
    # scaled copies: only the magnitude ratio r counts, cos = 1
    assert bias_scores.beft_score(2 * b0, b0) == pytest.approx(0.5)
    assert bias_scores.beft_score(0.25 * b0, b0) == pytest.approx(0.75)
    # the two written forms of (B1) agree: 1 - r cos(theta)
    rng = np.random.default_rng(0)
    b, c = rng.normal(size=8), rng.normal(size=8)
    r = min(np.linalg.norm(b), np.linalg.norm(c)) / max(np.linalg.norm(b), np.linalg.norm(c))
    cos = b @ c / (np.linalg.norm(b) * np.linalg.norm(c))
    assert bias_scores.beft_score(b, c) == pytest.approx(1 - r * cos)
    with pytest.raises(ValueError, match="b_v of layer 3: a norm is zero"):
        bias_scores.beft_score(b0, np.zeros(3), "b_v of layer 3")
    assert bias_scores.magnitude_score(b0 + 0.5, b0) == pytest.approx(0.5)


def bert_base(num_labels=2):
    config = models.EncoderConfig(
        model_type="bert", vocab_size=30522, hidden_size=768, num_hidden_layers=12,
        num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512,
        type_vocab_size=2,
    )  # fmt: skip
    return models.abstract_params(models.EncoderModel(config, "classifier", num_labels, True))


@pytest.mark.parametrize(("types", "expected"), [(None, 104_450), (["b_v"], 11_522)])
def test_trainable_counts_on_bert_base_match_the_beft_code(types, expected):
    params = bert_base()
    trainable, _ = masks.counts(params, masks.labels(params, bias_scores.rules(types)))
    assert trainable == expected


def test_unknown_bias_type_is_named():
    with pytest.raises(ValueError, match=r"unknown bias types \['b_x'\]"):
        bias_scores.rules(["b_x"])


def test_change_scores_rank_by_a_known_criterion_only():
    config = models.EncoderConfig(model_type="bert", vocab_size=20, hidden_size=8,
                                  num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=16)  # fmt: skip
    module = models.EncoderModel(config, "classifier", 2, True)
    params = models.init_params(module, jax.random.key(0))
    moved = jax.tree_util.tree_map(lambda x: x + 0.5, params)
    scores = bias_scores.change_scores(moved, params, "magnitude")
    assert scores["b_v"] == pytest.approx([0.5, 0.5])
    with pytest.raises(
        ValueError, match=r"unknown bias change score; the known ones are \['beft', 'magnitude'\]"
    ):
        bias_scores.change_scores(moved, params, "magnitud")


def test_key_bias_gets_zero_gradient_in_softmax_attention():
    """q_i . b_k is the same for every key j, so softmax cancels it (MASKS.md B.5): b_k only
    moves through float rounding, while b_q and b_v get gradients of the loss's own scale."""
    config = models.EncoderConfig(
        model_type="bert", vocab_size=50, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
        type_vocab_size=2,
    )  # fmt: skip
    module, params = models.from_config(config, "classifier", 3, seed=1)
    params = jax.tree_util.tree_map(  # non-zero biases everywhere
        lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape), params
    )
    ids = jax.random.randint(jax.random.key(3), (4, 10), 5, 50)
    mask = jnp.ones((4, 10), jnp.int32).at[1, 7:].set(0)
    labels = jnp.array([0, 1, 2, 1])

    def loss(p):
        logits = module.apply({"params": p}, ids, mask)
        return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(4), labels])

    grads = bias_scores.by_type(jax.grad(loss)(params))
    for layer in (0, 1):
        key, query, value = (np.abs(grads[t][layer]).max() for t in ("b_k", "b_q", "b_v"))
        assert query > 1e-5 and value > 1e-5
        assert key < 1e-3 * min(query, value), (key, query, value)
