"""With 4 host devices, sharded jit and pmap train to the same patch as one device, with
length buckets and with packed rows, and every mode's placed train state is donated (its
buffers reused) by the steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize(
    ("config", "batching"),
    [("race_lora", "buckets"), ("gender_prefix", "buckets"), ("race_lora", "packed")],
)
def test_sharded_jit_and_pmap_match_single_device(tmp_path, config, batching):
    flags = f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=4"
    env = dict(os.environ, XLA_FLAGS=flags)
    paths = [str(HERE), str(HERE.parent), *filter(None, [env.get("PYTHONPATH")])]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    result = subprocess.run(
        [sys.executable, str(HERE / "parallel_worker.py"), str(tmp_path), config, batching],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    report = json.loads(line[len("RESULT ") :])
    assert report["devices"] == 4
    assert report["donates"] == {"single": True, "jit": True, "pmap": True}
    assert report["jit"] <= 1e-5, report
    assert report["pmap"] <= 1e-5, report
    if report["jit_moved"] is not None:
        assert report["jit_moved"] > 1e-3, "LoRA B moved away from zero: the steps trained"
