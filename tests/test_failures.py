"""Runs that fail well: a short message and the right exit status for bad commands and
input, signals that stop training at a checkpoint and resume bit for bit, damaged
checkpoints and killed saves recovered from, metrics written once per step."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_upstream import kill_at_batch, patch_leaves, smoke

from peftdebias_jax import checkpoint, command_line, files, phases
from peftdebias_jax.data import pipeline, records
from peftdebias_jax.data.records import DataError
from peftdebias_jax.errors import CheckpointError, ConfigError
from peftdebias_jax.training import interrupts

ROOT = Path(__file__).resolve().parents[1]


def run_py(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def assert_short(result: subprocess.CompletedProcess, status: int, *needles: str) -> None:
    assert result.returncode == status, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    for needle in needles:  # in the message (a list of missing files spans lines)
        assert needle in result.stderr, result.stderr[-2000:]


def test_help_lists_the_configs_and_presets():
    result = run_py("--help")
    assert result.returncode == 0, result.stderr
    assert "race_adapter" in result.stdout and "gender_lora" in result.stdout
    assert '"demo"' in result.stdout and "__init__" not in result.stdout


def test_a_missing_config_file_is_named():
    assert_short(run_py("--config=configs/no_such.py:demo"), 2, "configs/no_such.py")


def test_a_config_key_typo_names_the_key_and_the_closest(tmp_path):
    result = run_py("--config=configs/race_adapter.py:smoke", "--config.upstream.learning_rat=1",
                    f"--workdir={tmp_path}")  # fmt: skip
    assert_short(result, 2, "config.upstream.learning_rat", "learning_rate")
    assert not (tmp_path / "config.json").exists()


def test_a_missing_input_names_its_key_before_anything_runs(tmp_path):
    result = run_py("--config=configs/race_adapter.py:smoke",
                    f"--config.downstream.test_file={tmp_path}/gone.jsonl",
                    f"--workdir={tmp_path}/work")  # fmt: skip
    assert_short(result, 2, "config.downstream.test_file")
    assert not (tmp_path / "work").exists()


def test_a_workdir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "work").write_text("not a directory")
    result = run_py("--config=configs/race_adapter.py:smoke", f"--workdir={tmp_path}/work")
    assert_short(result, 2, str(tmp_path / "work"), "--workdir")


def test_sigterm_stops_at_a_checkpoint_and_the_same_command_resumes(tmp_path):
    command = [sys.executable, "run.py", "--config=configs/race_adapter.py:smoke",
               "--config.upstream.num_steps=100000", "--config.upstream.checkpoint_every=50",
               "--config.upstream.eval_every=100000", "--config.upstream.log_every=50",
               f"--workdir={tmp_path}"]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    checkpoints = tmp_path / "checkpoints" / "upstream"
    deadline = time.time() + 240
    while not (checkpoints.exists() and any(checkpoints.iterdir())) and time.time() < deadline:
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr and "interrupted at step" in stderr, stderr[-2000:]
    step = int(stderr.split("interrupted at step ")[1].split()[0])
    assert checkpoint.TrainCheckpoints(checkpoints).latest_step() == step
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert logged[-1]["step"] == step, "the interrupted call's metrics are logged"


@pytest.mark.parametrize("steps_per_call", [1, 3])
def test_a_signal_stops_at_the_end_of_the_call_and_resumes_bit_for_bit(
    tmp_path, monkeypatch, steps_per_call
):
    settings = dict(num_steps=8, learning_rate=1e-2, eval_every=4, checkpoint_every=4,
                    log_every=4, steps_per_call=steps_per_call)  # fmt: skip
    phases.upstream.upstream(smoke(tmp_path, **settings), tmp_path / "straight")

    real, calls = pipeline.Batches.next_call, []

    def signalled(self, epoch, index, limit):
        calls.append(limit)
        if len(calls) == 2:  # the signal arrives while the second call is prepared
            interrupts.REQUESTS.handle(signal.SIGINT, None)
        return real(self, epoch, index, limit)

    with monkeypatch.context() as patched:
        patched.setattr(pipeline.Batches, "next_call", signalled)
        with pytest.raises(interrupts.Interrupted, match="interrupted at step") as err:
            phases.upstream.upstream(smoke(tmp_path, **settings), tmp_path / "resumed")
    stopped = err.value.step
    assert err.value.exit_status == 130 and 0 < stopped < 8
    assert (
        checkpoint.TrainCheckpoints(tmp_path / "resumed/checkpoints/upstream").all_steps()[-1]
        == stopped
    )
    phases.upstream.upstream(smoke(tmp_path, **settings), tmp_path / "resumed")
    for name in ("patch_final", "patch"):
        _, a = patch_leaves(tmp_path / "straight" / name)
        _, b = patch_leaves(tmp_path / "resumed" / name)
        for path in a:
            np.testing.assert_array_equal(a[path], b[path], err_msg=f"{name}: {path}")


def test_outside_training_a_signal_interrupts_at_once():
    with pytest.raises(KeyboardInterrupt):
        interrupts.REQUESTS.handle(signal.SIGTERM, None)


def test_a_damaged_latest_checkpoint_falls_back_to_an_older_one(tmp_path, monkeypatch):
    settings = dict(num_steps=8, learning_rate=1e-2, eval_every=100, checkpoint_every=2,
                    log_every=1)  # fmt: skip
    phases.upstream.upstream(smoke(tmp_path, **settings), tmp_path / "straight")
    with kill_at_batch(monkeypatch, 7), pytest.raises(Exception, match="killed"):
        phases.upstream.upstream(smoke(tmp_path, **settings), tmp_path / "resumed")
    directory = tmp_path / "resumed/checkpoints/upstream"
    assert checkpoint.TrainCheckpoints(directory).all_steps()[-2:] == [4, 6]
    for path in (directory / "6").rglob("*"):  # truncate every file of the latest
        if path.is_file():
            path.write_bytes(path.read_bytes()[:7])
    phases.upstream.upstream(smoke(tmp_path, **settings), tmp_path / "resumed")
    _, a = patch_leaves(tmp_path / "straight" / "patch_final")
    _, b = patch_leaves(tmp_path / "resumed" / "patch_final")
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=path)
    steps = [r["step"] for r in map(json.loads, (tmp_path / "resumed/metrics.jsonl").open())
             if r["phase"] == "upstream" and "loss" in r]  # fmt: skip
    assert steps == list(range(1, 9)), "each step logged once, in order"


def test_a_killed_save_is_put_right_at_start(tmp_path):
    (tmp_path / "patch").mkdir()
    (tmp_path / ".patch.tmp-0123abcd").mkdir()  # a staging copy: removed
    (tmp_path / ".patch.old-4567abcd").mkdir()  # an old copy beside its target: removed
    (tmp_path / ".patch_final.old-89abcdef").mkdir()  # killed between the renames: restored
    (tmp_path / ".patch_final.old-89abcdef" / "patch.json").write_text("{}")
    done = files.recover_staged(tmp_path)
    assert len(done) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patch", "patch_final"]
    assert (tmp_path / "patch_final" / "patch.json").read_text() == "{}"


@pytest.mark.parametrize(
    ("error", "status", "needle"),
    [
        (ConfigError("config.upstream.batch_size must be positive"), 2, "batch_size"),
        (OSError(errno.ENOSPC, "No space left on device", "/w/ckpt"), 1, "disk is full"),
        (PermissionError(errno.EACCES, "Permission denied", "/w"), 2, "--workdir"),
        (RuntimeError("tensorstore: bad chunk\nmore"), 1, "RuntimeError: tensorstore: bad chunk"),
        (KeyboardInterrupt("SIGTERM"), 143, "rerun the same command"),
    ],
)
def test_each_failure_gets_one_message_and_its_status(tmp_path, error, status, needle):
    failure = command_line.describe_failure(error, tmp_path, verbose=False)
    assert failure.status == status and needle in failure.message
    assert "\n" not in failure.message
    if not isinstance(error, KeyboardInterrupt):
        assert (tmp_path / command_line.ERROR_LOG).exists() and "error.log" in failure.hint
    loud = command_line.describe_failure(error, tmp_path, verbose=True)
    assert isinstance(error, KeyboardInterrupt) or type(error).__name__ in loud.hint


def test_the_console_shows_a_header_not_the_whole_config(tmp_path, capsys):
    config = smoke(tmp_path, num_steps=2)
    config.phases = ("upstream",)
    phases.run(config, tmp_path / "work")
    out = capsys.readouterr().out
    assert '"upstream": {' not in out and str(tmp_path / "work" / "config.json") in out
    assert os.path.exists(tmp_path / "work" / "config.json")


def test_numeric_settings_out_of_range_are_named_before_anything_runs(tmp_path):
    config = smoke(tmp_path)
    config.upstream.batch_size = 0
    config.downstream.learning_rate = float("nan")
    config.upstream.mlm_probability = 1.5
    with pytest.raises(ConfigError) as err:
        phases.run(config, tmp_path / "work")
    for key in ("upstream.batch_size", "downstream.learning_rate", "upstream.mlm_probability"):
        assert f"config.{key} must be" in str(err.value)
    assert not (tmp_path / "work").exists()


def test_bad_task_data_is_found_before_upstream_trains(tmp_path, monkeypatch):
    monkeypatch.setattr(phases.upstream, "fit", lambda **_: pytest.fail("upstream trained"))
    rows = [{"text": f"post {i}", "label": "1" if i % 2 else "0"} for i in range(20)]
    rows[12]["label"] = "maybe"
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = smoke(tmp_path, name="race_adapter")
    config.downstream.train_file = str(train)
    with pytest.raises(DataError, match=r"train\.jsonl.*line 13"):
        phases.run(config, tmp_path / "work")
    config = smoke(tmp_path, name="race_adapter")
    config.phases = ("upstream", "transfer")
    config.transfer.task = "lhcc"
    with pytest.raises(DataError, match=r"config\.transfer\.task: unknown task 'lhcc'"):
        phases.run(config, tmp_path / "work2")


def finished_upstream(tmp_path, **upstream):
    config = smoke(tmp_path, num_steps=2, eval_every=2, checkpoint_every=2, **upstream)
    config.phases = ("upstream",)
    return config


def test_changed_settings_of_a_finished_phase_are_refused_and_nothing_is_touched(tmp_path):
    work = tmp_path / "work"
    phases.run(finished_upstream(tmp_path, learning_rate=1e-3), work)
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError) as err:
        phases.run(finished_upstream(tmp_path, learning_rate=2e-3), work)
    message = str(err.value)
    assert "upstream (finished): config.upstream.learning_rate: 0.001 -> 0.002" in message
    assert "--rerun=upstream" in message
    assert {p: p.read_bytes() for p in work.rglob("*") if p.is_file()} == before
    # a key that cannot change results is no reason to refuse
    phases.run(finished_upstream(tmp_path, learning_rate=1e-3, log_every=7), work)
    assert (work / "patch" / "patch.json").read_bytes() == before[work / "patch" / "patch.json"]


def test_rerun_clears_the_phase_and_computes_it_with_the_new_settings(tmp_path):
    work = tmp_path / "work"
    phases.run(finished_upstream(tmp_path, learning_rate=1e-3), work)
    _, old = patch_leaves(work / "patch_final")
    phases.run(finished_upstream(tmp_path, learning_rate=5e-2), work, rerun=["upstream"])
    _, new = patch_leaves(work / "patch_final")
    assert any(not np.array_equal(old[k], new[k]) for k in old), "upstream trained again"
    record = json.loads((work / "phases.json").read_text())["upstream"]
    assert record["state"] == "finished"
    assert record["settings"]["upstream.learning_rate"] == 5e-2
    assert json.loads((work / "config.json").read_text())["upstream"]["learning_rate"] == 5e-2
    with pytest.raises(ConfigError, match="not among the configured phases"):
        phases.run(finished_upstream(tmp_path), work, rerun=["downstream"])


def test_a_truncated_patch_is_named(tmp_path):
    work = tmp_path / "work"
    phases.run(finished_upstream(tmp_path), work)
    for path in (work / "patch" / "weights").rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[:5])
    module, params = phases.common.build_model(finished_upstream(tmp_path), "mlm",
                                               tokenizer=phases.common.tokenizer_for(
                                                   finished_upstream(tmp_path), work))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"patch/weights: does not restore"):
        checkpoint.load_patch(work / "patch", module, params)


def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path):
    path = tmp_path / "posts.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"posts\.jsonl, line 3: not UTF-8 text \(byte 0xe9\)"):
        records.read_records(path)


def test_a_failed_save_names_its_directory_and_keeps_the_old_copy(tmp_path, monkeypatch):
    target = tmp_path / "best"
    checkpoint.save_tree(target, {"w": np.ones(3, np.float32)})

    def broken(self, *args, **kwargs):
        raise ValueError("tensorstore: write failed\nsecond line")

    monkeypatch.setattr(checkpoint.ocp.StandardCheckpointer, "save", broken)
    with pytest.raises(CheckpointError, match=r"best: writing a checkpoint failed \(ValueError"):
        checkpoint.save_tree(target, {"w": np.zeros(3, np.float32)})
    np.testing.assert_array_equal(checkpoint.load_tree(target)["w"], np.ones(3, np.float32))

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(checkpoint.ocp.StandardCheckpointer, "save", full)
    with pytest.raises(OSError) as err:
        checkpoint.save_tree(target, {"w": np.zeros(3, np.float32)})
    assert command_line.classify(err.value) == (f"{target}: the disk is full; free space, then "
                                                f"{command_line.RESUME}", 1)  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["best"], "no staging copy is left"


def test_bad_upstream_settings_are_found_before_anything_trains(tmp_path):
    config = smoke(tmp_path, name="race_adapter")
    config.upstream.word_list_key = "religon"
    with pytest.raises(ConfigError, match=r"config\.upstream\.word_list_key.*'religon'"):
        phases.run(config, tmp_path / "work")
    config = smoke(tmp_path, name="race_adapter")
    config.patch.reduction_factor = 0
    with pytest.raises(ConfigError, match=r"config\.patch"):
        phases.run(config, tmp_path / "work")
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(("edit", "value"), [("reduction_factor", 2), ("mh_adapter", True)])
def test_an_edited_patch_json_is_named_as_such(tmp_path, edit, value):
    work = tmp_path / "work"
    phases.run(finished_upstream(tmp_path), work)
    info_path = work / "patch" / "patch.json"
    info = json.loads(info_path.read_text())
    info["patch"][edit] = value
    info_path.write_text(json.dumps(info))
    config = finished_upstream(tmp_path)
    tokenizer = phases.common.tokenizer_for(config, work)
    module, params = phases.common.build_model(config, "mlm", tokenizer=tokenizer)
    with pytest.raises(CheckpointError, match="do not make the leaves it lists as stored"):
        checkpoint.load_patch(work / "patch", module, params)


def test_a_guessed_text_column_is_named_in_the_error(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"id": 1, "body": "some text"}) + "\n")
    with pytest.raises(DataError, match=r"field 'id' is not text \(no 'text' column"):
        records.texts(path)


def test_a_bad_benchmark_file_is_found_before_anything_trains(tmp_path, monkeypatch):
    monkeypatch.setattr(phases.upstream, "fit", lambda **_: pytest.fail("upstream trained"))
    crows = tmp_path / "crows.csv"
    crows.write_text("sent_more,sent_less\na,b\n")
    config = smoke(tmp_path, name="race_adapter")
    config.evaluate.crows_file = str(crows)
    with pytest.raises(DataError, match=r"crows\.csv"):
        phases.run(config, tmp_path / "work")
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("downstream.trainable", "bitfitt"),
        ("downstream.groups", "nope"),
        ("upstream.head_warmup", "sometimes"),
        ("parallel.mode", "tpu"),
        ("downstream.class_weights", "1=heavy"),
        ("beft.mode", "v3"),
    ],
)
def test_an_unknown_choice_is_named_before_anything_trains(tmp_path, monkeypatch, key, value):
    monkeypatch.setattr(phases.upstream, "fit", lambda **_: pytest.fail("upstream trained"))
    config = smoke(tmp_path, name="race_adapter")
    section, field = key.split(".")
    setattr(config[section], field, value)
    with pytest.raises(ConfigError, match=rf"config\.{section}\.{field}="):
        phases.run(config, tmp_path / "work")
    assert not (tmp_path / "work").exists()
