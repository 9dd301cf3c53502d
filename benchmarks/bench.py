"""Side-by-side benchmark of our compiled steps against the PyTorch reference stack.

Run it in the environment that has both stacks (the README's test command creates it):

    .venv-adapters/bin/python benchmarks/bench.py            # BERT-base shapes, batch 8 x 128
    .venv-adapters/bin/python benchmarks/bench.py --quick    # CI-sized shapes, seconds

(or `python3 -m venv .venv-adapters && .venv-adapters/bin/pip install -e ".[adapters-test]"`).
For every case both sides run in their own worker process (so each peak RSS is its own),
take `--warmup` single steps, then `--calls` timed rounds interleaved A B A B: in each
round a side runs `--steps-per-call` steps (ours in one compiled call, as the training loop
runs them with the configs' `steps_per_call`; the reference one by one) and reports the
time per step. Written to benchmarks/results/<device>-<date>.json (on a CPU the device
names its kind, e.g. cpu-2core-avx2; the record holds the CPU model and its vector and
matrix extensions, `cpu_kind`) and printed as a markdown table headed by the CPU.

FLOPs per training step (the same useful work credited to both sides; patch FLOPs, <1%,
left out): forward F = layers * (2 T (4 h^2 + 2 h i) + 4 B S^2 h) + 2 B P h (h + V), with
T = B S tokens and P = 15% of S masked positions for the MLM decoder (none for the
classifier); PEFT steps (frozen encoder) cost 2 F (forward + input gradients), full
fine-tuning 3 F (+ weight gradients). CrowS-Pairs reports pairs/s instead.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import cpu_kind  # noqa: E402
import sides  # noqa: E402  (the workers' module: shapes, the crows checkpoint)

CASES = ("upstream_seq_bn", "upstream_lora", "upstream_prefix", "downstream_ft", "crows")
BASE = {"hidden": 768, "layers": 12, "heads": 12, "intermediate": 3072, "vocab": 30522}
QUICK = {"hidden": 64, "layers": 2, "heads": 4, "intermediate": 128, "vocab": 2000}


def step_flops(case: str, a: argparse.Namespace) -> float:
    """Useful FLOPs of one training step (see the module docstring)."""
    tokens = a.batch * a.seq
    layer = 2 * tokens * (4 * a.hidden**2 + 2 * a.hidden * a.intermediate)
    layer += 4 * a.batch * a.seq**2 * a.hidden
    forward = a.layers * layer
    if case.startswith("upstream"):
        masked = round(0.15 * a.seq)
        forward += 2 * a.batch * masked * a.hidden * (a.hidden + a.vocab)
        return 2.0 * forward
    return 3.0 * forward


class Worker:
    """One side of one case in its own process, driven line by line."""

    def __init__(self, side: str, case: str, a: argparse.Namespace, checkpoint: str = "") -> None:
        shape_flags = [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in
                       ("batch", "seq", "hidden", "layers", "heads", "intermediate", "vocab",
                        "dtype", "crows_pairs")]  # fmt: skip
        self.process = subprocess.Popen(
            [a.ours_python if side == "ours" else sys.executable, str(HERE / "sides.py"),
             f"--side={side}", f"--case={case}",
             f"--max-predictions={a.max_predictions}", f"--steps-per-call={a.steps_per_call}",
             f"--checkpoint={checkpoint}", *shape_flags],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.info = self.read()

    def read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with {self.process.wait()}")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def finish(self) -> dict:
        out = self.ask("done")
        self.process.wait()
        return out


def summarize(times: list[float], examples: int) -> dict:
    median = statistics.median(times)
    return {"median_s": median, "min_s": min(times), "max_s": max(times),
            "examples_per_s": examples / median}  # fmt: skip


def run_case(case: str, a: argparse.Namespace) -> dict:
    if case != "crows":
        return timed_case(case, a, "")
    with tempfile.TemporaryDirectory() as checkpoint:  # both sides load the same model
        sides.write_crows_checkpoint(Path(checkpoint), sides.Shapes.of(a))
        return timed_case(case, a, checkpoint)


def timed_case(case: str, a: argparse.Namespace, checkpoint: str) -> dict:
    workers = {side: Worker(side, case, a, checkpoint) for side in ("ours", "reference")}
    for _ in range(a.warmup):
        for worker in workers.values():
            worker.ask("steps 1")
    per_call = 1 if case == "crows" else a.steps_per_call
    times: dict[str, list[float]] = {"ours": [], "reference": []}
    for _ in range(a.calls):  # interleaved: ours, reference, ours, reference, ...
        for side, worker in workers.items():
            times[side].append(worker.ask(f"steps {per_call}")["seconds"])
    result = {}
    examples = a.crows_pairs if case == "crows" else a.batch
    for side, worker in workers.items():
        entry = {**summarize(times[side], examples), **worker.info, **worker.finish()}
        entry.pop("ready", None)
        if case != "crows":
            flops = step_flops(case, a)
            entry["gflops_per_step"] = flops / 1e9
            entry["achieved_gflops"] = flops / entry["median_s"] / 1e9
        result[side] = entry
    result["speedup"] = result["ours"]["examples_per_s"] / result["reference"]["examples_per_s"]
    return result


def device_name() -> str:
    try:
        import jax

        device = jax.devices()[0]
        if device.platform != "cpu":
            return device.device_kind.lower().replace(" ", "-")
    except Exception:
        pass
    import os

    return f"cpu-{os.cpu_count()}core-{cpu_kind.describe()['tag']}"


def markdown(record: dict) -> str:
    cpu = record["machine"].get("cpu", {}).get("label", record["machine"].get("processor"))
    lines = [
        f"{record['device']}, CPU: {cpu}, {record['settings']['dtype']}",
        "",
        "| case | ours ex/s | reference ex/s | ours / reference | ours step s (min-max) | "
        "reference step s (min-max) | ours compile s | ours GFLOP/s (% peak) | "
        "reference GFLOP/s (% peak) | peak RSS MB ours / ref | optimizer state MB ours / ref |",
        "|" + "---|" * 11,
    ]
    for case, r in record["cases"].items():
        o, ref = r["ours"], r["reference"]

        def rate(e: dict) -> str:
            if "achieved_gflops" not in e:
                return "-"
            return f"{e['achieved_gflops']:.0f} ({100 * e['fraction_of_peak']:.0f}%)"

        unit = " pairs/s" if case == "crows" else ""
        lines.append(
            f"| {case} | {o['examples_per_s']:.2f}{unit} | {ref['examples_per_s']:.2f}{unit} | "
            f"{r['speedup']:.2f}x | {o['median_s']:.3f} ({o['min_s']:.3f}-{o['max_s']:.3f}) | "
            f"{ref['median_s']:.3f} ({ref['min_s']:.3f}-{ref['max_s']:.3f}) | "
            f"{o['first_step_s']:.1f} | {rate(o)} | {rate(ref)} | "
            f"{o['peak_rss_mb']:.0f} / {ref['peak_rss_mb']:.0f} | "
            f"{(o['optimizer_state_bytes'] or 0) / 2**20:.1f} / "
            f"{(ref['optimizer_state_bytes'] or 0) / 2**20:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized shapes, few steps")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--calls", type=int, default=3, help="timed rounds per side")
    parser.add_argument(
        "--steps-per-call", type=int, default=10, help="steps per round (configs: 10)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="single steps before timing")
    parser.add_argument("--crows-pairs", type=int, default=50)
    parser.add_argument(
        "--max-predictions",
        type=int,
        default=-1,
        help="decoder positions per row for our MLM step (-1 auto, 0 all)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results")
    main_env = HERE.parent / ".venv" / "bin" / "python"
    parser.add_argument(
        "--ours-python",
        default=str(main_env) if main_env.exists() else sys.executable,
        help="the Python of our side's worker: the project's own environment (.venv), where "
        "transformers 5 does not import torch; the reference always runs in this one",
    )
    for key in BASE:
        parser.add_argument(f"--{key}", type=int, default=None)
    a = parser.parse_args(argv)
    for key, value in (QUICK if a.quick else BASE).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.quick:
        a.calls, a.warmup, a.crows_pairs = min(a.calls, 2), 1, min(a.crows_pairs, 4)
        a.steps_per_call = min(a.steps_per_call, 3)
        a.seq = min(a.seq, 32)
    peaks = cpu_kind.matmul_peak(a.dtype, 512 if a.quick else 2048)
    record = {
        "device": device_name(),
        "date": datetime.date.today().isoformat(),
        "command": " ".join(
            [
                Path(sys.executable).name,
                "benchmarks/bench.py",
                *(sys.argv[1:] if argv is None else argv),
            ]
        ),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu": cpu_kind.describe(),
            "python": platform.python_version(),
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "matmul_peak_gflops": peaks,
        "flop_formula": next(
            p for p in __doc__.split("\n\n") if p.startswith("FLOPs per training step")
        ).replace("\n", " "),
        "cases": {},
    }
    for case in a.cases:
        print(f"benchmarking {case} ...", file=sys.stderr, flush=True)
        record["cases"][case] = run_case(case, a)
    after = cpu_kind.matmul_peak(a.dtype, 512 if a.quick else 2048)  # the machine may have sped up
    record["matmul_peak_gflops_after"] = after
    peak = max(*peaks.values(), *after.values())  # the best of the two measurements
    for result in record["cases"].values():
        for side in ("ours", "reference"):
            if "achieved_gflops" in result[side]:
                result[side]["fraction_of_peak"] = result[side]["achieved_gflops"] / peak
    a.out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if a.quick else ""
    path = a.out / f"{record['device']}-{record['date']}{suffix}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(markdown(record))
    print(f"matmul peak GFLOP/s: {peaks} before, {after} after; written to {path}")
    return record


if __name__ == "__main__":
    main()
