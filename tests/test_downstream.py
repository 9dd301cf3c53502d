"""The downstream phase: upstream patch -> frozen in fine-tuning -> predictions and metrics."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from config_fixtures import load_config
from fit_fixtures import spy_on_fit

from peftdebias_jax import checkpoint, masks, models, phases
from peftdebias_jax.data import pipeline
from peftdebias_jax.data.records import DataError
from peftdebias_jax.errors import CheckpointError
from peftdebias_jax.phases import downstream


def tiny(name, **downstream_settings):
    config = load_config(name, "smoke")
    config.upstream.num_steps = 3
    config.downstream.update(downstream_settings)
    return config


def test_upstream_patch_stays_frozen_downstream(tmp_path, monkeypatch):
    config = tiny("gender_adapter", num_steps=8, learning_rate=1e-3, synthetic_size=64)
    phases.upstream.upstream(config, tmp_path)
    captured = spy_on_fit(monkeypatch, downstream)
    results = phases.downstream.downstream(config, tmp_path)

    start, final, labels = captured["start"], captured["final"], captured["labels"]
    patch_paths = [p for p in start if masks.patch_name(p) == "debias"]
    assert patch_paths
    for path in patch_paths:
        np.testing.assert_array_equal(final[path], start[path])
        assert labels[path] == "freeze"
    for path in start:
        if "LayerNorm" in path:  # frozen as in the reference code
            np.testing.assert_array_equal(final[path], start[path])
    moved = [p for p in start if labels[p] == "train" and not np.array_equal(final[p], start[p])]
    assert ("classifier", "kernel") in moved and len(moved) > 10

    for split in ("validation", "test"):
        scores = results[split]
        assert 0 <= scores["accuracy"] <= 100 and "tpr_gap" in scores and "tpr_gaps" in scores
        rows = [json.loads(x) for x in (tmp_path / "predictions" / f"{split}.jsonl").open()]
        assert rows and set(rows[0]) >= {"index", "id", "text", "gold", "predicted", "group"}
        assert {r["predicted"] for r in rows} <= set(results["labels"])
    assert json.loads((tmp_path / "downstream.done.json").read_text())["task"] == "bias_bios"
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").open()]
    assert any(m.get("phase") == "downstream" and "eval_accuracy" in m for m in metrics)


def test_ft_baseline_has_no_patch_and_fprd_for_hate(tmp_path, monkeypatch):
    captured = spy_on_fit(monkeypatch, downstream)
    results = phases.downstream.downstream(tiny("race_ft", num_steps=4), tmp_path)
    assert not any(masks.patch_name(p) for p in captured["start"])
    for key in ("fprd_reference", "fprd_dixon", "fpr_reference_per_term", "macro_f1"):
        assert key in results["validation"], key


def test_the_best_models_validation_scores_reuse_its_evaluation(tmp_path, monkeypatch):
    """The validation set is scored once per evaluation, not again after training: the
    best model's predictions are the ones its evaluation made."""
    passes = []
    evaluation = pipeline.Batches.evaluation

    def counted(self):
        passes.append(id(self))
        return evaluation(self)

    monkeypatch.setattr(pipeline.Batches, "evaluation", counted)
    config = tiny("race_ft", num_steps=4, eval_every=2)
    results = phases.downstream.downstream(config, tmp_path)
    assert passes.count(passes[0]) == 2, "steps 2 and 4; the best's scores are reused"
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").open()]
    best = results["selection"]["step"]
    scored = next(m for m in metrics if m.get("step") == best and "eval_macro_f1" in m)
    assert results["validation"]["macro_f1"] == pytest.approx(scored["eval_macro_f1"])
    rows = [json.loads(x) for x in (tmp_path / "predictions" / "validation.jsonl").open()]
    accuracy = 100 * np.mean([r["predicted"] == r["gold"] for r in rows])
    assert results["validation"]["accuracy"] == pytest.approx(accuracy)


