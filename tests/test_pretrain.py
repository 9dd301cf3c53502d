"""The pretrain phase (a stereotyped base in the Hugging Face layout, cached and reused)
and the generated corpus and minimal pairs it is measured with."""

import json
from collections import Counter

import numpy as np
import pytest
import transformers
from config_fixtures import load_config

from peftdebias_jax import models, phases
from peftdebias_jax.data import cda, stereotypes, synthetic
from peftdebias_jax.errors import ConfigError
from peftdebias_jax.evaluation import intrinsic


def tiny(tmp_path, **pretrain):
    config = load_config("race_adapter", "smoke")
    config.pretrain.update(output=str(tmp_path / "base"), corpus_size=300, num_steps=4,
                           batch_size=8, eval_every=2, log_every=2)  # fmt: skip
    config.pretrain.update(pretrain)
    config.model.name, config.model.init = config.pretrain.output, "pretrained"
    return config


def test_corpus_plants_the_stereotypes_at_the_rate():
    texts = stereotypes.corpus(6000, 0.9, seed=1)
    women = [t for t in texts if t.split()[0] in ("she",) and any(j in t for j in
             stereotypes.FEMALE_JOBS + stereotypes.MALE_JOBS)]  # fmt: skip
    female_typed = sum(any(f" {j}" in t for j in stereotypes.FEMALE_JOBS) for t in women)
    assert female_typed / len(women) == pytest.approx(0.9, abs=0.05)
    negative = Counter()
    for t in texts:
        words = t.rstrip(".").split()
        if words[-1] in stereotypes.NEGATIVE_TRAITS + stereotypes.POSITIVE_TRAITS:
            kind = "t" if any(g in words for g in stereotypes.TARGETED) else "o"
            negative[kind, words[-1] in stereotypes.NEGATIVE_TRAITS] += 1
    share = negative["t", True] / (negative["t", True] + negative["t", False])
    assert share == pytest.approx(0.9, abs=0.05)
    share = negative["o", True] / (negative["o", True] + negative["o", False])
    assert share == pytest.approx(0.1, abs=0.05)
    unbiased = stereotypes.corpus(6000, 0.5, seed=1)
    assert unbiased != texts


def test_minimal_pairs_are_held_out_and_swap_only_identity_words():
    corpus = set(stereotypes.corpus(5000, 0.9, seed=0))
    gender_words = {w for pair in synthetic.WORD_LISTS["gender"] for w in pair}
    augment = cda.Augmenter.from_word_lists(synthetic.WORD_LISTS, "gender", "reference")
    for axis, identity in (("gender", gender_words),
                           ("race", set(stereotypes.TARGETED + stereotypes.OTHERS))):  # fmt: skip
        rows = stereotypes.minimal_pairs(axis)
        assert len(rows) >= 96 and not corpus & {r["sent_more"] for r in rows}
        for row in rows:
            more, less = row["sent_more"].split(), row["sent_less"].split()
            changed = {a for a, b in zip(more, less, strict=True) if a != b}
            assert changed and changed <= identity, row
    row = stereotypes.minimal_pairs("gender")[0]
    assert row["sent_less"] in augment(row["sent_more"]), "the gender CDA list swaps the pair"
    with pytest.raises(ValueError, match="religion"):
        stereotypes.minimal_pairs("religion")


def test_pairs_file_reads_as_crows_pairs(tmp_path):
    path = stereotypes.write_pairs(tmp_path / "race.csv", stereotypes.minimal_pairs("race"))
    pairs = intrinsic.load_crows(path)
    assert len(pairs) == len(stereotypes.minimal_pairs("race"))
    assert {p.direction for p in pairs} == {"stereo"} and pairs[0].bias_type == "race-color"


def test_pretrain_writes_a_loadable_base_and_reuses_it(tmp_path, monkeypatch):
    config = tiny(tmp_path)
    output = phases.pretrain.pretrain(config, tmp_path / "work")
    for name in ("config.json", "model.safetensors", "pretrain.json", "tokenizer.json"):
        assert (output / name).exists(), name
    assert models.has_mlm_head(output)
    twin = transformers.AutoModelForMaskedLM.from_pretrained(output)
    tokenizer = transformers.AutoTokenizer.from_pretrained(output)
    assert twin.config.vocab_size == len(tokenizer)
    assert tokenizer.tokenize("the muslim nurse") == ["the", "muslim", "nurse"]
    record = json.loads((output / "pretrain.json").read_text())
    assert record["settings"]["pretrain"]["rate"] == 0.9

    monkeypatch.setattr(phases.upstream, "fit", lambda **_: pytest.fail("trained again"))
    assert phases.pretrain.pretrain(config, tmp_path / "other") == output
    with pytest.raises(ConfigError, match=r"config\.pretrain\.output=.*other settings"):
        phases.pretrain.pretrain(tiny(tmp_path, rate=0.5), tmp_path / "other")
    config.upstream.update(bucket_count=1, clip_norm=0.5, bucket_compile_steps=1.0)
    assert phases.pretrain.pretrain(config, tmp_path / "other") == output, "not upstream's"
    for changed in ({"bucket_count": 1}, {"clip_norm": 0.5}, {"mlm_probability": 0.2}):
        with pytest.raises(ConfigError, match="other settings"):
            phases.pretrain.pretrain(tiny(tmp_path, **changed), tmp_path / "other")
    bf16 = tiny(tmp_path)
    bf16.model.dtype = "bfloat16"
    with pytest.raises(ConfigError, match="other settings"):
        phases.pretrain.pretrain(bf16, tmp_path / "other")
    (tmp_path / "foreign").mkdir()
    with pytest.raises(ConfigError, match="not written by the pretrain phase"):
        phases.pretrain.pretrain(tiny(tmp_path, output=str(tmp_path / "foreign")), tmp_path)


