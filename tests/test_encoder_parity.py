"""The Flax encoder matches transformers (PyTorch) to 1e-4 on the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from hf_fixtures import padded_batch, save_model, tiny_config, torch_outputs

from peftdebias_jax import models

TOL = 1e-4
CASES = [
    ("bert", transformers.BertModel, "none"),
    ("bert", transformers.BertForMaskedLM, "mlm"),
    ("bert", transformers.BertForSequenceClassification, "classifier"),
    ("roberta", transformers.RobertaModel, "none"),
    ("roberta", transformers.RobertaForMaskedLM, "mlm"),
    ("roberta", transformers.RobertaForSequenceClassification, "classifier"),
]
SHAPES = {
    "small": {},
    # odd hidden size, several heads of odd width, long position table, other activation
    "odd": dict(
        hidden_size=33,
        num_attention_heads=3,
        intermediate_size=29,
        num_hidden_layers=3,
        max_position_embeddings=1030,
        hidden_act="gelu_new",
        layer_norm_eps=1e-5,
        type_vocab_size=3,
    ),
}


def flax_outputs(module, params, ids, mask, types):
    out = module.apply({"params": params}, ids, mask, types)
    if isinstance(out, models.EncoderOutput):
        result = {"last_hidden_state": np.asarray(out.last_hidden_state)}
        if out.pooler_output is not None:
            result["pooler_output"] = np.asarray(out.pooler_output)
        return result
    return {"logits": np.asarray(out)}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize(("kind", "model_cls", "head"), CASES, ids=[c[1].__name__ for c in CASES])
def test_matches_transformers(tmp_path, kind, model_cls, head, shape):
    config = tiny_config(kind, **SHAPES[shape])
    reference = save_model(model_cls, config, tmp_path)
    length = 40 if shape == "odd" else 11
    ids, mask, types = padded_batch(kind, config.vocab_size, length)
    expected = torch_outputs(reference, ids, mask, types)

    module, params = models.from_pretrained(tmp_path, head=head)
    got = flax_outputs(module, params, ids, mask, types)

    assert set(got) <= set(expected)
    assert got, "no output compared"
    for name, value in got.items():
        assert value.shape == expected[name].shape, name
        assert np.abs(expected[name]).max() > 0.05, f"{name} is too close to zero to be a test"
        np.testing.assert_allclose(value, expected[name], atol=TOL, rtol=0, err_msg=name)


def test_base_model_keeps_pooler_and_classifier_reads_it(tmp_path):
    config = tiny_config("bert")
    save_model(transformers.BertModel, config, tmp_path)
    module, params = models.from_pretrained(tmp_path, head="none")
    assert module.add_pooling_layer and "pooler" in params["bert"]
    module, params = models.from_pretrained(tmp_path, head="classifier", num_labels=3)
    # the pooler comes from the checkpoint, the classifier is new
    assert params["classifier"]["kernel"].shape == (config.hidden_size, 3)


@pytest.mark.parametrize("layout", ["sharded", "torch_bin"])
def test_other_checkpoint_layouts(tmp_path, layout):
    config = tiny_config("bert")
    kwargs = {"max_shard_size": "20KB"} if layout == "sharded" else {}
    if layout == "torch_bin":
        reference = save_model(transformers.BertForMaskedLM, config, tmp_path)
        import torch

        (tmp_path / "model.safetensors").unlink()
        torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    else:
        reference = save_model(transformers.BertForMaskedLM, config, tmp_path, **kwargs)
        assert (tmp_path / "model.safetensors.index.json").exists()
    ids, mask, types = padded_batch("bert", config.vocab_size)
    expected = torch_outputs(reference, ids, mask, types)["logits"]
    module, params = models.from_pretrained(tmp_path, head="mlm")
    got = np.asarray(module.apply({"params": params}, ids, mask, types))
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_untied_decoder(tmp_path):
    config = tiny_config("bert", tie_word_embeddings=False)
    reference = save_model(transformers.BertForMaskedLM, config, tmp_path)
    ids, mask, types = padded_batch("bert", config.vocab_size)
    expected = torch_outputs(reference, ids, mask, types)["logits"]
    module, params = models.from_pretrained(tmp_path, head="mlm")
    assert "decoder" in params["cls"]["predictions"]
    got = np.asarray(module.apply({"params": params}, ids, mask, types))
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_jit_dropout_and_bf16(tmp_path):
    config = tiny_config("bert", hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    save_model(transformers.BertForSequenceClassification, config, tmp_path)
    ids, mask, types = padded_batch("bert", config.vocab_size)
    module, params = models.from_pretrained(tmp_path, head="classifier")
    eager = module.apply({"params": params}, ids, mask, types)
    jitted = jax.jit(module.apply)({"params": params}, ids, mask, types)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-6)

    def train_mode(seed):
        return module.apply(
            {"params": params},
            ids,
            mask,
            types,
            deterministic=False,
            rngs={"dropout": jax.random.key(seed)},
        )

    assert not np.allclose(train_mode(0), eager)
    assert not np.allclose(train_mode(0), train_mode(1))
    np.testing.assert_array_equal(train_mode(3), train_mode(3))

    bf16_module, bf16_params = models.from_pretrained(tmp_path, head="classifier", dtype="bfloat16")
    leaf_dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(bf16_params)}
    assert leaf_dtypes == {jnp.dtype("float32")}, "parameters stay float32 under bf16 compute"
    low = bf16_module.apply({"params": bf16_params}, ids, mask, types)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), np.asarray(eager), atol=0.1)


def test_padding_does_not_change_real_positions(tmp_path):
    """Extra padding is invisible to the real tokens (the attention mask works)."""
    config = tiny_config("roberta")
    save_model(transformers.RobertaModel, config, tmp_path)
    module, params = models.from_pretrained(tmp_path)
    ids, mask, types = padded_batch("roberta", config.vocab_size, length=9)
    short = module.apply({"params": params}, ids[1:2, :5], mask[1:2, :5], types[1:2, :5])
    long = module.apply({"params": params}, ids[1:2], mask[1:2], types[1:2])
    np.testing.assert_allclose(
        np.asarray(long.last_hidden_state[:, :5]), np.asarray(short.last_hidden_state), atol=1e-5
    )


def test_loading_initialises_only_what_the_checkpoint_lacks(tmp_path, monkeypatch):
    """The base weights come from the file; only the MLM head and the patch are drawn, the
    same values as a full initialisation with that seed (up to float rounding)."""
    from peftdebias_jax import peft
    from peftdebias_jax.models import model as model_lib
    from peftdebias_jax.models.weights import leaf_paths

    save_model(transformers.BertModel, tiny_config("bert"), tmp_path)
    requested = []
    real = model_lib.init_leaves

    def spy(module, rng, paths):
        requested.extend(paths)
        return real(module, rng, paths)

    monkeypatch.setattr(models.pretrained, "init_leaves", spy)
    patches = {"d": peft.PatchConfig("lora")}
    module, params = models.from_pretrained(tmp_path, head="mlm", patches=patches, seed=5)
    drawn = {path for path, _ in leaf_paths(params) if path[0] == "cls" or "lora_d" in path}
    assert set(requested) == drawn and drawn
    full = dict(leaf_paths(model_lib.init_params(module, jax.random.key(5))))
    for path in requested:
        got = np.asarray(dict(leaf_paths(params))[path])
        np.testing.assert_allclose(got, np.asarray(full[path]), atol=1e-6, rtol=0)


def test_loaded_weights_reach_jax_without_a_copy(tmp_path):
    """Checkpoint tensors land in 64-byte-aligned float32 arrays, which JAX's CPU client
    uses in place: scoring or training a loaded model holds one copy of its weights."""
    from peftdebias_jax.models.weight_files import ALIGNMENT
    from peftdebias_jax.models.weights import leaf_paths

    save_model(transformers.BertModel, tiny_config("bert"), tmp_path)
    _, params = models.from_pretrained(tmp_path)
    leaves = [leaf for _, leaf in leaf_paths(params)]
    assert all(isinstance(leaf, np.ndarray) for leaf in leaves)
    for leaf in leaves:
        assert leaf.dtype == np.float32 and leaf.flags.c_contiguous
        assert leaf.ctypes.data % ALIGNMENT == 0
    kernel = params["bert"]["encoder"]["layer_0"]["intermediate"]["dense"]["kernel"]
    if jax.default_backend() == "cpu":
        assert jax.device_put(kernel).unsafe_buffer_pointer() == kernel.ctypes.data