def scripted_selection(monkeypatch, f1_per_evaluation):
    """Makes the evaluations during training score these macro-F1s, in order (the final
    scoring, with bootstrap settings, is left as it is)."""
    scores = iter(f1_per_evaluation)
    real = downstream.score_split

    def scripted(*args):
        result = real(*args)
        return result if len(args) > 5 else {**result, "macro_f1": next(scores)}

    monkeypatch.setattr(downstream, "score_split", scripted)


@pytest.mark.parametrize(
    ("f1s", "best"), [((0.5, 0.4, 0.3), 2), ((0.5, 0.4, 0.9), 6)], ids=["earlier", "last"]
)
def test_the_best_weights_are_written_once(tmp_path, monkeypatch, f1s, best):
    """The best step's trainable weights are kept in downstream_best/ unless the best is the
    last step, whose weights the final checkpoint already holds (an earlier best, beaten at
    the last step, is removed). The validation scores are the best step's."""
    scripted_selection(monkeypatch, f1s)
    config = tiny("race_ft", num_steps=6, eval_every=2, checkpoint_every=2, keep_checkpoints=3)
    results = phases.downstream.downstream(config, tmp_path)
    assert results["selection"]["step"] == best
    assert (tmp_path / downstream.BEST_DIR).exists() == (best != 6)
    chosen = downstream.best_trainable(tmp_path, results)
    expected = checkpoint.saved_state(tmp_path / downstream.TRAIN_DIR, best)["params"]
    other = checkpoint.saved_state(tmp_path / downstream.TRAIN_DIR, 4)["params"]
    flat = {k: dict(jax.tree_util.tree_flatten_with_path(t)[0]) for k, t in
            (("chosen", chosen), ("expected", expected), ("other", other))}  # fmt: skip
    assert flat["chosen"].keys() == flat["expected"].keys()
    for path, value in flat["chosen"].items():
        np.testing.assert_array_equal(value, flat["expected"][path])
    assert any(not np.array_equal(v, flat["other"][p]) for p, v in flat["chosen"].items())
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").open()]
    scored = next(m for m in metrics if m.get("step") == best and "eval_accuracy" in m)
    assert results["validation"]["accuracy"] == pytest.approx(scored["eval_accuracy"])


def test_a_finished_phase_keeps_its_last_step_without_the_optimizer_state(tmp_path):
    """The last checkpoint of a finished phase holds weights, step and rng but not AdamW's
    moments (twice the weights under full fine-tuning); the phase still restores from it,
    and training on past it is refused with what to do."""
    config = tiny("race_ft", num_steps=4, eval_every=4, checkpoint_every=2)
    first = phases.downstream.downstream(config, tmp_path)
    directory = tmp_path / "checkpoints" / "downstream"
    with ocp.StandardCheckpointer() as reader:
        earlier, last = (reader.restore(directory / str(s) / "state") for s in (2, 4))
    assert "opt_state" in earlier and "opt_state" not in last and int(last["step"]) == 4

    def size(step):
        return sum(f.stat().st_size for f in (directory / str(step)).rglob("*") if f.is_file())

    assert size(4) < size(2) / 2, (size(4), size(2))
    (tmp_path / "downstream.done.json").unlink()  # as if stopped after training
    again = phases.downstream.downstream(config, tmp_path)
    assert again["validation"]["accuracy"] == first["validation"]["accuracy"]
    (tmp_path / "downstream.done.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.downstream\.num_steps=4"):
        phases.downstream.downstream(tiny("race_ft", num_steps=6, eval_every=4), tmp_path)


def test_transfer_a_patch_to_another_dataset(tmp_path):
    source = tiny("race_lora")
    phases.upstream.upstream(source, tmp_path / "ghc")
    target = tiny("race_ft", task="stormfront", num_steps=3)
    target.downstream.patches = (str(tmp_path / "ghc" / "patch"),)
    target.model.init = "random"
    (tmp_path / "stormfront").mkdir()
    # the transferred patch was trained on the source run's base: same tokenizer and weights
    (tmp_path / "stormfront" / "tokenizer").symlink_to(tmp_path / "ghc" / "tokenizer")
    results = phases.downstream.downstream(target, tmp_path / "stormfront")
    assert results["task"] == "stormfront" and "fprd_reference" in results["test"]


