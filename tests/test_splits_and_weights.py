"""Split caps (seeded samples recorded in the results), class weights that follow the
training split, and the warning and refusal for a checkpoint without an MLM head."""

import json
import logging

import pytest
import transformers
from config_fixtures import load_config
from conftest import SHARED_DATA
from hf_fixtures import save_model, tiny_config

from peftdebias_jax import models, phases
from peftdebias_jax.data import sampling, tasks
from peftdebias_jax.errors import ConfigError


def test_cap_is_a_seeded_sample_in_file_order():
    items = list(range(100))
    kept, record = sampling.cap(items, 10, seed=7, split="train")
    assert kept == sorted(kept) and len(set(kept)) == 10
    assert record == {"kept": 10, "of": 100, "seed": 7}
    assert sampling.cap(items, 10, 7, "train")[0] == kept, "deterministic"
    assert sampling.cap(items, 10, 7, "validation")[0] != kept, "each split its own draw"
    assert sampling.cap(items, 10, 8, "train")[0] != kept
    assert sampling.cap(items, 0, 7, "train") == (items, {"kept": 100, "of": 100, "seed": None})
    assert sampling.cap(items, 500, 7, "train")[0] == items


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_bad_cap_names_the_key(value):
    with pytest.raises(ConfigError, match=r"config\.downstream\.max_examples\.test must be"):
        sampling.check_caps({"train": 0, "test": value}, "config.downstream.max_examples")


def test_downstream_caps_every_split_and_records_it(tmp_path):
    config = load_config("race_ft", "smoke")
    config.downstream.update(synthetic_size=200, num_steps=2)
    config.downstream.max_examples.update(train=30, validation=12, test=20)
    config.phases = ("downstream",)
    phases.run(config, tmp_path)
    results = json.loads((tmp_path / "downstream_results.json").read_text())
    assert results["sampled"]["train"] == {"kept": 30, "of": 200, "seed": config.seed}
    assert results["sampled"]["validation"]["kept"] == results["validation"]["examples"] == 12
    assert results["sampled"]["test"]["kept"] == results["test"]["examples"] == 20
    lines = (tmp_path / "predictions" / "test.jsonl").read_text().splitlines()
    assert len(lines) == 20


def test_upstream_caps_documents(tmp_path):
    config = load_config("race_adapter", "smoke")
    config.upstream.update(train_file=str(SHARED_DATA / "ghc" / "ghc_train.tsv"),
                           word_list=str(SHARED_DATA / "bias_attribute_words.json"))  # fmt: skip
    config.upstream.max_examples.update(train=50, validation=5)
    train, validation, sampled = phases.upstream.upstream_texts(config)
    assert len(train) == 50 and len(validation) == 5
    assert sampled["train"]["of"] > 20_000 and sampled["validation"]["of"] > 1000


def test_class_weights_follow_the_training_split():
    stormfront = tasks.get("stormfront")
    balanced = tasks.load_split(stormfront, SHARED_DATA / "stormfront" / "stormfront_train.tsv")
    key = "config.downstream.class_weights"
    auto = tasks.class_weights(stormfront, ("0", "1"), balanced, "auto", key)
    assert auto == {"0": 1.0, "1": 1.0}, "the balanced sampled split needs no weights"
    assert tasks.class_weights(stormfront, ("0", "1"), balanced, "reference", key)["1"] == 6.7
    ghc = tasks.get("ghc")
    skewed = [tasks.Example("t", "1")] * 10 + [tasks.Example("t", "0")] * 95
    assert tasks.class_weights(ghc, ("0", "1"), skewed, "auto", key) == {"0": 1.0, "1": 9.5}
    assert tasks.class_weights(ghc, ("0", "1"), skewed, "none", key) == {"0": 1.0, "1": 1.0}
    assert tasks.class_weights(ghc, ("0", "1"), skewed, "1=3", key) == {"0": 1.0, "1": 3.0}
    bios = tasks.get("bias_bios")
    jobs = [tasks.Example("t", "nurse")] * 9 + [tasks.Example("t", "dj")]
    assert tasks.class_weights(bios, ("dj", "nurse"), jobs, "auto", key) == {"dj": 1, "nurse": 1}
    for bad in ("hate=2", "1=-1", "1=nan", "balanced"):
        with pytest.raises(ConfigError, match=r"config\.downstream\.class_weights="):
            tasks.class_weights(ghc, ("0", "1"), skewed, bad, key)


def test_class_weights_are_logged_and_recorded(tmp_path, caplog):
    config = load_config("race_ft", "smoke")
    config.downstream.update(num_steps=2, class_weights="1=4")
    config.phases = ("downstream",)
    with caplog.at_level(logging.INFO, logger="peftdebias_jax.phases.downstream"):
        phases.run(config, tmp_path)
    assert any("class weights (1=4)" in r.getMessage() for r in caplog.records)
    recorded = json.loads((tmp_path / "downstream_results.json").read_text())["class_weights"]
    assert recorded == {"setting": "1=4", "weights": {"0": 1.0, "1": 4.0}}


def test_missing_mlm_head_is_a_warning(tmp_path, minilm_dir, caplog):
    assert not models.has_mlm_head(minilm_dir)
    with caplog.at_level(logging.WARNING, logger="peftdebias_jax.models.pretrained"):
        models.from_pretrained(minilm_dir, head="mlm")
    assert any("has no masked-LM head" in r.getMessage() for r in caplog.records)
    with_head = tmp_path / "bert"
    save_model(transformers.BertForMaskedLM, tiny_config("bert"), with_head)
    assert models.has_mlm_head(with_head)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="peftdebias_jax.models.pretrained"):
        models.from_pretrained(with_head, head="mlm")
    assert not any("masked-LM head" in r.getMessage() for r in caplog.records)