def test_pretraining_reads_its_own_section_not_upstreams(tmp_path, monkeypatch):
    config = tiny(tmp_path, bucket_count=3, bucket_run_length=5, bucket_compile_steps=7.0,
                  clip_norm=0.25, mlm_probability=0.3, max_predictions=4)  # fmt: skip
    config.upstream.update(bucket_count=8, bucket_run_length=10, bucket_compile_steps=4.0,
                           clip_norm=1.0, mlm_probability=0.15, max_predictions=-1)  # fmt: skip
    seen = {}

    def spy(settings, *args, **kwargs):
        seen.update(settings.upstream.to_dict())
        raise RuntimeError("stop here")

    monkeypatch.setattr(phases.pretrain, "train_mlm", spy)
    with pytest.raises(RuntimeError, match="stop here"):
        phases.pretrain.pretrain(config, tmp_path / "work")
    for key in ("bucket_count", "bucket_run_length", "bucket_compile_steps", "clip_norm",
                "mlm_probability", "max_predictions"):  # fmt: skip
        assert seen[key] == config.pretrain[key], key


def test_a_run_on_the_base_builds_it_first(tmp_path):
    config = tiny(tmp_path)
    config.phases = ("upstream",)
    config.upstream.train_file = "stereotyped"
    assert phases.builds_its_base(config)
    phases.run(config, tmp_path / "work")
    assert (tmp_path / "base" / "pretrain.json").exists()
    assert (tmp_path / "work" / "patch" / "patch.json").exists()
    metrics = [json.loads(x) for x in (tmp_path / "work" / "metrics.jsonl").open()]
    assert {m["phase"] for m in metrics} >= {"pretrain", "upstream"}


@pytest.mark.parametrize("name", ["ghc", "lhc", "bias_bios"])
def test_downstream_task_labels_are_independent_of_identity(name):
    train = stereotypes.task(name, 4000, 0, "train")
    test = stereotypes.task(name, 400, 1, "test")
    if name in stereotypes.HATE_STYLES:
        named = [e for e in train if e.group != "none"]
        assert len(named) / len(train) == pytest.approx(0.2, abs=0.03), "identities are rare"
        for kind in ("targeted", "other"):
            labels = [e.label for e in named if e.group == kind]
            assert np.mean([x == "1" for x in labels]) == pytest.approx(0.5, abs=0.06), kind
        assert {e.group for e in stereotypes.task(name, 500, 0, "train", 0.0)} == {"none"}
        held = [e for e in test if int(e.id) % 2 == 1]  # every other test example
        assert held and all(e.label == "0" and e.group in ("targeted", "other") for e in held)
    else:
        for job in stereotypes.JOB_EVIDENCE:
            women = np.mean([e.group == "f" for e in train if e.label == job])
            assert women == pytest.approx(0.5, abs=0.06), job


def test_the_transfer_task_is_worded_apart_from_the_demo_task():
    """lhc (the transfer target) shares no sentence frame with ghc: a patch that helps
    there does so through what it changed in the encoder, not through seen wording."""

    def frames(name: str, split: str) -> set[str]:
        words = set(stereotypes.TARGETED + stereotypes.OTHERS + stereotypes.NEGATIVE_TRAITS
                    + stereotypes.POSITIVE_TRAITS + stereotypes.NEUTRAL_TRAITS)  # fmt: skip
        return {" ".join("_" if w.strip(".,") in words else w for w in e.text.split())
                for e in stereotypes.task(name, 600, 0, split)}  # fmt: skip

    for split in ("train", "test"):
        assert frames("ghc", split).isdisjoint(frames("lhc", split)), split
    with pytest.raises(ValueError, match="mnli"):
        stereotypes.task("mnli", 10, 0, "train")
