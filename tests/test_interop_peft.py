"""LoRA parity with Hugging Face peft: the same weights in both give the same outputs."""

import json
import re

import numpy as np
import peft as hf_peft
import pytest
import torch
import transformers
from flax import traverse_util
from hf_fixtures import padded_batch, save_model, tiny_config, torch_outputs
from patch_fixtures import randomize_patch

from peftdebias_jax import interop, models, peft
from peftdebias_jax.errors import CheckpointError

TOL = 1e-4
CASES = [
    ("bert", transformers.BertForMaskedLM, "mlm", ["query", "value"]),
    ("roberta", transformers.RobertaForSequenceClassification, "classifier", ["query", "value"]),
    ("bert", transformers.BertModel, "none", ["key", "dense"]),
    # regexes: on BertModel's names (no "bert." prefix) and on BertForMaskedLM's
    (
        "bert",
        transformers.BertModel,
        "none",
        r"encoder\.layer\.\d+\.attention\.self\.(query|value)",
    ),
    ("bert", transformers.BertForMaskedLM, "mlm", r"bert\.encoder\.layer\.1\.output\.dense"),
]


def ours(module, params, batch):
    out = module.apply({"params": params}, *batch)
    return np.asarray(out.last_hidden_state if head_none(module) else out)


def head_none(module):
    return module.head == "none"


def reference(model, batch):
    out = torch_outputs(model, *batch)
    return out["last_hidden_state"] if "last_hidden_state" in out else out["logits"]


@pytest.mark.parametrize(("kind", "model_cls", "head", "targets"), CASES, ids=lambda c: str(c))
def test_exported_lora_loads_in_peft_and_matches(tmp_path, kind, model_cls, head, targets):
    config = tiny_config(kind)
    base = save_model(model_cls, config, tmp_path / "base")
    batch = padded_batch(kind, config.vocab_size)
    spec = peft.PatchConfig("lora", r=4, alpha=8, target_modules=targets)
    module, params = models.from_pretrained(tmp_path / "base", head=head, patches={"task": spec})
    params = randomize_patch(params, "task")
    interop.export_peft_lora(tmp_path / "lora", params, module, "task", base_model="tiny")

    peft_model = hf_peft.PeftModel.from_pretrained(
        model_cls.from_pretrained(tmp_path / "base"), tmp_path / "lora"
    ).eval()
    expected = reference(peft_model, batch)
    got = ours(module, params, batch)
    assert np.abs(expected - reference(base, batch)).max() > 1e-2, "the LoRA has an effect"
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)

    # import: the same leaves back, bit for bit
    plain, plain_params = models.from_pretrained(tmp_path / "base", head=head)
    back_module, back = interop.import_peft_lora(tmp_path / "lora", plain, plain_params, "task")
    original = traverse_util.flatten_dict(params)
    for path, leaf in traverse_util.flatten_dict(back).items():
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(original[path]))
    if isinstance(targets, str):  # exported as the module names it matched
        exported = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
        assert all(re.fullmatch(targets, n) or re.fullmatch(targets, n.partition(".")[2])
                   for n in exported["target_modules"])  # fmt: skip
    else:
        assert back_module.patches[0].target_modules == tuple(sorted(targets))


def test_peft_trained_lora_imports_and_matches(tmp_path):
    config = tiny_config("bert")
    save_model(transformers.BertForMaskedLM, config, tmp_path / "base")
    lora_config = hf_peft.LoraConfig(r=3, lora_alpha=6, target_modules=["query", "value"])
    peft_model = hf_peft.get_peft_model(
        transformers.BertForMaskedLM.from_pretrained(tmp_path / "base"), lora_config
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    peft_model.save_pretrained(tmp_path / "lora")
    peft_model.eval()
    batch = padded_batch("bert", config.vocab_size)
    expected = reference(peft_model, batch)
    plain, plain_params = models.from_pretrained(tmp_path / "base", head="mlm")
    module, params = interop.import_peft_lora(tmp_path / "lora", plain, plain_params, "debias")
    np.testing.assert_allclose(ours(module, params, batch), expected, atol=TOL, rtol=0)


def test_unsupported_peft_settings_are_named(tmp_path):
    config = tiny_config("bert")
    save_model(transformers.BertModel, config, tmp_path / "base")
    module, params = models.from_pretrained(
        tmp_path / "base", patches={"t": peft.PatchConfig("lora", r=2)}
    )
    interop.export_peft_lora(tmp_path / "lora", params, module, "t")
    cfg_path = tmp_path / "lora" / "adapter_config.json"
    raw = json.loads(cfg_path.read_text())
    raw["use_rslora"] = True
    cfg_path.write_text(json.dumps(raw))
    plain, plain_params = models.from_pretrained(tmp_path / "base")
    with pytest.raises(CheckpointError, match="'use_rslora'"):
        interop.import_peft_lora(tmp_path / "lora", plain, plain_params, "t")
    (tmp_path / "lora" / "adapter_model.safetensors").unlink()
    (tmp_path / "lora" / "adapter_model.bin").write_bytes(b"pickle")
    raw["use_rslora"] = False
    cfg_path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="never a pickle"):
        interop.import_peft_lora(tmp_path / "lora", plain, plain_params, "t")


def test_only_lora_exports_to_peft(tmp_path):
    module, params = models.from_config(
        models.EncoderConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=8),
        patches={"a": peft.PatchConfig("seq_bn", reduction_factor=2)},
    )  # fmt: skip
    with pytest.raises(CheckpointError, match="is seq_bn"):
        interop.export_peft_lora(tmp_path, params, module, "a")
