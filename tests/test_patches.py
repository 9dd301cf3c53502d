"""Patch modules: parameter counts, zero-init behaviour, naming, composition, validation."""

import jax
import numpy as np
import pytest
import transformers
from hf_fixtures import padded_batch, save_model, tiny_config
from patch_fixtures import patch_paths, randomize_patch

from peftdebias_jax import models, peft
from peftdebias_jax.errors import ConfigError

BERT_BASE = models.EncoderConfig(
    vocab_size=30522,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
)


def patch_count(spec: peft.PatchConfig) -> int:
    """Parameters of one patch on bert-base shapes, without allocating any weights."""
    patch = spec.build("debias")
    shapes = models.abstract_params(models.EncoderModel(BERT_BASE, "mlm", patches=(patch,)))
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return sum(leaf.size for path, leaf in flat if patch.scope in [k.key for k in path])


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (peft.PatchConfig("seq_bn", reduction_factor=16), 894_528),
        (peft.PatchConfig("prefix_tuning", flat=True, prefix_length=30), 552_960),
        (peft.PatchConfig("lora", r=8, target_modules=["query", "value"]), 294_912),
        # the authors' budget-matched variants (METHOD.md §3.4.5)
        (peft.PatchConfig("pfeiffer", reduction_factor=32), 451_872),
        (peft.PatchConfig("prefix_tuning_flat", prefix_length=24), 442_368),
    ],
    ids=["seq_bn", "prefix_flat", "lora", "seq_bn_rf32", "prefix_flat_24"],
)
def test_parameter_counts_on_bert_base(spec, expected):
    assert patch_count(spec) == expected


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bert")
    config = tiny_config("bert")
    save_model(transformers.BertForMaskedLM, config, directory)
    return directory, padded_batch("bert", config.vocab_size)


def logits(directory, batch, patches=(), randomize=()):
    module, params = models.from_pretrained(directory, head="mlm", patches=patches)
    for i, name in enumerate(randomize):
        params = randomize_patch(params, name, seed=i)
    return np.asarray(module.apply({"params": params}, *batch)), params


# Zero-initialised methods are exactly the identity at initialisation: LoRA (B = 0, so
# B A x = 0) and a bottleneck adapter with init_weights="mam_adapter" (up-projection = 0,
# so h + up(...) = h). The `adapters` defaults for seq_bn ("bert": N(0, 0.02) up weights),
# prefix tuning (N(0, 1) keys/values that every token attends to) and prompt tuning
# (U(-0.5, 0.5) extra tokens) are not, so a fresh patch already moves the outputs.
@pytest.mark.parametrize(
    ("spec", "identity"),
    [
        (peft.PatchConfig("lora", r=4), True),
        (peft.PatchConfig("seq_bn", reduction_factor=4, init_weights="mam_adapter"), True),
        (peft.PatchConfig("double_seq_bn", reduction_factor=4, init_weights="mam_adapter"), True),
        (peft.PatchConfig("seq_bn", reduction_factor=4), False),
        (peft.PatchConfig("prefix_tuning", flat=True, prefix_length=3), False),
        (peft.PatchConfig("prefix_tuning", prefix_length=3, bottleneck_size=8), False),
        (peft.PatchConfig("prompt_tuning", prompt_length=3), False),
    ],
    ids=[
        "lora",
        "seq_bn_mam",
        "double_seq_bn_mam",
        "seq_bn_bert",
        "prefix_flat",
        "prefix_mlp",
        "prompt",
    ],
)
def test_fresh_patch_identity(tiny, spec, identity):
    directory, batch = tiny
    plain, _ = logits(directory, batch)
    patched, params = logits(directory, batch, {"p": spec})
    assert patch_paths(params, "p"), "the patch has leaves"
    assert patched.shape == plain.shape, "outputs at the real positions only"
    if identity:
        np.testing.assert_array_equal(patched, plain)
    else:
        assert np.abs(patched - plain).max() > 1e-4
    # trained (non-zero) values always change the outputs
    moved, _ = logits(directory, batch, {"p": spec}, randomize=["p"])
    assert np.abs(moved - plain).max() > 1e-3


def test_leaves_sit_under_scopes_named_after_the_patch(tiny):
    directory, _ = tiny
    specs = {
        "race": peft.PatchConfig("seq_bn", reduction_factor=4),
        "task": peft.PatchConfig("lora", r=2),
        "gender": peft.PatchConfig("prefix_tuning", flat=True, prefix_length=2),
        "soft": peft.PatchConfig("prompt_tuning", prompt_length=2),
    }
    _, params = models.from_pretrained(directory, head="mlm", patches=specs)
    assert all("/adapter_race/" in p for p in patch_paths(params, "race"))
    assert all("/lora_task/" in p for p in patch_paths(params, "task"))
    assert patch_paths(params, "gender") == ["bert/prefix_gender/control_trans"]
    assert patch_paths(params, "soft") == ["bert/embeddings/prompt_soft/embedding"]
    assert len(patch_paths(params, "race")) == 2 * 2 * 2  # layers x (down, up) x (kernel, bias)


