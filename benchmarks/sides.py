"""One side of one benchmark case, run as a worker process that bench.py drives.

`python benchmarks/sides.py --side ours|reference --case CASE [shape flags]` builds the
case, compiles/warms nothing by itself, then answers commands on stdin, one per line:
"steps N" runs N training steps (ours: in one compiled call, as the training loop does with
`steps_per_call`) and prints {"seconds": ...} per step; "done" prints the peak memory and
exits.
The first line it prints describes the case (trainable and optimizer-state bytes, the
time the first step took, i.e. compile time for JAX). Each side lives in its own process
so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CASES = ("upstream_seq_bn", "upstream_lora", "upstream_prefix", "downstream_ft", "crows")
PATCH = {  # our PatchConfig settings and the `adapters` config of the same patch
    "seq_bn": {"reduction_factor": 16},
    "lora": {"r": 8, "alpha": 8, "target_modules": ("query", "value")},
    "prefix_tuning": {"prefix_length": 30, "flat": True},
}
METHOD = {"upstream_seq_bn": "seq_bn", "upstream_lora": "lora", "upstream_prefix": "prefix_tuning",
          "downstream_ft": "seq_bn"}  # fmt: skip
NUM_LABELS = 28


@dataclass
class Shapes:
    batch: int
    seq: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    dtype: str
    crows_pairs: int

    @classmethod
    def of(cls, namespace: argparse.Namespace) -> Shapes:
        """The shapes among parsed command-line arguments (the workers' and bench.py's)."""
        return cls(**{k: getattr(namespace, k) for k in cls.__dataclass_fields__})


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_ids(shapes: Shapes, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, shapes.vocab, size=(shapes.batch, shapes.seq)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return ids


def mlm_labels(ids: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """15% of the non-special positions masked (80% [MASK]); labels -100 elsewhere (for the
    reference, whose collator masks on the host, outside its step)."""
    rng = np.random.default_rng(seed)
    chosen = rng.random(ids.shape) < 0.15
    chosen[:, 0] = chosen[:, -1] = False
    inputs = ids.copy()
    inputs[chosen & (rng.random(ids.shape) < 0.8)] = 103
    return inputs, np.where(chosen, ids, -100)


def crows_pairs(count: int):
    from peftdebias_jax.evaluation import intrinsic

    path = ROOT.parent / "shared" / "data" / "crows" / "crows_pairs_anonymized.csv"
    return intrinsic.load_crows(path)[:count]


def crows_tokenizer(pairs, vocab: int):
    """A WordPiece vocabulary built on the pairs (bert-base-uncased is not available
    offline); both sides use it, so they score the same token sequences."""
    from peftdebias_jax.data.tokenizer import train_wordpiece

    texts = [t for p in pairs for t in (p.sent_more, p.sent_less)]
    return train_wordpiece(texts, vocab)


def write_crows_checkpoint(directory: Path, shapes: Shapes) -> None:
    """A randomly initialised BertForMaskedLM (transformers' own initialisation, seed 0) on
    the pairs' vocabulary, in the Hugging Face layout: both sides score this checkpoint, as
    a user scores a pretrained model (loading included in the peak memory)."""
    import torch
    import transformers

    tokenizer = crows_tokenizer(crows_pairs(shapes.crows_pairs), shapes.vocab)
    config = transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=shapes.hidden, num_hidden_layers=shapes.layers,
        num_attention_heads=shapes.heads, intermediate_size=shapes.intermediate,
        max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BertForMaskedLM(config).save_pretrained(directory)


# --- ours (JAX) ------------------------------------------------------------------------


class Ours:
    def __init__(
        self, case: str, shapes: Shapes, max_predictions: int, slots: int, checkpoint: str = ""
    ) -> None:
        import jax

        from peftdebias_jax import models

        self.jax, self.case, self.shapes = jax, case, shapes
        vocab = shapes.vocab
        if case == "crows":
            self.pairs = crows_pairs(shapes.crows_pairs)
            self.tokenizer = crows_tokenizer(self.pairs, vocab)
            vocab = len(self.tokenizer)
        config = models.EncoderConfig(
            model_type="bert", vocab_size=vocab, hidden_size=shapes.hidden,
            num_hidden_layers=shapes.layers, num_attention_heads=shapes.heads,
            intermediate_size=shapes.intermediate, max_position_embeddings=512,
            type_vocab_size=2, dtype=shapes.dtype,
        )  # fmt: skip
        if case == "crows":
            self.module, self.params = models.from_pretrained(checkpoint, head="mlm")
            self.trainable = 0
            self.opt_bytes = 0
            return
        # imported only for the training cases: the scoring worker loads what scoring needs,
        # as the reference's does
        from peftdebias_jax import masks, peft
        from peftdebias_jax.data import pipeline
        from peftdebias_jax.training import memory, steps
        from peftdebias_jax.training.trainer import Optimizer, build_trainer

        method = METHOD[case]
        patches = {"debias": peft.PatchConfig(method, **PATCH[method])}
        head = "classifier" if case == "downstream_ft" else "mlm"
        module, params = models.from_config(config, head, NUM_LABELS if head != "mlm" else None,
                                             patches, seed=0)  # fmt: skip
        if head == "mlm":  # the upstream trainable set: patch + MLM head transform and bias
            rules = [
                (masks.patch_regex("debias"), "train"),
                *masks.mlm_head_rules(module.config.model_type),
            ]
        else:  # downstream: everything but the frozen patch and the LayerNorms
            rules = [(masks.patch_regex("debias"), "freeze"), (r".*/LayerNorm/.*", "freeze"),
                     (".*", "train")]  # fmt: skip
        label_tree = masks.labels(params, [*rules, (".*", "freeze")])
        self.trainable = masks.counts(params, label_tree)[0]
        if head == "mlm":
            masking = steps.MaskingConfig(special_ids=(0, 100, 101, 102, 103), mask_id=103,
                                          vocab_size=vocab, rate=0.15)  # fmt: skip

            def make_step(tx, axis_name):
                return steps.make_mlm_train_step(module, tx, label_tree, masking, axis_name, 0.0,
                                                 1, max_predictions)  # fmt: skip
        else:

            def make_step(tx, axis_name):
                return steps.make_classification_train_step(module, tx, label_tree, axis_name)

        trainer = build_trainer(params, label_tree, Optimizer(1e-4, 10_000, 1.0), make_step,
                                seed=0, mode="single", batch_size=shapes.batch, batch_key="batch",
                                name=case)  # fmt: skip
        state = trainer.state
        self.opt_bytes = memory.tree_bytes(state.opt_state)
        self.runner = trainer.runner
        self.step_fn = trainer.train_step
        self.slots = slots
        sequences = list(random_ids(shapes, 0))
        labels = list(np.random.default_rng(1).integers(0, NUM_LABELS, len(sequences)))
        types = [np.zeros(shapes.seq, np.int32) for _ in sequences]
        self.batches = pipeline.Batches(sequences, shapes.batch, shapes.seq, 0, 0,
                                        types if head != "mlm" else None,
                                        labels if head != "mlm" else None)  # fmt: skip
        self.specs = self.batches.training_epoch(0)
        self.state = self.runner.put_state(state)
        self.data_seconds: list[float] = []

    def steps(self, count: int) -> float:
        start = time.perf_counter()
        if self.case == "crows":
            from peftdebias_jax.evaluation import intrinsic

            for _ in range(count):
                intrinsic.crows_pairs(self.module, self.params, self.tokenizer, self.pairs, 64)
            return (time.perf_counter() - start) / count
        specs = [self.specs[i % len(self.specs)] for i in range(count)]
        batches, counter = self.runner.put_batches(
            [self.batches.materialize(spec) for spec in specs], self.slots
        )
        self.data_seconds.append((time.perf_counter() - start) / count)
        self.state, metrics = self.step_fn(self.state, batches, counter)
        self.jax.block_until_ready(metrics["loss"])
        return (time.perf_counter() - start) / count

    def memory(self) -> dict:
        out = {"peak_rss_mb": peak_rss_mb()}
        device = self.jax.devices()[0]
        if device.platform != "cpu":
            out["device_peak_mb"] = device.memory_stats()["peak_bytes_in_use"] / 2**20
        if getattr(self, "data_seconds", None):
            out["data_ms"] = 1000 * float(np.median(self.data_seconds))
        return out


# --- the reference (PyTorch + transformers + adapters) --------------------------------


class Reference:
    def __init__(self, case: str, shapes: Shapes, checkpoint: str = "") -> None:
        import torch
        import transformers

        self.torch, self.case, self.shapes = torch, case, shapes
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = torch.bfloat16 if shapes.dtype == "bfloat16" else torch.float32
        vocab = shapes.vocab
        if case == "crows":
            self.pairs = crows_pairs(shapes.crows_pairs)
            self.tokenizer = crows_tokenizer(self.pairs, vocab)
            vocab = len(self.tokenizer)
        config = transformers.BertConfig(
            vocab_size=vocab, hidden_size=shapes.hidden, num_hidden_layers=shapes.layers,
            num_attention_heads=shapes.heads, intermediate_size=shapes.intermediate,
            max_position_embeddings=512, num_labels=NUM_LABELS, attn_implementation="eager",
        )  # fmt: skip
        torch.manual_seed(0)
        if case == "crows":
            self.model = transformers.BertForMaskedLM.from_pretrained(
                checkpoint, attn_implementation="eager"
            )
            self.model = self.model.to(self.device).eval()
            self.trainable = self.opt_bytes = 0
            return
        import adapters

        head_cls = (transformers.BertForSequenceClassification if case == "downstream_ft"
                    else transformers.BertForMaskedLM)  # fmt: skip
        model = head_cls(config)
        adapters.init(model)
        method = METHOD[case]
        if method == "seq_bn":
            patch = adapters.SeqBnConfig(reduction_factor=16)
        elif method == "lora":
            patch = adapters.LoRAConfig(r=8, alpha=8, attn_matrices=["q", "v"])
        else:
            patch = adapters.PrefixTuningConfig(prefix_length=30, flat=True)
        model.add_adapter("debias", config=patch)
        if case == "downstream_ft":  # patch active and frozen, LayerNorms frozen, rest trains
            model.set_active_adapters("debias")
            for name, param in model.named_parameters():
                param.requires_grad = "debias" not in name and "LayerNorm" not in name
        else:  # base frozen, patch + MLM head trainable (the reference code's upstream)
            model.train_adapter("debias")
            model.cls.predictions.bias.requires_grad = True  # ours trains the decoder bias
        self.model = model.to(self.device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, eps=1e-8, weight_decay=0.0)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: max(0.0, 1 - s / 10_000)
        )
        ids = random_ids(shapes, 0)
        if case == "downstream_ft":
            labels = np.random.default_rng(1).integers(0, NUM_LABELS, shapes.batch)
            self.batch = {"input_ids": ids, "labels": labels}
        else:
            inputs, labels = mlm_labels(ids, 0)
            self.batch = {"input_ids": inputs, "labels": labels}
        self.batch = {k: torch.as_tensor(np.asarray(v, np.int64)).to(self.device)
                      for k, v in self.batch.items()}  # fmt: skip
        self.batch["attention_mask"] = torch.ones_like(self.batch["input_ids"])
        self.opt_bytes = None  # AdamW allocates its state on the first step

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def crows(self) -> None:
        """bias-bench's loop: one forward pass per modified token of each sentence."""
        import difflib

        torch = self.torch
        with torch.no_grad():
            for pair in self.pairs:
                a = self.tokenizer(pair.sent_more)["input_ids"]
                b = self.tokenizer(pair.sent_less)["input_ids"]
                ops = difflib.SequenceMatcher(None, a, b).get_opcodes()
                spans = (
                    [i for op in ops if op[0] != "equal" for i in range(op[1], op[2])],
                    [i for op in ops if op[0] != "equal" for i in range(op[3], op[4])],
                )
                for ids, positions in zip((a, b), spans, strict=True):
                    for position in positions:
                        masked = torch.tensor([ids], device=self.device)
                        masked[0, position] = self.tokenizer.mask_token_id
                        logits = self.model(input_ids=masked).logits
                        torch.log_softmax(logits[0, position], -1)[ids[position]].item()

    def steps(self, count: int) -> float:
        return sum(self.step() for _ in range(count)) / count

    def step(self) -> float:
        start = time.perf_counter()
        if self.case == "crows":
            self.crows()
            return time.perf_counter() - start
        with self.torch.autocast(self.device, self.dtype, enabled=self.dtype != self.torch.float32):
            loss = self.model(**self.batch).loss
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad], 1.0
        )
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.sync()
        if self.opt_bytes is None:
            self.opt_bytes = sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                                 for t in s.values() if self.torch.is_tensor(t))  # fmt: skip
        return time.perf_counter() - start

    def memory(self) -> dict:
        out = {"peak_rss_mb": peak_rss_mb()}
        if self.device == "cuda":
            out["device_peak_mb"] = self.torch.cuda.max_memory_allocated() / 2**20
        return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", choices=("ours", "reference"), required=True)
    parser.add_argument("--case", choices=CASES, required=True)
    parser.add_argument("--max-predictions", type=int, default=-1)
    parser.add_argument("--steps-per-call", type=int, default=1)
    parser.add_argument("--checkpoint", default="", help="the crows case's model directory")
    for name in Shapes.__dataclass_fields__:
        kind = str if name == "dtype" else int
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, required=True)
    args = parser.parse_args()
    shapes = Shapes.of(args)
    sys.path.insert(0, str(ROOT))
    if args.side == "ours":  # the XLA flags run.py sets, before JAX starts its back end
        from peftdebias_jax.training import memory

        memory.configure_xla_flags()
    if args.case == "crows" and not args.checkpoint:
        parser.error("--case crows needs --checkpoint (written by write_crows_checkpoint)")
    side = (Ours(args.case, shapes, args.max_predictions, args.steps_per_call, args.checkpoint)
            if args.side == "ours" else Reference(args.case, shapes, args.checkpoint))  # fmt: skip
    first = side.steps(1)  # compile (JAX; the same program runs any count) / allocate (torch)
    emit({"ready": True, "first_step_s": first, "trainable": side.trainable,
          "optimizer_state_bytes": side.opt_bytes})  # fmt: skip
    for line in sys.stdin:
        command, *count = line.split()
        if command == "steps":
            emit({"seconds": side.steps(int(count[0]))})
        elif command == "done":
            emit(side.memory())
            return


if __name__ == "__main__":
    main()