def test_bad_data_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(downstream, "fit", lambda **_: pytest.fail("training started"))
    bad = tmp_path / "train.jsonl"
    bad.write_text(
        '{"text": "a", "p": "nurse", "g": "f"}\n{"text": "b", "p": "astronaut", "g": "m"}\n'
    )
    config = tiny("gender_ft", train_file=str(bad))
    with pytest.raises(DataError, match=r"train\.jsonl, line 2: label 'astronaut'"):
        phases.downstream.downstream(config, tmp_path)
    config = tiny("gender_ft", extra_evals=(f"iptts={tmp_path / 'nope.csv'}",))
    with pytest.raises(DataError, match=r"nope\.csv: data file not found"):
        phases.downstream.downstream(config, tmp_path)


def test_full_debias_dense_upstream_then_fine_tuning(tmp_path, monkeypatch):
    import torch
    import transformers

    config = tiny("gender_full_debias", num_steps=3)
    config.upstream.update(num_steps=4, learning_rate=1e-2)
    captured = spy_on_fit(monkeypatch, phases.upstream)
    dense_dir = phases.upstream.upstream(config, tmp_path)
    assert dense_dir == tmp_path / "dense_model"
    start, final = captured["start"], captured["final"]
    for path in start:
        frozen = "LayerNorm" in path or path[-2:] == ("decoder", "kernel")
        changed = not np.array_equal(final[path], start[path])
        assert changed == (not frozen), path
    # the exported base loads in transformers and computes what our model computes
    reference = transformers.BertForMaskedLM.from_pretrained(dense_dir).eval()
    module, params = models.from_pretrained(dense_dir, head="mlm")
    ids = np.array([[2, 10, 11, 12, 3]])
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(
        np.asarray(module.apply({"params": params}, ids)), expected, atol=1e-4
    )

    results = phases.downstream.downstream(config, tmp_path)
    assert "tpr_gap" in results["test"]


def test_l1_penalty_by_hand():
    import jax.numpy as jnp

    from peftdebias_jax.training import steps

    trainable = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([[0.5]])}
    anchor = {"a": jnp.array([0.0, 0.0]), "b": jnp.array([[1.0]])}
    value = steps.l1_penalty(trainable, anchor, 0.1, total_params=10)
    assert float(value) == pytest.approx(0.1 * (1 + 2 + 0.5) / 10)
    grads = jax.grad(steps.l1_penalty)(trainable, anchor, 0.1, 10)
    np.testing.assert_allclose(grads["a"], [0.01, -0.01])
    np.testing.assert_allclose(grads["b"], [[-0.01]])


@pytest.mark.parametrize("name", ["gender_transfer"])  # race_transfer: test_end_to_end.py
def test_transfer_configs_smoke(tmp_path, name):
    from conftest import SHARED_DATA

    config = tiny(name, num_steps=3)
    if name.startswith("gender"):
        config.downstream.bias_nli_occupations = str(SHARED_DATA / "bias_nli/occupations")
        config.downstream.bias_nli_gendered_words = str(SHARED_DATA / "bias_nli/gendered_words")
    phases.upstream.upstream(config, tmp_path)
    results = phases.downstream.downstream(config, tmp_path)
    assert results["task"] == ("mnli" if name.startswith("gender") else "lhc")
    assert results["test"]["accuracy"] >= 0
    if name.startswith("gender"):
        assert results["bias_nli"]["examples"] == 164 * 6 * 5
        assert 0 <= results["bias_nli"]["fn"] <= 1
    else:
        assert "fprd_reference" in results["test"]
