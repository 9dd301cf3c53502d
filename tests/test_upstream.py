"""The upstream phase on a tiny random model: it learns, resumes exactly, fails loudly."""

import contextlib
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from config_fixtures import load_config
from conftest import SHARED_DATA
from flax import traverse_util

from peftdebias_jax import checkpoint, masks, models, phases
from peftdebias_jax.data import pipeline, synthetic
from peftdebias_jax.data.tokenizer import train_wordpiece
from peftdebias_jax.errors import ConfigError
from peftdebias_jax.phases import common
from peftdebias_jax.training import loop, steps


def smoke(tmp_path, name="gender_adapter", **upstream):
    config = load_config(name, "smoke")
    config.model.architecture.hidden_dropout_prob = 0.0
    config.model.architecture.attention_probs_dropout_prob = 0.0
    config.upstream.synthetic_size = 60
    config.upstream.batch_size = 8
    config.upstream.update(upstream)
    return config


def patch_leaves(directory):
    module_dir = checkpoint.read_patch_info(directory)
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as c:
        leaves = c.restore(directory / "weights")
    return module_dir, {
        "/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(leaves).items()
    }


def test_upstream_learns_and_exports_only_the_patch(tmp_path, monkeypatch):
    config = smoke(tmp_path, num_steps=30, learning_rate=5e-3, eval_every=10, checkpoint_every=10)
    config.upstream.word_list = str(SHARED_DATA / "bias_attribute_words.json")
    captured = {}
    real_fit = loop.fit

    def spy(**kwargs):
        captured["start"] = jax.tree_util.tree_map(np.asarray, kwargs["state"].params)
        captured["labels"] = kwargs["label_tree"]
        final, selection = real_fit(**kwargs)
        captured["final"] = jax.tree_util.tree_map(np.asarray, final.params)
        return final, selection

    monkeypatch.setattr(phases.upstream, "fit", spy)
    patch_dir = phases.upstream.upstream(config, tmp_path)

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [line["eval_loss"] for line in lines if "eval_loss" in line]
    assert len(evals) == 3 and evals[-1] < evals[0] - 0.05, evals
    start, final = (traverse_util.flatten_dict(captured[k]) for k in ("start", "final"))
    labels = traverse_util.flatten_dict(captured["labels"])
    for path, label in labels.items():
        if label == "freeze":  # the base (and tied decoder) bit for bit
            np.testing.assert_array_equal(final[path], start[path])
    assert any(not np.array_equal(final[p], start[p]) for p in labels if p[0] == "cls")

    info, leaves = patch_leaves(patch_dir)
    assert leaves and all("/adapter_debias/" in path for path in leaves), "only patch leaves"
    assert info["training"]["step"] == 30 and info["axis"] == "gender"
    for path, value in leaves.items():
        np.testing.assert_array_equal(value, final[tuple(path.split("/"))])
    assert (tmp_path / "patch_final" / "patch.json").exists()
    # rerunning a finished phase does nothing
    monkeypatch.setattr(
        phases.upstream, "fit", lambda **_: pytest.fail("a finished phase was rerun")
    )
    assert phases.upstream.upstream(config, tmp_path) == patch_dir


class Interrupted(Exception):
    pass


@contextlib.contextmanager
def kill_at_batch(monkeypatch, n):
    """A kill while training step `n` is prepared: the n-th training batch raises (inside
    a compiled call of several steps when steps_per_call > 1)."""
    real = pipeline.Batches.next_call
    taken = [0]

    def dying(self, epoch, index, limit):
        specs, position = real(self, epoch, index, limit)
        if taken[0] < n <= taken[0] + len(specs):
            raise Interrupted(f"killed during step {n}")
        taken[0] += len(specs)
        return specs, position

    with monkeypatch.context() as patched:
        patched.setattr(pipeline.Batches, "next_call", dying)
        yield


@pytest.mark.parametrize("steps_per_call", [1, 3])
def test_interrupted_run_resumes_bit_for_bit(tmp_path, monkeypatch, steps_per_call):
    settings = dict(num_steps=8, learning_rate=1e-2, eval_every=4, checkpoint_every=2,
                    log_every=4, steps_per_call=steps_per_call)  # fmt: skip
    phases.upstream.upstream(smoke(tmp_path, **settings), tmp_path / "straight")

    with kill_at_batch(monkeypatch, 6), pytest.raises(Interrupted):
        phases.upstream.upstream(smoke(tmp_path, **settings), tmp_path / "resumed")
    assert checkpoint.TrainCheckpoints(tmp_path / "resumed/checkpoints/upstream").latest_step() == 4
    phases.upstream.upstream(smoke(tmp_path, **settings), tmp_path / "resumed")

    for name in ("patch_final", "patch"):
        info_a, a = patch_leaves(tmp_path / "straight" / name)
        info_b, b = patch_leaves(tmp_path / "resumed" / name)
        assert info_a["training"] == info_b["training"]
        assert a.keys() == b.keys()
        for path in a:
            np.testing.assert_array_equal(a[path], b[path], err_msg=f"{name}: {path}")


