"""Parity with the `adapters` library (the paper's stack): same weights, same outputs."""

import json

import adapters
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from hf_fixtures import padded_batch, save_model, tiny_config, torch_outputs
from patch_fixtures import randomize_patch
from safetensors.torch import save_file

from peftdebias_jax import interop, models, peft

TOL = 1e-4
METHODS = {
    "seq_bn": (
        adapters.SeqBnConfig(reduction_factor=4),
        peft.PatchConfig("seq_bn", reduction_factor=4),
    ),
    "double_seq_bn": (
        adapters.DoubleSeqBnConfig(reduction_factor=4),
        peft.PatchConfig("double_seq_bn", reduction_factor=4),
    ),
    "prefix_flat": (
        adapters.PrefixTuningConfig(flat=True, prefix_length=5),
        peft.PatchConfig("prefix_tuning", flat=True, prefix_length=5),
    ),
    "prefix_mlp": (
        adapters.PrefixTuningConfig(flat=False, prefix_length=5, bottleneck_size=16),
        peft.PatchConfig("prefix_tuning", flat=False, prefix_length=5, bottleneck_size=16),
    ),
    "lora": (
        adapters.LoRAConfig(r=4, alpha=8),
        peft.PatchConfig("lora", r=4, alpha=8, target_modules=["query", "value"]),
    ),
    "lora_ffn": (
        adapters.LoRAConfig(
            r=2, alpha=4, attn_matrices=["k"], intermediate_lora=True, output_lora=True
        ),
        None,  # built from the imported config: a regex over key, intermediate and FFN output
    ),
}
MODELS = [
    ("bert", transformers.BertForMaskedLM, "mlm"),
    ("roberta", transformers.RobertaForSequenceClassification, "classifier"),
]
SHAPES = {"bert": {}, "roberta": dict(hidden_size=30, num_attention_heads=5, intermediate_size=22)}


def reference(model, batch):
    return torch_outputs(model, *batch)["logits"]


def adapters_model(model_cls, base_dir, name, adapter_config=None):
    model = model_cls.from_pretrained(base_dir)
    adapters.init(model)
    if adapter_config is not None:
        model.add_adapter(name, config=adapter_config)
        model.set_active_adapters(name)
    return model


def save_as_safetensors(model, name, directory):
    """save_adapter writes a pickle; keep its config and store the weights as safetensors."""
    model.save_adapter(directory, name, with_head=False)
    state = torch.load(directory / "pytorch_adapter.bin", weights_only=True)
    (directory / "pytorch_adapter.bin").unlink()
    canonical = {k: v.contiguous().clone() for k, v in state.items() if ".pool." not in k}
    save_file(canonical, directory / "adapter.safetensors")


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize(("kind", "model_cls", "head"), MODELS, ids=[m[0] for m in MODELS])
def test_adapters_patch_imports_and_matches(tmp_path, method, kind, model_cls, head):
    config = tiny_config(kind, **SHAPES[kind])
    save_model(model_cls, config, tmp_path / "base")
    adapter_config, _ = METHODS[method]
    model = adapters_model(model_cls, tmp_path / "base", "debias", adapter_config)
    torch.manual_seed(1)
    with torch.no_grad():  # trained-looking values: nothing zero-initialised stays zero
        for name, param in model.named_parameters():
            if ".debias." in name or name.endswith(".debias"):
                param.normal_(0, 0.3)
    model.eval()
    batch = padded_batch(kind, config.vocab_size)
    expected = reference(model, batch)
    plain = reference(adapters_model(model_cls, tmp_path / "base", "x").eval(), batch)
    assert np.abs(expected - plain).max() > 1e-2, "the patch has an effect"

    save_as_safetensors(model, "debias", tmp_path / "patch")
    base_module, base_params = models.from_pretrained(tmp_path / "base", head=head)
    module, params = interop.import_adapters(tmp_path / "patch", base_module, base_params)
    got = np.asarray(module.apply({"params": params}, *batch))
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("method", sorted(m for m in METHODS if METHODS[m][1] is not None))
@pytest.mark.parametrize(("kind", "model_cls", "head"), MODELS, ids=[m[0] for m in MODELS])
def test_exported_patch_loads_in_adapters_and_matches(tmp_path, method, kind, model_cls, head):
    config = tiny_config(kind, **SHAPES[kind])
    save_model(model_cls, config, tmp_path / "base")
    _, spec = METHODS[method]
    module, params = models.from_pretrained(tmp_path / "base", head=head, patches={"race": spec})
    params = randomize_patch(params, "race", seed=2)
    interop.export_adapters(tmp_path / "patch", params, module, "race")
    meta = json.loads((tmp_path / "patch" / "adapter_config.json").read_text())
    assert meta["model_class"] == model_cls.__name__

    model = adapters_model(model_cls, tmp_path / "base", "race")
    model.load_adapter(str(tmp_path / "patch"), use_safetensors=True)
    model.set_active_adapters("race")
    model.eval()
    batch = padded_batch(kind, config.vocab_size)
    np.testing.assert_allclose(
        np.asarray(module.apply({"params": params}, *batch)),
        reference(model, batch),
        atol=TOL,
        rtol=0,
    )
    # and our own import of the export gives back the same leaves
    plain, plain_params = models.from_pretrained(tmp_path / "base", head=head)
    _, back = interop.import_adapters(tmp_path / "patch", plain, plain_params)
    original = traverse_util.flatten_dict(params)
    for path, leaf in traverse_util.flatten_dict(back).items():
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(original[path]))
