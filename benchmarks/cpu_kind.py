"""Which CPU a benchmark ran on: its model and the vector / matrix extensions that decide
how fast matmuls run (AVX2, AVX-512, AVX512-BF16, AMX), so that every figure carries them.
Ratios measured on an AVX2 EPYC and on an AMX Xeon differ; a figure without its CPU kind
cannot be compared with another. `matmul_peak` says how fast the machine ran that day (a
shared VM's speed wanders from day to day)."""

from __future__ import annotations

import platform
import time
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# /proc/cpuinfo flag -> the name the docs use, in the order labels list them
EXTENSIONS = {
    "avx2": "AVX2",
    "fma": "FMA",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX512-VNNI",
    "avx512_bf16": "AVX512-BF16",
    "amx_tile": "AMX",
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
}


def describe(cpuinfo: str | None = None) -> dict:
    """{"model", "extensions" (docs names), "label", "tag"} of this machine's CPU (or of
    the given /proc/cpuinfo text); where there is no /proc/cpuinfo, the platform's name."""
    if cpuinfo is None:
        cpuinfo = CPUINFO.read_text() if CPUINFO.exists() else ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:  # the first processor describes them all
            fields[key.strip()] = value.strip()
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    present = [name for flag, name in EXTENSIONS.items() if flag in flags]
    shown = [n for n in present if n not in ("FMA", "AVX512-VNNI", "AMX", "AMX-INT8")]
    label = f"{model} ({', '.join(shown) or 'no AVX2'})"
    return {"model": model, "extensions": present, "label": label, "tag": tag(present)}


def tag(present: list[str]) -> str:
    """The short kind used in result file names: amx, avx512-bf16, avx512, avx2 or plain."""
    for name, short in (("AMX-BF16", "amx"), ("AVX512-BF16", "avx512-bf16"),
                        ("AVX-512", "avx512"), ("AVX2", "avx2")):  # fmt: skip
        if name in present:
            return short
    return "plain"


def matmul_peak(dtype: str, size: int) -> dict[str, float]:
    """GFLOP/s of a size^3 matmul in jax and in torch: the best of 10 after warm-up (a peak,
    so the fastest; on a shared VM the median wanders by 50%)."""
    import jax
    import jax.numpy as jnp
    import torch

    out = {}
    x = jnp.ones((size, size), jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - start)
    out["jax"] = 2 * size**3 / min(times) / 1e9
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = torch.ones(size, size, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32,
                   device=device)  # fmt: skip
    t @ t
    times = []
    for _ in range(10):
        start = time.perf_counter()
        t @ t
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    out["torch"] = 2 * size**3 / min(times) / 1e9
    return out
