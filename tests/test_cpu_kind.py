"""Benchmark figures carry their CPU kind: model and matmul extensions from /proc/cpuinfo."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cpu_kind

EPYC = (
    "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx fma avx2\n\nprocessor\t: 1\n"
)
XEON = (
    "model name\t: Intel(R) Xeon(R) Platinum 8480+\n"
    "flags\t\t: avx avx2 fma avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n"
)


def test_an_avx2_machine():
    kind = cpu_kind.describe(EPYC)
    assert kind["model"] == "AMD EPYC" and kind["extensions"] == ["AVX2", "FMA"]
    assert kind["label"] == "AMD EPYC (AVX2)" and kind["tag"] == "avx2"


def test_an_amx_machine():
    kind = cpu_kind.describe(XEON)
    assert kind["label"] == "Intel(R) Xeon(R) Platinum 8480+ (AVX2, AVX-512, AVX512-BF16, AMX-BF16)"
    assert "AMX-INT8" in kind["extensions"] and kind["tag"] == "amx"


def test_without_cpuinfo_the_platform_names_it():
    kind = cpu_kind.describe("")
    assert kind["model"] and kind["extensions"] == [] and kind["tag"] == "plain"


def test_this_machine_is_described():
    assert cpu_kind.describe()["label"]


def test_the_matmul_peak_is_measured_in_both_frameworks():
    peaks = cpu_kind.matmul_peak("float32", 128)
    assert set(peaks) == {"jax", "torch"} and all(v > 0 for v in peaks.values())
