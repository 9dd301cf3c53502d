"""Several processes as one run, as a user starts them: run.py twice on 127.0.0.1 (2
processes x 2 CPU devices) against one process with 4 devices. Same trained patch and
downstream weights, only process 0's files in the workdir, and a kill of both processes
mid-downstream followed by a rerun ends bit-identical to the uninterrupted run; the
intrinsic evaluation, split over the processes, gives the one-process numbers; packed
batches split over the processes train as on one."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/race_adapter.py:smoke"
# 18 downstream steps, a checkpoint every 3: room to kill a run between two of them
SETTINGS = [
    "--config.downstream.epochs=3",
    "--config.phases=('upstream','downstream','evaluate')",
    "--config.evaluate.minimal_pairs=('race',)",  # CrowS-style scoring, split over processes
]
LIMIT_S = 400


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(devices: int) -> dict[str, str]:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")


def start(workdir: Path, processes: int, devices: int, extra: list[str]) -> list[subprocess.Popen]:
    """run.py once per process (each in its own session, so its group can be ended)."""
    command = [sys.executable, "run.py", f"--config={CONFIG}", f"--workdir={workdir}", *SETTINGS]
    if processes > 1:
        port = free_port()
        command += [
            "--config.parallel.distributed=True",
            f"--config.parallel.coordinator_address=127.0.0.1:{port}",
            f"--config.parallel.num_processes={processes}",
            "--config.parallel.startup_timeout=60",
        ]
    return [
        subprocess.Popen(
            [*command, *extra] + ([f"--config.parallel.process_id={i}"] if processes > 1 else []),
            cwd=ROOT,
            env=environment(devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for i in range(processes)
    ]


def end(runs: list[subprocess.Popen]) -> None:
    for run in runs:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        run.wait()


def finish(runs: list[subprocess.Popen]) -> list[str]:
    """Each process's output once all have exited 0 (all are ended on a failure)."""
    try:
        outputs = [run.communicate(timeout=LIMIT_S)[0] for run in runs]
    finally:
        end(runs)
    for i, (run, output) in enumerate(zip(runs, outputs, strict=True)):
        assert run.returncode == 0, f"process {i} exited {run.returncode}:\n{output[-4000:]}"
    return outputs


def trained(workdir: Path) -> dict[str, np.ndarray]:
    """The final patch's leaves and the downstream phase's last trainable weights."""
    with ocp.StandardCheckpointer() as checkpointer:
        patch = checkpointer.restore(workdir / "patch_final" / "weights")
        last = max(int(p.name) for p in (workdir / "checkpoints" / "downstream").glob("[0-9]*"))
        tuned = checkpointer.restore(workdir / "checkpoints" / "downstream" / str(last) / "state")
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(patch).items()}
    for k, v in traverse_util.flatten_dict(tuned["params"]).items():
        flat["downstream/" + "/".join(k)] = np.asarray(v)
    return flat


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def numbers(tree, prefix: str = "") -> dict[str, float]:
    """The numbers of a JSON tree by path."""
    if isinstance(tree, dict):
        return {
            k: v for key, sub in tree.items() for k, v in numbers(sub, f"{prefix}/{key}").items()
        }
    if isinstance(tree, list):
        return {
            k: v for i, sub in enumerate(tree) for k, v in numbers(sub, f"{prefix}/{i}").items()
        }
    return {prefix: float(tree)} if isinstance(tree, int | float) else {}


def layout(workdir: Path) -> list[str]:
    """The workdir's paths, less the content-named data files of Orbax's stores."""
    return sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*") if p.parent.name != "d")


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("one") / "work"
    finish(start(workdir, 1, 4, []))
    return workdir


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, list[str]]:
    workdir = tmp_path_factory.mktemp("two") / "work"
    return workdir, finish(start(workdir, 2, 2, []))


def test_two_processes_match_one_and_only_process_0_writes(single, pair):
    workdir, outputs = pair
    assert "process 0 of 2, 4 devices" in outputs[0]
    assert largest_difference(trained(single), trained(workdir)) <= 1e-5
    assert layout(workdir) == layout(single)
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((single / "metrics.jsonl").read_text().splitlines())
    assert len(set(lines)) == len(lines), "a line written twice"
    assert "upstream step" not in outputs[1], "only process 0 reports progress"
    scored = [numbers(json.loads((w / "evaluation.json").read_text())["intrinsic"])
              for w in (single, workdir)]  # fmt: skip
    assert scored[0].keys() == scored[1].keys() and scored[0]
    assert scored[1] == pytest.approx(scored[0], abs=1e-6), "each pair scored once, in order"


def test_both_killed_mid_downstream_then_rerun_ends_bit_identical(pair, tmp_path):
    workdir = tmp_path / "work"
    runs = start(workdir, 2, 2, [])
    mark, done = workdir / "checkpoints" / "downstream" / "3", workdir / "downstream.done.json"
    began = time.monotonic()
    try:
        while not mark.exists() and time.monotonic() - began < LIMIT_S:
            assert all(r.poll() is None for r in runs), "a process ended before the kill"
            time.sleep(0.05)
    finally:
        end(runs)
    assert mark.exists() and not done.exists(), "killed mid-downstream"
    outputs = finish(start(workdir, 2, 2, []))
    assert "resuming downstream from step" in outputs[0]
    resumed, straight = trained(workdir), trained(pair[0])
    assert all(np.array_equal(resumed[k], straight[k]) for k in straight)
    assert layout(workdir) == layout(pair[0])


PACKED = [
    "--config.upstream.pack=True",
    "--config.downstream.pack=True",
    "--config.phases=('upstream','downstream')",
]


def test_packed_batches_split_over_two_processes_train_as_one(tmp_path):
    """Packed rows (both phases): each process takes its share of every packed batch, and
    two processes train the same patch and downstream weights as one with 4 devices."""
    one, two = tmp_path / "one", tmp_path / "two"
    outputs = finish(start(one, 1, 4, PACKED)) + finish(start(two, 2, 2, PACKED))
    for output in outputs[:2]:
        assert "packed into rows" in output, output[-2000:]
    assert largest_difference(trained(one), trained(two)) <= 1e-5


def run_py(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "run.py", f"--config={CONFIG}", *args]
    return subprocess.run(
        command, cwd=ROOT, env=environment(1), capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("address", "process_id", "needle"),
    [
        ("127.0.0.1:{port}", 1, "could not reach the coordinator within 2 s"),  # nobody there
        ("192.0.2.1:{port}", 0, "cannot listen on it"),  # not this machine's address
        ("localhost", 0, "expected host:port"),
    ],
)
def test_a_wrong_coordinator_is_one_message_in_bounded_time(tmp_path, address, process_id, needle):
    began = time.monotonic()
    result = run_py(
        f"--workdir={tmp_path / 'work'}",
        "--config.parallel.distributed=True",
        f"--config.parallel.coordinator_address={address.format(port=free_port())}",
        "--config.parallel.num_processes=2",
        f"--config.parallel.process_id={process_id}",
        "--config.parallel.startup_timeout=2",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "config.parallel" in errors[0], result.stderr[-2000:]
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - began < 60
    assert not (tmp_path / "work").exists(), "nothing written before the processes joined"


def test_half_given_cluster_settings_name_what_is_missing(tmp_path):
    result = run_py(f"--workdir={tmp_path}", "--config.parallel.distributed=True",
                    "--config.parallel.num_processes=2")  # fmt: skip
    assert result.returncode == 2 and "give both" in result.stderr, result.stderr[-2000:]