def test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = steps.make_mlm_train_step

    def poisoned(module, tx, label_tree, masking, *args):
        step = real(module, tx, label_tree, masking, *args)

        def run(state, batch):
            state, metrics = step(state, batch)
            poison = jnp.where(state.step == 5, jnp.nan, 1.0)
            params = jax.tree_util.tree_map(lambda x: x * poison, state.params)
            metrics["params_finite"] = steps.all_finite(masks.split(params, label_tree)[0])
            return state.replace(params=params), metrics

        return run

    monkeypatch.setattr(steps, "make_mlm_train_step", poisoned)
    # calls of 2 steps (checkpoints every 2) from a program of 4: step 5 is inside a call
    config = smoke(tmp_path, num_steps=10, eval_every=100, checkpoint_every=2, log_every=10,
                   steps_per_call=4)  # fmt: skip
    with pytest.raises(loop.TrainingDiverged, match=r"at step 5.*checkpoint \(step 4\)"):
        phases.upstream.upstream(config, tmp_path)
    assert checkpoint.TrainCheckpoints(tmp_path / "checkpoints/upstream").latest_step() == 4
    assert not (tmp_path / "upstream.done.json").exists()


def test_missing_corpus_fails_before_training(tmp_path, monkeypatch):
    config = smoke(tmp_path)
    config.upstream.train_file = str(tmp_path / "nope.jsonl")
    monkeypatch.setattr(phases.upstream, "fit", lambda **_: pytest.fail("training started"))
    with pytest.raises(Exception, match=r"nope\.jsonl: data file not found"):
        phases.upstream.upstream(config, tmp_path)


def headless_checkpoint(tmp_path, config, head="none"):
    """A tiny pretrained-format directory with no MLM head (as all-MiniLM-L6-v2; with
    head="mlm", one), its WordPiece vocabulary built on the smoke corpus."""
    texts = synthetic.corpus(config.axis, 60, 0)
    words = [w for tuples in synthetic.WORD_LISTS.values() for t in tuples for w in t]
    tokenizer = train_wordpiece(texts, 300, words)
    arch = common.random_architecture(config, tokenizer)
    module, params = models.from_config(arch, head=head, seed=5)
    return models.save_pretrained(tmp_path / f"base-{head}", module, params, tokenizer)


def test_headless_base_gets_a_head_warm_up_first(tmp_path, monkeypatch):
    config = smoke(tmp_path, "race_adapter", num_steps=4, head_warmup_steps=6, eval_every=3)
    config.model.init, config.model.name = "pretrained", str(headless_checkpoint(tmp_path, config))
    assert not models.has_mlm_head(config.model.name)
    runs = []
    real_fit = phases.upstream.fit

    def recording_fit(**kwargs):
        start = traverse_util.flatten_dict(jax.device_get(kwargs["state"].params))
        final, selection = real_fit(**kwargs)
        labels = traverse_util.flatten_dict(kwargs["label_tree"])
        runs.append((kwargs["settings"].name, start, labels,
                     traverse_util.flatten_dict(jax.device_get(final.params))))  # fmt: skip
        return final, selection

    monkeypatch.setattr(phases.upstream, "fit", recording_fit)
    phases.upstream.upstream(config, tmp_path / "run")
    (warm, warm_start, warm_labels, warm_final), (patch, patch_start, _, _) = runs
    assert (warm, patch) == ("upstream_head", "upstream")
    trained = {p for p, label in warm_labels.items() if label == "train"}
    assert trained and all(p[0] == "cls" for p in trained), "only the MLM head warms up"
    assert not any(masks.patch_name(p) for p in warm_start), "no patch during the warm-up"
    head = traverse_util.flatten_dict(checkpoint.load_tree(tmp_path / "run" / "head_warmup"))
    for path in trained:
        assert not np.array_equal(warm_final[path], warm_start[path]), path
        np.testing.assert_array_equal(patch_start[path], head[path])  # the patch starts on it
    for path, value in warm_start.items():
        if path not in trained:
            np.testing.assert_array_equal(patch_start[path], value)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").open()]
    assert {m["phase"] for m in metrics} >= {"upstream_head", "upstream"}

    # "never" skips it; a base with a head skips it under "auto"
    runs.clear()
    config.upstream.head_warmup = "never"
    phases.upstream.upstream(config, tmp_path / "never")
    assert [name for name, *_ in runs] == ["upstream"]
    config.upstream.head_warmup = "sometimes"
    with pytest.raises(ConfigError, match=r"config\.upstream\.head_warmup='sometimes'"):
        phases.upstream.upstream(config, tmp_path / "bad")
    config.upstream.head_warmup = "auto"
    config.model.name = str(headless_checkpoint(tmp_path, config, head="mlm"))
    assert not phases.upstream.needs_head_warmup(config)
    assert not phases.upstream.needs_head_warmup(smoke(tmp_path, "race_adapter"))  # random init


@pytest.mark.parametrize("keep", [1, 3])
def test_the_configured_number_of_checkpoints_is_kept_and_their_disk_use_logged(
    tmp_path, caplog, keep
):
    config = smoke(tmp_path, num_steps=6, eval_every=100, checkpoint_every=1, log_every=6,
                   keep_checkpoints=keep)  # fmt: skip
    with caplog.at_level(logging.INFO):
        phases.upstream.upstream(config, tmp_path)
    kept = checkpoint.TrainCheckpoints(tmp_path / "checkpoints" / "upstream").all_steps()
    assert kept == list(range(7 - keep, 7))
    saved = [
        r.getMessage() for r in caplog.records if "checkpoint of step 6 saved" in r.getMessage()
    ]
    assert saved and f"{keep} kept" in saved[0] and " MB in " in saved[0], saved
