"""Patch directories: exact round trip, mismatch errors that name the difference, safe saves."""

import json

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from patch_fixtures import patch_paths, randomize_patch

from peftdebias_jax import checkpoint, masks, models, peft
from peftdebias_jax.errors import CheckpointError

CONFIG = models.EncoderConfig(
    vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24
)
IDS = np.array([[2, 7, 9, 11, 3, 0], [2, 5, 6, 3, 0, 0]], np.int32)
MASK = (IDS != 0).astype(np.int32)
SPECS = [
    peft.PatchConfig("seq_bn", reduction_factor=4),
    peft.PatchConfig("double_seq_bn", reduction_factor=4),
    peft.PatchConfig("lora", r=2, target_modules=["query", "key", "value"]),
    peft.PatchConfig("prefix_tuning", flat=True, prefix_length=3),
    peft.PatchConfig("prefix_tuning", prefix_length=3, bottleneck_size=5),
    peft.PatchConfig("prompt_tuning", prompt_length=2),
]


def trained(spec, seed=0):
    module, params = models.from_config(CONFIG, head="mlm", patches={"race": spec}, seed=seed)
    return module, randomize_patch(params, "race", seed=3)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: repr(s))
def test_round_trip_is_exact(tmp_path, spec):
    module, params = trained(spec)
    checkpoint.save_patch(tmp_path / "patch", params, "race", module, axis="race")
    info = json.loads((tmp_path / "patch" / "patch.json").read_text())
    assert info["patch"] == spec.to_dict() and info["axis"] == "race"
    assert set(info["leaves"]) == set(patch_paths(params, "race")), "only patch leaves are saved"

    plain, base = models.from_config(CONFIG, head="mlm", seed=0)
    loaded_module, loaded = checkpoint.load_patch(tmp_path / "patch", plain, base)
    assert [p.name for p in loaded_module.patches] == ["race"]
    before = traverse_util.flatten_dict(params)
    for path, leaf in traverse_util.flatten_dict(loaded).items():
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(before[path]))
    np.testing.assert_array_equal(
        np.asarray(loaded_module.apply({"params": loaded}, IDS, MASK)),
        np.asarray(module.apply({"params": params}, IDS, MASK)),
    )


def test_load_under_another_name_next_to_a_trainable_patch(tmp_path):
    module, params = trained(SPECS[0])
    checkpoint.save_patch(tmp_path / "p", params, "race", module)
    task_module, task_params = models.from_config(
        CONFIG, head="mlm", patches={"task": peft.PatchConfig("lora", r=2)}, seed=0
    )
    both, merged = checkpoint.load_patch(tmp_path / "p", task_module, task_params, name="gender")
    assert [p.name for p in both.patches] == ["task", "gender"]
    assert patch_paths(merged, "gender") and not patch_paths(merged, "race")
    labels = masks.labels(merged, [(masks.patch_regex("task"), "train"), (".*", "freeze")])
    assert masks.counts(merged, labels)[0] == 2 * 2 * (16 * 2 + 2 * 16)


def test_mismatched_size_is_named(tmp_path):
    module, params = trained(SPECS[0])
    checkpoint.save_patch(tmp_path / "p", params, "race", module)
    wider, wider_params = models.from_config(CONFIG.replace(hidden_size=20, num_attention_heads=2))
    with pytest.raises(CheckpointError, match=r"hidden_size=16.*hidden_size=20"):
        checkpoint.load_patch(tmp_path / "p", wider, wider_params)


def test_other_base_weights_fail_the_fingerprint(tmp_path):
    module, params = trained(SPECS[0])
    checkpoint.save_patch(tmp_path / "p", params, "race", module)
    other, other_params = models.from_config(CONFIG, head="mlm", seed=1)
    with pytest.raises(CheckpointError, match="fingerprint"):
        checkpoint.load_patch(tmp_path / "p", other, other_params)
    loaded, _ = checkpoint.load_patch(tmp_path / "p", other, other_params, check_fingerprint=False)
    assert loaded.patches[0].name == "race"


def test_other_method_is_named(tmp_path):
    module, params = trained(SPECS[0])
    checkpoint.save_patch(tmp_path / "p", params, "race", module)
    lora, lora_params = models.from_config(
        CONFIG, head="mlm", patches={"race": peft.PatchConfig("lora")}, seed=0
    )
    with pytest.raises(CheckpointError, match="method: model 'lora' vs saved 'seq_bn'"):
        checkpoint.load_patch(tmp_path / "p", lora, lora_params)


def test_failed_save_keeps_the_previous_patch(tmp_path, monkeypatch):
    module, params = trained(SPECS[0])
    checkpoint.save_patch(tmp_path / "p", params, "race", module, training={"step": 1})

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_patch(tmp_path / "p", params, "race", module, training={"step": 2})
    assert checkpoint.read_patch_info(tmp_path / "p")["training"] == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"], "no staging debris"


def test_bad_patch_json(tmp_path):
    (tmp_path / "patch.json").write_text('{"format_version": 1,\n "name": }')
    with pytest.raises(CheckpointError, match=r"patch.json: not valid JSON \(line 2"):
        checkpoint.read_patch_info(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.read_patch_info(tmp_path / "missing")


def test_fingerprint_ignores_patches_and_heads_but_not_base():
    _, params = trained(SPECS[0])
    fp = checkpoint.fingerprint(params, "bert")
    assert fp == checkpoint.fingerprint(randomize_patch(params, "race", seed=9), "bert")
    flat = traverse_util.flatten_dict(params)
    key = ("bert", "encoder", "layer_1", "output", "dense", "bias")
    flat[key] = flat[key].at[0].add(1e-3)
    assert fp != checkpoint.fingerprint(traverse_util.unflatten_dict(flat), "bert")
