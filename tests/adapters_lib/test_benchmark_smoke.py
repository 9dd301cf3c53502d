"""The side-by-side benchmark at CI size (tiny shapes, a few steps), so that it cannot rot;
the real figures are measured by `benchmarks/bench.py` and never asserted here."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_writes_both_sides(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench

    record = bench.main(["--quick", "--cases", "upstream_lora", "downstream_ft", "crows",
                         "--calls", "2", "--out", str(tmp_path)])  # fmt: skip
    (written,) = tmp_path.glob("*-quick.json")
    assert json.loads(written.read_text())["cases"].keys() == record["cases"].keys()
    for case, result in record["cases"].items():
        ours, reference = result["ours"], result["reference"]
        assert ours["trainable"] == reference["trainable"], case
        for side in (ours, reference):
            assert side["median_s"] > 0 and side["peak_rss_mb"] > 0
            assert side["min_s"] <= side["median_s"] <= side["max_s"]
        assert result["speedup"] > 0
    assert record["cases"]["upstream_lora"]["ours"]["gflops_per_step"] > 0
    assert record["flop_formula"].startswith("FLOPs per training step")
