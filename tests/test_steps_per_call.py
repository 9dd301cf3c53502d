"""Several steps per compiled call (`steps_per_call`): the same training as one step per
call, calls that stop at every log, eval and checkpoint step, and clear setting errors."""

import json

import jax
import numpy as np
import pytest
from test_upstream import patch_leaves, smoke

from peftdebias_jax import phases
from peftdebias_jax.errors import ConfigError
from peftdebias_jax.training import loop


def test_calls_stop_at_every_boundary_and_the_last_step():
    settings = loop.FitSettings(num_steps=23, eval_every=10, log_every=4, steps_per_call=8)
    periods = [settings.log_every, settings.eval_every]
    done, calls = 0, []
    while done < settings.num_steps:
        calls.append(loop.steps_until_boundary(done, periods, settings))
        done += calls[-1]
    assert calls == [4, 4, 2, 2, 4, 4, 3]
    ends = np.cumsum(calls)
    assert {4, 8, 10, 12, 16, 20, 23} <= set(ends.tolist())  # every boundary is a call's end


@pytest.mark.parametrize("key", ["steps_per_call", "log_every", "eval_every"])
@pytest.mark.parametrize("value", [0, -2, 1.5])
def test_bad_settings_name_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"config\.upstream\.{key} must be a positive integer"):
        loop.FitSettings(num_steps=5, source="config.upstream", **{"eval_every": 5, key: value})


def run_upstream(tmp_path, steps_per_call):
    config = smoke(tmp_path, num_steps=10, learning_rate=1e-2, eval_every=5, log_every=6,
                   checkpoint_every=6, steps_per_call=steps_per_call)  # fmt: skip
    phases.upstream.upstream(config, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return patch_leaves(tmp_path / "patch_final")[1], lines


def test_many_steps_per_call_train_as_one_step_per_call(tmp_path):
    one, one_lines = run_upstream(tmp_path / "one", 1)
    # calls of 4, 1, 1 and 4 steps (boundaries at 5, 6 and 10) from one program of 4 slots
    four, four_lines = run_upstream(tmp_path / "four", 4)
    assert one.keys() == four.keys() and one
    for path in one:
        np.testing.assert_allclose(four[path], one[path], rtol=2e-5, atol=1e-6, err_msg=path)
    assert [x["step"] for x in four_lines] == [x["step"] for x in one_lines] == [5, 5, 6, 10, 10]
    for a, b in zip(one_lines, four_lines, strict=True):
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a["step"])


def test_unused_slots_run_nothing():
    """A call with count < slots applies `count` steps; later metric slots stay zero."""
    import optax

    from peftdebias_jax.training import steps
    from peftdebias_jax.training.state import TrainState

    tx = optax.sgd(0.1)

    def step(state, batch):
        loss = (state.params["w"] - batch["x"]) ** 2
        grads = {"w": 2 * (state.params["w"] - batch["x"])}
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), {
            "loss": loss
        }

    state = TrainState.create({"w": jax.numpy.float32(0.0)}, tx, 0)
    xs = {"x": np.asarray([1.0, 2.0, 3.0, 4.0], np.float32)}
    final, metrics = jax.jit(steps.repeated(step))(state, xs, np.int32(2))
    expected = state
    for x in (1.0, 2.0):
        expected, _ = step(expected, {"x": np.float32(x)})
    assert int(final.step) == 2
    np.testing.assert_allclose(final.params["w"], expected.params["w"], rtol=1e-6)
    assert metrics["loss"].shape == (4,)
    np.testing.assert_allclose(metrics["loss"], [1.0, (2.0 - 0.2) ** 2, 0.0, 0.0], rtol=1e-6)


def test_a_repeated_step_is_traced_once():
    """The loop body reuses the trace made for the metrics' shapes: tracing a BERT-base
    train step costs seconds, once per bucket."""
    from peftdebias_jax.training import steps

    traces = []

    def step(state, batch):
        traces.append(batch["x"].shape)
        return state + batch["x"].sum(), {"loss": batch["x"].sum()}

    xs = {"x": np.ones((4, 3), np.float32)}
    jax.jit(steps.repeated(step)).lower(np.float32(0.0), xs, np.int32(2))
    assert traces == [(3,)]
