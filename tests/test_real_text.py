"""The user's path on real, varied-length text with the real all-MiniLM-L6-v2 encoder and
the configs' own data, batching and loop settings (steps_per_call 10, bucket runs of 10,
max_len 128 and bucket_compile_steps 4, so that two to four length buckets occur in these
20-step phases): upstream (seq_bn and LoRA) and downstream on a few hundred Gab Hate
Corpus posts and real BiasBios bios. Both phases finish, the patch is the same bits after
downstream, every logged number is finite, and a run killed inside a multi-step call
resumes to the same bits.

Batches of 8 rows instead of the configs' 32 / 128 keep these tests to a few minutes on 2
CPU cores (most of it compiling one program per bucket); the shapes' structure is the
same. The second run of each program comes from the session's compilation cache."""

import csv
import json
import math

import numpy as np
import pytest
from config_fixtures import load_config
from conftest import SHARED_DATA
from fit_fixtures import spy_on_fit
from test_upstream import Interrupted, kill_at_batch, patch_leaves

from peftdebias_jax import phases
from peftdebias_jax.errors import ConfigError
from peftdebias_jax.phases import downstream

GHC = SHARED_DATA / "ghc" / "ghc_train.tsv"
WORDS = SHARED_DATA / "bias_attribute_words.json"
SCHEDULE = dict(num_steps=20, eval_every=20, checkpoint_every=10, log_every=10, batch_size=8)


def real_config(name: str, minilm_dir, data_file, pack: bool = False, **upstream):
    """The config's minilm preset (the documented real-data setting: head warm-up, split
    caps) on a local corpus, with short schedules, batches of 8 and caps of a few hundred
    rows; training batches padded to length buckets unless `pack` (the presets pack by
    default: test_packing.py runs that path)."""
    config = load_config(name, "minilm")
    config.model.name = str(minilm_dir)
    config.phases = ("upstream", "downstream")
    up, dn = config.upstream, config.downstream
    up.pack = dn.pack = pack
    up.update(train_file=str(data_file), validation_file="", word_list=str(WORDS), max_len=128,
              **SCHEDULE)  # fmt: skip
    # one epoch (16-19 batches of 8) fits in the 20 steps: every bucket is trained on
    up.max_examples.update(train=100, validation=48)
    up.head_warmup_steps = 10  # MiniLM ships no MLM head: "auto" warms one up first
    up.update(upstream)
    dn.update(train_file=str(data_file), validation_file="", test_file="", **SCHEDULE)
    dn.max_examples.update(train=120, validation=64)
    assert up.steps_per_call == dn.steps_per_call == 10 and up.bucket_run_length == 10
    return config


def bios_file(tmp_path):
    """The 280 real BiasBios sample bios (28 professions x 10) as one csv."""
    rows = []
    for path in sorted((SHARED_DATA / "bias_in_bios" / "samples").glob("*.csv")):
        with path.open(newline="") as f:
            rows += list(csv.DictReader(f))
    out = tmp_path / "bios.csv"
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["hard_text", "profession", "gender"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in writer.fieldnames} for r in rows)
    return out


def finite_numbers(tree) -> list[float]:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in finite_numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in finite_numbers(v)]
    return [float(tree)] if isinstance(tree, float | int) and not isinstance(tree, bool) else []


def train_shapes(caplog, name: str) -> set[str]:
    return {r.getMessage().split("batch shape ")[1].split(" (")[0] for r in caplog.records
            if f"compiling {name} train step for batch shape" in r.getMessage()}  # fmt: skip


def check_run(workdir, captured, caplog, buckets=(3, 3), ahead=False):
    """Both phases finished on several buckets (upstream, downstream), the frozen patch
    unchanged, every number finite; with `ahead` (parallel.compile_ahead), each phase's
    later buckets compiled in the background, else none did."""
    for phase, least in zip(("upstream", "downstream"), buckets, strict=True):
        assert (workdir / f"{phase}.done.json").exists(), phase
        assert len(train_shapes(caplog, phase)) >= least, (phase, train_shapes(caplog, phase))
        background = [r for r in caplog.records
                      if r.getMessage().startswith(f"compiled {phase} train")
                      and r.getMessage().endswith("(in the background)")]  # fmt: skip
        if ahead:
            assert len(background) >= least - 1, f"{phase}: later buckets compile in the background"
        else:
            assert not background, f"{phase}: compile_ahead is off"
    _, leaves = patch_leaves(workdir / "patch")
    for path, value in leaves.items():
        np.testing.assert_array_equal(captured["final"][tuple(path.split("/"))], value, path)
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    values = [v for line in lines for k, v in line.items() if k not in ("phase", "step")]
    assert values and all(math.isfinite(v) for v in values)
    assert {line["phase"] for line in lines} == {"upstream_head", "upstream", "downstream"}
    assert (workdir / "upstream_head.done.json").exists() and (workdir / "head_warmup").exists()
    results = json.loads((workdir / "downstream_results.json").read_text())
    scores = results["validation"]
    assert all(math.isfinite(x) for x in finite_numbers(scores))
    assert 0 <= scores["accuracy"] <= 100 and results["sampled"]["train"]["kept"] == 120
    return results


