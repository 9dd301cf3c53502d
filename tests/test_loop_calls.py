"""The training loop over random length mixes: every compiled call stacks batches of one
shape, calls stop at every log, eval and checkpoint step, and any `steps_per_call` trains
exactly what one step per call trains."""

import concurrent.futures
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from peftdebias_jax import masks
from peftdebias_jax.data import pipeline
from peftdebias_jax.training import loop, parallel, progress
from peftdebias_jax.training.state import TrainState, adamw

VOCAB, WIDTH = 50, 4


def toy_model(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "embed": jnp.asarray(rng.normal(size=(VOCAB, WIDTH)), jnp.float32),
        "w": jnp.asarray(rng.normal(size=(WIDTH,)), jnp.float32),
    }


def toy_step(tx):
    """Mean-pooled embeddings -> a scalar regressed on the batch's width and each row: the
    update depends on which rows, in which order and at which padded length."""

    def step(state: TrainState, batch: dict):
        def loss_fn(params):
            emb = params["embed"][batch["input_ids"]]
            mask = batch["attention_mask"][..., None].astype(jnp.float32)
            pooled = (emb * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
            target = batch["input_ids"].shape[1] / 64.0 + (batch["row"] % 3).astype(jnp.float32)
            return jnp.mean((pooled @ params["w"] - target) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return step


def random_case(seed: int) -> dict:
    """A length distribution (a mixture of short and long texts), a batch size and periods."""
    rng = np.random.default_rng(seed)
    count = int(rng.integers(20, 120))
    short, long = rng.integers(3, 14), rng.integers(20, 120)
    lengths = np.where(rng.random(count) < rng.uniform(0.2, 0.9), short, long)
    lengths = np.clip(lengths + rng.integers(-2, 30, count), 3, 128)
    sequences = [rng.integers(1, VOCAB, size=int(n)).astype(np.int32) for n in lengths]
    return dict(
        sequences=sequences,
        batch_size=int(rng.choice([2, 4])),
        run_length=int(rng.choice([1, 3, 10])),
        num_steps=int(rng.integers(15, 40)),
        log_every=int(rng.integers(1, 12)),
        eval_every=int(rng.integers(3, 15)),
        checkpoint_every=int(rng.integers(4, 16)),
    )


def train(tmp_path, case: dict, steps_per_call: int, seed: int, compile_ahead: bool = True):
    """fit on the case; returns final params, the metrics lines and the shapes of each call."""
    batches = pipeline.Batches(case["sequences"], case["batch_size"], 128, 0, seed,
                               run_length=case["run_length"])  # fmt: skip
    params = toy_model(seed)
    label_tree = masks.labels(params, [(".*", "train")])
    tx = masks.optimizer(adamw(1e-2, case["num_steps"], 1.0), label_tree)
    runner = parallel.Runner("single", case["batch_size"], compile_ahead=compile_ahead)
    calls = []
    real_put = runner.put_batches

    def spy(batch_list, slots):
        calls.append([b["input_ids"].shape for b in batch_list])
        return real_put(batch_list, slots)

    runner.put_batches = spy
    settings = loop.FitSettings(
        num_steps=case["num_steps"], eval_every=case["eval_every"], log_every=case["log_every"],
        checkpoint_every=case["checkpoint_every"], steps_per_call=steps_per_call,
    )  # fmt: skip

    def evaluate(device_state) -> dict:
        return {"eval_loss": float(jnp.sum(device_state.params["w"] ** 2))}

    workdir = tmp_path / f"k{steps_per_call}-{compile_ahead}"
    final, _ = loop.fit(
        state=TrainState.create(params, tx, seed), label_tree=label_tree, runner=runner,
        train_step=runner.compile_repeated(toy_step(tx), "toy step"), batches=batches,
        settings=settings, checkpoint_dir=workdir / "checkpoints",
        metrics_path=workdir / "metrics.jsonl", evaluate=evaluate,
        selection=loop.Selection("eval_loss", "min"),
    )  # fmt: skip
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return traverse_util.flatten_dict(jax.device_get(final.params)), lines, calls, runner


@pytest.mark.parametrize("seed", range(4))
def test_any_steps_per_call_trains_as_one_step_per_call_on_mixed_lengths(tmp_path, seed):
    case = random_case(seed)
    one, one_lines, one_calls, _ = train(tmp_path, case, 1, seed)
    boundaries = {
        s for p in (case["log_every"], case["eval_every"], case["checkpoint_every"])
        for s in range(p, case["num_steps"] + 1, p)
    } | {case["num_steps"]}  # fmt: skip
    assert len({shape for call in one_calls for shape in call}) >= 2, "several buckets"
    for k in (2, 3, 10):
        params, lines, calls, runner = train(tmp_path, case, k, seed)
        for call in calls:
            assert 0 < len(call) <= k and len(set(call)) == 1, f"one shape per call: {call}"
        assert len(calls[0]) == 1, "the first step is a call of its own"
        ends = set(np.cumsum([len(c) for c in calls]).tolist())
        assert boundaries <= ends, "every log, eval and checkpoint step ends a call"
        assert sum(len(c) for c in calls) == case["num_steps"]
        # each (bucket, call size) compiles once: the K-slot program per batch shape
        assert runner.compile_seconds > 0
        assert [x["step"] for x in lines] == [x["step"] for x in one_lines]
        for path in one:
            np.testing.assert_allclose(params[path], one[path], rtol=2e-5, atol=1e-6,
                                       err_msg=f"k={k} {path}")  # fmt: skip
        for a, b in zip(one_lines, lines, strict=True):
            for key in ("loss", "eval_loss"):
                if key in a:
                    assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (k, a["step"])


def test_each_shape_compiles_once(tmp_path, caplog):
    case = random_case(3)
    case.update(num_steps=30, log_every=5, eval_every=100, checkpoint_every=100)
    with caplog.at_level("INFO", logger="peftdebias_jax.training.parallel"):
        _, _, calls, _ = train(tmp_path, case, 10, 3)
    compiled = [r.getMessage() for r in caplog.records if "compiling toy step" in r.getMessage()]
    shapes = {call[0] for call in calls}
    assert len(compiled) == len(shapes), compiled


def test_later_buckets_compile_in_the_background(tmp_path, caplog):
    """After the first step, every other bucket the run trains on compiles in the
    background, once, before its first call: the same programs, so the same bits as
    compiling each at its first call."""
    case = random_case(5)
    case.update(num_steps=30, log_every=5, eval_every=100, checkpoint_every=100)
    with caplog.at_level("INFO", logger="peftdebias_jax.training.parallel"):
        ahead, ahead_lines, calls, runner = train(tmp_path, case, 10, 5)
    messages = [r.getMessage() for r in caplog.records]
    shapes = list(dict.fromkeys(call[0] for call in calls))
    assert len(shapes) >= 2, "several buckets"
    compiled = [m for m in messages if m.startswith("compiled toy step")]
    assert len(compiled) == len(shapes), compiled
    background = [m for m in compiled if m.endswith("(in the background)")]
    assert len(background) == len(shapes) - 1, compiled
    assert runner._background is None, "fit stops the compiling thread"
    plain, plain_lines, plain_calls, _ = train(tmp_path, case, 10, 5, compile_ahead=False)
    untimed = [[{k: v for k, v in x.items() if "per_s" not in k} for x in lines]
               for lines in (ahead_lines, plain_lines)]  # fmt: skip
    assert plain_calls == calls and untimed[0] == untimed[1]
    for path in plain:
        np.testing.assert_array_equal(ahead[path], plain[path], err_msg=str(path))


def test_a_background_compile_left_undone_compiles_at_its_call(tmp_path):
    """A compile still queued when the runner stops is dropped; the shape then compiles at
    its first call, as without compiling ahead."""
    runner = parallel.Runner("single", 2, compile_ahead=True)
    step = runner.compile(lambda s, b: (s + b["input_ids"].sum(), {}), "sum step", donate=False)
    state = jax.device_put(jnp.zeros((), jnp.int32))
    batches = [{"input_ids": np.ones((2, n), np.int32)} for n in (4, 8, 16)]
    for batch in batches:
        step.ahead(state, runner.put_batch(batch))
    runner.stop_background()
    assert all(isinstance(e, concurrent.futures.Future) for e in step.executables.values())
    results = [int(step(state, runner.put_batch(b))[0]) for b in batches]
    assert results == [8, 16, 32]


def test_logged_throughput_leaves_out_evaluation(tmp_path):
    """An evaluation that takes a second does not lower the next interval's examples/s."""
    import time

    sequences = [np.arange(1, 9, dtype=np.int32)] * 32  # one bucket: nothing to compile later
    batches = pipeline.Batches(sequences, 4, 16, 0, 0, lengths=[16])
    params = toy_model(0)
    label_tree = masks.labels(params, [(".*", "train")])
    tx = masks.optimizer(adamw(1e-2, 40, 1.0), label_tree)
    runner = parallel.Runner("single", 4)

    def slow_evaluate(device_state) -> dict:
        time.sleep(1.0)
        return {"eval_loss": 0.0}

    settings = loop.FitSettings(num_steps=40, eval_every=10, log_every=5, checkpoint_every=100,
                                steps_per_call=5)  # fmt: skip
    loop.fit(state=TrainState.create(params, tx, 0), label_tree=label_tree, runner=runner,
             train_step=runner.compile_repeated(toy_step(tx), "toy step"), batches=batches,
             settings=settings, checkpoint_dir=tmp_path / "ckpt",
             metrics_path=tmp_path / "metrics.jsonl", evaluate=slow_evaluate)  # fmt: skip
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rates = {x["step"]: x["examples_per_s"] for x in lines if "examples_per_s" in x}
    # 5 steps of 4 examples: with the 1 s evaluation counted the rate would be below 20/s
    for step in (15, 25, 35):  # the intervals right after an evaluation
        assert rates[step] > 100, rates
    # 8 real tokens of 16 in every row: half of what the steps ran on is padding
    logged = [x for x in lines if "padding" in x]
    assert len(logged) == 8 and all(x["padding"] == 0.5 for x in logged)
    assert all(x["real_tokens_per_s"] == pytest.approx(8 * x["examples_per_s"]) for x in logged)


def test_progress_line_shows_no_speed_before_it_has_measured_one(monkeypatch):
    """The first update starts the clock (compiling is not counted): no ex/s or ETA yet,
    rather than a made-up 0.0; the next update divides that interval's examples."""
    ticks = iter([100.0, 104.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(ticks))
    bar = progress.Progress(total=30, start=0, name="upstream", stream=io.StringIO())
    first = bar.update(10, 320, loss=2.0)
    assert first.endswith("| -- ex/s | ETA --"), first
    second = bar.update(20, 320, loss=1.5)
    assert "| 80.0 ex/s | ETA 0:00:04" in second, second