def test_stacked_adapters_compose_in_order(tiny):
    """gender then race: each adapter sees the previous one's output (adapters' Stack)."""
    directory, batch = tiny
    specs = {
        "gender": peft.PatchConfig("seq_bn", reduction_factor=4),
        "race": peft.PatchConfig("seq_bn", reduction_factor=4),
    }
    both, params = logits(directory, batch, specs, randomize=["gender", "race"])
    module, _ = models.from_pretrained(directory, head="mlm", patches=specs)
    swapped = models.EncoderModel(
        module.config, "mlm", patches=tuple(reversed(module.patches))
    ).apply({"params": params}, *batch)
    only_gender = models.EncoderModel(module.config, "mlm", patches=module.patches[:1]).apply(
        {"params": params}, *batch
    )
    assert np.abs(both - np.asarray(only_gender)).max() > 1e-3
    assert np.abs(both - np.asarray(swapped)).max() > 1e-5, "order matters"


def test_lora_target_modules_suffix_and_regex(tiny):
    directory, _ = tiny
    _, params = models.from_pretrained(
        directory, patches={"a": peft.PatchConfig("lora", r=2, target_modules=["dense"])}
    )
    modules = {p.rsplit("/lora_a/", 1)[0].split("layer_0/")[-1] for p in patch_paths(params, "a")}
    assert modules == {"attention/output/dense", "intermediate/dense", "output/dense"} | {
        p for p in modules if p.startswith("bert/encoder/layer_1")
    }
    regex = r"bert\.encoder\.layer\.1\.attention\.self\.(key|value)"
    _, params = models.from_pretrained(
        directory, patches={"b": peft.PatchConfig("lora", r=2, target_modules=regex)}
    )
    assert {p.split("/lora_b/")[0] for p in patch_paths(params, "b")} == {
        "bert/encoder/layer_1/attention/self/key",
        "bert/encoder/layer_1/attention/self/value",
    }


def test_lora_matching_nothing_is_an_error(tiny):
    directory, _ = tiny
    with pytest.raises(ConfigError, match="match no module") as err:
        models.from_pretrained(
            directory, patches={"x": peft.PatchConfig("lora", target_modules=["nothing"])}
        )
    assert "bert.encoder.layer.<i>.attention.self.query" in str(err.value), "the names that exist"


def test_a_lora_regex_matches_with_or_without_the_base_prefix(tiny):
    directory, _ = tiny
    paths = []
    for regex in (r"encoder\.layer\.0\.attention\.self\.query",
                  r"bert\.encoder\.layer\.0\.attention\.self\.query"):  # fmt: skip
        spec = peft.PatchConfig("lora", target_modules=regex)
        _, params = models.from_pretrained(directory, patches={"x": spec})
        paths.append({p.split("/lora_x/")[0] for p in patch_paths(params, "x")})
    assert paths[0] == paths[1] == {"bert/encoder/layer_0/attention/self/query"}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: peft.PatchConfig("adaptor"), "unknown patch method 'adaptor'"),
        (lambda: peft.PatchConfig("lora", rank=4), "no hyper-parameter 'rank'"),
        (lambda: peft.PatchConfig("lora", r=0), "r must be >= 1"),
        (lambda: peft.PatchConfig("seq_bn", non_linearity="mish"), "non_linearity"),
        (lambda: peft.PatchConfig("lora").build("bad name"), "patch name"),
    ],
)
def test_patch_config_errors(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


def test_patch_config_aliases_and_round_trip():
    assert peft.PatchConfig("pfeiffer") == peft.PatchConfig("seq_bn")
    assert peft.PatchConfig("houlsby").build("h").mh_adapter
    assert peft.PatchConfig("houlsby").build("h").non_linearity == "swish"
    flat = peft.PatchConfig("prefix_tuning_flat", prefix_length=24)
    assert flat.build("p").flat and flat.to_dict()["prefix_length"] == 24
    assert peft.PatchConfig.from_dict(flat.to_dict()) == flat


def test_duplicate_patch_names(tiny):
    directory, _ = tiny
    patches = [peft.PatchConfig("lora").build("x"), peft.PatchConfig("seq_bn").build("x")]
    with pytest.raises(ConfigError, match="unique"):
        models.from_pretrained(directory, patches=patches)


def test_prompt_tuning_masks_padding_and_bf16(tiny):
    directory, batch = tiny
    ids, mask, types = batch
    assert mask[2].sum() == 3, "row 2 holds 3 real tokens, then padding"
    spec = {"soft": peft.PatchConfig("prompt_tuning", prompt_length=3)}
    module, params = models.from_pretrained(directory, head="mlm", patches=spec)
    short = module.apply({"params": params}, ids[2:, :3], mask[2:, :3], types[2:, :3])
    long = module.apply({"params": params}, ids[2:], mask[2:], types[2:])
    np.testing.assert_allclose(np.asarray(long[:, :3]), np.asarray(short), atol=1e-5)

    full = np.asarray(module.apply({"params": params}, *batch))
    low, _ = models.from_pretrained(directory, head="mlm", patches=spec, dtype="bfloat16")
    out = low.apply({"params": params}, *batch)
    assert out.dtype == np.dtype("bfloat16")
    np.testing.assert_allclose(np.asarray(out, np.float32), full, atol=0.2)