def assert_same_patches(a, b):
    for name in ("patch", "patch_final"):
        info_a, leaves_a = patch_leaves(a / name)
        info_b, leaves_b = patch_leaves(b / name)
        assert info_a["training"] == info_b["training"] and leaves_a.keys() == leaves_b.keys()
        for path in leaves_a:
            np.testing.assert_array_equal(leaves_a[path], leaves_b[path], f"{name}: {path}")


def test_race_axis_on_gab_hate_corpus(tmp_path, minilm_dir, monkeypatch, caplog):
    caplog.set_level("INFO", logger="peftdebias_jax.training.parallel")
    captured = spy_on_fit(monkeypatch, downstream)
    config = real_config("race_adapter", minilm_dir, GHC)
    config.parallel.compile_ahead = True  # off by default; the same numbers either way
    phases.run(config, tmp_path / "adapter")
    results = check_run(tmp_path / "adapter", captured, caplog, ahead=True)
    weights = results["class_weights"]
    assert weights["setting"] == "auto" and weights["weights"]["1"] > 3, "hate is up-weighted"

    caplog.clear()
    lora = real_config("race_lora", minilm_dir, GHC)
    lora.phases = ("upstream",)
    phases.run(lora, tmp_path / "lora")
    assert len(train_shapes(caplog, "upstream")) >= 3
    _, leaves = patch_leaves(tmp_path / "lora" / "patch")
    assert leaves and all("lora_debias" in path for path in leaves)

    # upstream killed while its step 14 is prepared (a call of steps 11-20; the head
    # warm-up's 10 batches come first), then resumed
    killed = real_config("race_adapter", minilm_dir, GHC)
    killed.phases = ("upstream",)
    with kill_at_batch(monkeypatch, 24), pytest.raises(Interrupted):
        phases.run(killed, tmp_path / "killed")
    phases.run(killed, tmp_path / "killed")
    assert_same_patches(tmp_path / "adapter", tmp_path / "killed")


def gender_config(name, minilm_dir, data):
    """280 bios: every split capped below what the 15% hold-outs leave; 70 documents give
    about 100 CDA sequences, an epoch within the 20 steps. Bios are long: their CDA
    sequences are 31-128 tokens, 3% of them in the 32 bucket, so upstream trains on the 64
    and 128 buckets (downstream, on whole bios, on three)."""
    config = real_config(name, minilm_dir, data)
    config.upstream.validation_fraction = config.downstream.validation_fraction = 0.15
    config.upstream.max_examples.update(train=70, validation=40)
    config.downstream.max_examples.update(validation=40)
    return config


def test_gender_axis_on_bias_bios(tmp_path, minilm_dir, monkeypatch, caplog):
    caplog.set_level("INFO", logger="peftdebias_jax.training.parallel")
    data = bios_file(tmp_path)
    captured = spy_on_fit(monkeypatch, downstream)
    config = gender_config("gender_adapter", minilm_dir, data)
    phases.run(config, tmp_path / "adapter")
    workdir = tmp_path / "adapter"
    results = check_run(workdir, captured, caplog, buckets=(2, 2))
    assert math.isfinite(results["validation"]["tpr_gap"])
    assert results["class_weights"]["weights"] == dict.fromkeys(results["labels"], 1.0)

    caplog.clear()
    lora = gender_config("gender_lora", minilm_dir, data)
    lora.phases = ("upstream",)
    phases.run(lora, tmp_path / "lora")
    assert len(train_shapes(caplog, "upstream")) >= 2
    assert (tmp_path / "lora" / "patch" / "patch.json").exists()

    # downstream killed while step 15 is prepared (a call of steps 11-20), then resumed:
    # the same predictions and the same best checkpoint as the uninterrupted run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    config.downstream.patches = (str(workdir / "patch"),)
    config.phases = ("downstream",)
    with kill_at_batch(monkeypatch, 15), pytest.raises(Interrupted):
        phases.run(config, resumed)
    phases.run(config, resumed)
    for split in ("validation",):
        a = (workdir / "predictions" / f"{split}.jsonl").read_text()
        assert (resumed / "predictions" / f"{split}.jsonl").read_text() == a
    again = json.loads((resumed / "downstream_results.json").read_text())
    assert again["selection"] == results["selection"]
    assert again["validation"] == results["validation"]


def test_evaluate_refuses_masked_lm_benchmarks_on_a_headless_checkpoint(tmp_path, minilm_dir):
    config = real_config("race_adapter", minilm_dir, GHC)
    config.phases = ("upstream", "evaluate")
    config.evaluate.crows_file = str(SHARED_DATA / "crows" / "crows_pairs_anonymized.csv")
    config.evaluate.stereoset_file = ""
    with pytest.raises(ConfigError, match=r"no masked-LM head.*config\.evaluate\.crows_file"):
        phases.run(config, tmp_path / "work")
    assert not (tmp_path / "work").exists(), "refused before anything ran"
