"""Broken checkpoints and configs fail with errors that name the file and the key or field."""

import json
import logging
import sys

import numpy as np
import pytest
import transformers
from hf_fixtures import save_model, tiny_config

from peftdebias_jax import models
from peftdebias_jax.errors import CheckpointError, ConfigError


@pytest.fixture
def bert_dir(tmp_path):
    save_model(transformers.BertForMaskedLM, tiny_config("bert"), tmp_path)
    return tmp_path


def test_truncated_safetensors_names_file_and_key(bert_dir):
    path = bert_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError) as err:
        models.from_pretrained(bert_dir, head="mlm")
    message = str(err.value)
    assert str(path) in message and "truncated" in message
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    last_key = max(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1]
    )
    assert repr(last_key) in message


def test_corrupt_header_names_file(bert_dir):
    path = bert_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"not json !!!"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header") as err:
        models.from_pretrained(bert_dir)
    assert str(path) in str(err.value)


def test_tiny_file_is_truncated(bert_dir):
    (bert_dir / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="truncated"):
        models.from_pretrained(bert_dir)


def test_config_shape_disagreement_names_key(bert_dir):
    cfg = json.loads((bert_dir / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (bert_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        models.from_pretrained(bert_dir, head="mlm")
    message = str(err.value)
    assert "model.safetensors" in message
    assert "'bert.encoder.layer.0.intermediate.dense.weight'" in message
    assert "(40, 24)" in message and "(48, 24)" in message


def test_missing_base_weights_are_named(tmp_path):
    model = transformers.BertModel(tiny_config("bert"))
    state = {k: v for k, v in model.state_dict().items() if "layer.1.output" not in k}
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(model.config.to_json_string())
    with pytest.raises(CheckpointError, match="missing base weights") as err:
        models.from_pretrained(tmp_path)
    assert "bert.encoder.layer.1.output.dense.weight" in str(err.value)


def test_unused_keys_listed_and_fresh_heads_logged(tmp_path, caplog):
    save_model(transformers.BertForPreTraining, tiny_config("bert"), tmp_path)
    with caplog.at_level(logging.INFO, logger="peftdebias_jax"):
        models.from_pretrained(tmp_path, head="classifier", num_labels=3)
    unused = [r.getMessage() for r in caplog.records if "unused checkpoint keys" in r.getMessage()]
    assert unused and "cls.seq_relationship.weight" in unused[0]
    fresh = [r.getMessage() for r in caplog.records if "freshly initialised" in r.getMessage()]
    assert fresh and "classifier/kernel" in fresh[0] and "pooler" not in fresh[0]


def test_legacy_gamma_beta_names(tmp_path):
    reference = save_model(transformers.BertModel, tiny_config("bert"), tmp_path)
    from safetensors.torch import save_file

    state = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        ): v
        for k, v in reference.state_dict().items()
    }
    save_file(state, tmp_path / "model.safetensors")
    _, params = models.from_pretrained(tmp_path)
    np.testing.assert_array_equal(
        np.asarray(params["bert"]["embeddings"]["LayerNorm"]["scale"]),
        reference.embeddings.LayerNorm.weight.detach().numpy(),
    )


def test_torch_bin_without_torch_says_so(bert_dir, monkeypatch):
    import torch

    model = transformers.BertForMaskedLM.from_pretrained(bert_dir)
    (bert_dir / "model.safetensors").unlink()
    torch.save(model.state_dict(), bert_dir / "pytorch_model.bin")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(CheckpointError, match="needs torch") as err:
        models.from_pretrained(bert_dir, head="mlm")
    assert "pytorch_model.bin" in str(err.value)


def test_no_weights_file(tmp_path):
    (tmp_path / "config.json").write_text(tiny_config("bert").to_json_string())
    with pytest.raises(CheckpointError, match="no weights found"):
        models.from_pretrained(tmp_path)


def test_hub_name_offline_asks_for_local_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="pass a local") as err:
        models.from_pretrained("some-org/not-cached-model")
    assert "some-org/not-cached-model" in str(err.value)


def test_missing_directory():
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        models.from_pretrained("./definitely/not/here/")


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ({"model_type": "gpt2"}, "model_type"),
        ({"hidden_act": "mish"}, "hidden_act"),
        ({"hidden_size": "24"}, "hidden_size"),
        ({"num_attention_heads": 5}, "num_attention_heads"),
        ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
    ],
)
def test_bad_config_fields_are_named(bert_dir, edit, field):
    cfg = json.loads((bert_dir / "config.json").read_text())
    cfg.update(edit)
    (bert_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=field) as err:
        models.from_pretrained(bert_dir)
    assert "config.json" in str(err.value)


def test_invalid_json_names_line(bert_dir):
    (bert_dir / "config.json").write_text('{\n  "model_type": "bert",\n  oops\n}')
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON \(line 3"):
        models.from_pretrained(bert_dir)


def test_classifier_without_label_count(bert_dir):
    cfg = json.loads((bert_dir / "config.json").read_text())
    cfg.pop("id2label", None)
    cfg.pop("label2id", None)
    (bert_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="num_labels"):
        models.from_pretrained(bert_dir, head="classifier")
