"""The upstream phase on a tiny random model: it learns, resumes exactly, fails loudly."""

import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from config_fixtures import load_config
from conftest import SHARED_DATA
from flax import traverse_util

from peftdebias_jax import checkpoint, masks, phases
from peftdebias_jax.data import pipeline
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
