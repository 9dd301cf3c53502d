"""One whole phase in PyTorch, as the reference code runs it or as a tuned PyTorch user would.

`python benchmarks/torch_phases.py --style reference|tuned --phase upstream|downstream ...`
(run by phases_bench.py in the environment with torch, transformers 4.57 and `adapters`).
Both styles: the same BERT checkpoint and tokenizer, the same sampled documents (`--corpus`:
Gab Hate Corpus posts with the race ("group") CDA list and the hate label, or BiasBios bios
with the gender list and the 28-profession label), a seq_bn adapter (reduction 16), AdamW
(eps 1e-8, no weight decay), linear decay, clipping at 1.0, a Trainer-style loop of
`--updates` optimizer updates, then one pass over the validation set and the save the
reference makes at the end. They differ where the issue says they do:

- reference (METHOD.md §3.2, §5.2): upstream documents are tokenized in map batches of 1,000,
  each padded to its longest document (max 256), decoded with their special tokens, swapped
  (CDA) and tokenized again, padded the same way; downstream examples are padded to 128;
  batches are drawn at random; eager attention (the paper's transformers has no other).
- tuned: documents tokenized without padding, CDA on the clean text; batches grouped by
  length (transformers' megabatch rule: 50 batches sorted by length) and padded to their
  longest row (a multiple of 8); PyTorch's fused attention (sdpa).

Prints JSON lines: {"first_step_s": ...} once the first update is done (seconds since the
`--started` time the driver passed), then one summary line.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import time
from pathlib import Path

import numpy as np

MAP_BATCH = 1_000  # datasets.map's default batch, which sets the reference's padding


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def hate_label(row: dict) -> int:
    """The Gab Hate Corpus label, as our task reads it: hate = hd or cv."""
    return int(row["hd"] == "1" or row["cv"] == "1")


# BiasBios' label map (the INLP split's 28 professions; METHOD.md §5.1)
PROFESSIONS = Path(__file__).resolve().parents[2] / "shared/data/bias_in_bios/profession2index.txt"


class Corpus:
    """What differs between the two cases: the label, the class weights, the CDA list."""

    def __init__(self, name: str) -> None:
        self.name = name
        hate = name == "ghc"
        self.weights = [1.0, 10.0] if hate else None  # the reference's GHC weights; none
        self.words_key = "group" if hate else "gender"
        lines = [] if hate else PROFESSIONS.read_text().split("\n")
        self.professions = dict(line.split("\t") for line in lines if line.strip())
        self.num_labels = 2 if hate else len(self.professions)

    def label(self, row: dict) -> int:
        return hate_label(row) if self.name == "ghc" else int(self.professions[row["p"]])

    def cda(self, words_file: Path):
        return (GroupCda if self.name == "ghc" else GenderCda)(words_file, self.words_key)


class GenderCda:
    """The reference's two-sided gender CDA (METHOD.md §3.2.1): every word of a (male,
    female) pair swapped for its partner, the last matching pair winning; [counterfactual,
    original] when something was swapped, nothing (the document dropped) otherwise."""

    def __init__(self, words_file: Path, key: str) -> None:
        pairs = json.loads(words_file.read_text())[key]
        pairs = pairs + [[w + p for w in pair] for p in ".,?!;:" for pair in pairs]
        self.partner: dict[str, str] = {}
        for male, female in pairs:  # later pairs overwrite: the last match wins
            self.partner[male], self.partner[female] = female, male

    def __call__(self, text: str) -> list[str]:
        words = text.split()
        swapped = [self.partner.get(w, w) for w in words]
        return [" ".join(swapped), text] if swapped != words else []


class GroupCda:
    """The reference's one-to-many CDA (METHOD.md §3.2.2): the first attribute word found is
    replaced, at every occurrence, by each other word of the last tuple that holds it."""

    def __init__(self, words_file: Path, key: str) -> None:
        tuples = json.loads(words_file.read_text())[key]
        tuples = tuples + [[w + p for w in t] for p in ".,?!;:" for t in tuples]
        self.alternatives = {w: tuple(t) for t in tuples for w in t}

    def __call__(self, text: str) -> list[str]:
        words = text.split()
        first = next((w for w in words if w in self.alternatives), None)
        if first is None:
            return [text]
        others = [a for a in self.alternatives[first] if a != first]
        return [text] + [" ".join(a if w == first else w for w in words) for a in others]


def reference_sequences(tokenizer, texts: list[str], cda: GroupCda | None) -> list[list[int]]:
    """Token ids as the reference code makes them: padded per map batch, CDA on the decoded
    ids (special tokens included), tokenized again and padded per map batch."""
    out = []
    for start in range(0, len(texts), MAP_BATCH):
        chunk = texts[start : start + MAP_BATCH]
        ids = tokenizer(chunk, truncation=True, padding=True, max_length=256)["input_ids"]
        if cda is None:
            out += ids
            continue
        swapped = [s for row in ids for s in cda(tokenizer.decode(row))]
        out += tokenizer(swapped, add_special_tokens=False, truncation=True, padding=True,
                         max_length=256)["input_ids"]  # fmt: skip
    return out


def tuned_sequences(tokenizer, texts: list[str], cda: GroupCda | None, max_len: int):
    ids = tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]
    if cda is None:
        return ids
    clean = [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    swapped = [s for text in clean for s in cda(text)]
    return tokenizer(swapped, truncation=True, max_length=max_len)["input_ids"]


def batch_order(lengths: list[int], batch: int, updates: int, grouped: bool, seed: int):
    """Row indices of `updates` batches, epoch after epoch: random (the Trainer's sampler) or
    grouped by length (megabatches of 50 batches, each sorted longest first)."""
    rng = np.random.default_rng(seed)
    order: list[list[int]] = []
    while len(order) < updates:
        rows = rng.permutation(len(lengths)).tolist()
        if grouped:
            mega = 50 * batch
            rows = [i for s in range(0, len(rows), mega)
                    for i in sorted(rows[s : s + mega], key=lambda i: -lengths[i])]  # fmt: skip
        order += [rows[s : s + batch] for s in range(0, len(rows), batch)]
    return order[:updates]


def collate(sequences, rows, pad_id: int, multiple: int):
    longest = max(len(sequences[i]) for i in rows)
    width = -(-longest // multiple) * multiple
    ids = np.full((len(rows), width), pad_id, np.int64)
    mask = np.zeros_like(ids)
    for r, i in enumerate(rows):
        ids[r, : len(sequences[i])] = sequences[i]
        mask[r, : len(sequences[i])] = 1
    return ids, mask


def reference_mask(ids: np.ndarray, pad_id: int, upstream: bool) -> np.ndarray:
    """The reference's attention mask where it matters for speed (eager attention computes
    every position whatever the mask): downstream 0 on padding; upstream 1 everywhere, as its
    decoded-and-retokenized [PAD] strings are attended (METHOD.md §3.2.3)."""
    return np.ones_like(ids) if upstream else (ids != pad_id).astype(np.int64)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--style", choices=("reference", "tuned"), required=True)
    parser.add_argument("--phase", choices=("upstream", "downstream"), required=True)
    parser.add_argument("--model", required=True, help="BERT checkpoint with an MLM head")
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--validation", type=Path, required=True)
    parser.add_argument("--words", type=Path, required=True)
    parser.add_argument("--corpus", choices=("ghc", "biasbios"), default="ghc")
    parser.add_argument("--updates", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--started", type=float, required=True)
    args = parser.parse_args()

    import adapters
    import torch
    import transformers

    torch.manual_seed(42)
    reference = args.style == "reference"
    attention = "eager" if reference else "sdpa"
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    pad = tokenizer.pad_token_id
    train, validation = read_rows(args.train), read_rows(args.validation)
    upstream = args.phase == "upstream"
    corpus = Corpus(args.corpus)
    cda = corpus.cda(args.words) if upstream else None
    max_len = 256 if upstream else 128

    def sequences(rows):
        texts = [r["text"] for r in rows]
        if not reference:
            return tuned_sequences(tokenizer, texts, cda, max_len)
        if upstream:
            return reference_sequences(tokenizer, texts, cda)
        return tokenizer(texts, truncation=True, padding="max_length", max_length=128)["input_ids"]

    train_ids, eval_ids = sequences(train), sequences(validation)
    train_y = np.asarray([corpus.label(r) for r in train])

    if upstream:
        model = transformers.BertForMaskedLM.from_pretrained(
            args.model, attn_implementation=attention
        )
        collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    else:
        model = transformers.BertForSequenceClassification.from_pretrained(
            args.model, num_labels=corpus.num_labels, attn_implementation=attention
        )
    adapters.init(model)
    model.add_adapter("debias", config=adapters.SeqBnConfig(reduction_factor=16))
    if upstream:  # base frozen; the patch and the MLM head's transform and bias train (as
        model.train_adapter("debias")  # ours; the decoder weight is the tied word embedding)
        for name, param in model.cls.named_parameters():
            param.requires_grad = "decoder.weight" not in name
    else:  # patch active and frozen, LayerNorms frozen, everything else trains
        model.set_active_adapters("debias")
        for name, param in model.named_parameters():
            param.requires_grad = "debias" not in name and "LayerNorm" not in name
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-5 if upstream else 2e-5, eps=1e-8,
                                  weight_decay=0.0)  # fmt: skip
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / args.updates)
    weights = torch.tensor(corpus.weights) if corpus.weights else None

    def real_lengths(rows) -> list[int]:
        """Tokens that are not padding (the reference's rows come padded already)."""
        return [int(np.sum(np.asarray(s) != pad)) if reference else len(s) for s in rows]

    lengths = real_lengths(train_ids)
    order = batch_order(lengths, args.batch_size, args.updates, not reference, seed=42)
    multiple = 1 if reference else 8
    real_tokens = padded_tokens = 0
    first_step = None
    for rows in order:
        ids, mask = collate(train_ids, rows, pad, multiple)
        if reference:
            mask = reference_mask(ids, pad, upstream)
        real_tokens += int(sum(lengths[i] for i in rows))
        padded_tokens += ids.size
        inputs = {"input_ids": torch.as_tensor(ids), "attention_mask": torch.as_tensor(mask)}
        if upstream:
            masked = collator.torch_mask_tokens(torch.as_tensor(ids).clone())
            inputs["input_ids"], labels = masked
            loss = model(**inputs, labels=labels).loss
        else:
            logits = model(**inputs).logits
            target = torch.as_tensor(train_y[rows])
            loss = torch.nn.functional.cross_entropy(logits, target, weight=weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if first_step is None:
            first_step = time.time() - args.started
            emit({"first_step_s": first_step})

    model.eval()  # one pass over the validation set, eval batch as the reference's
    eval_batch = args.batch_size if upstream else 128
    eval_lengths = real_lengths(eval_ids)
    rows_all = list(range(len(eval_ids)))
    if not reference:
        rows_all.sort(key=lambda i: eval_lengths[i])
    with torch.no_grad():
        for start in range(0, len(rows_all), eval_batch):
            rows = rows_all[start : start + eval_batch]
            ids, mask = collate(eval_ids, rows, pad, multiple)
            if reference:
                mask = reference_mask(ids, pad, upstream)
            inputs = {"input_ids": torch.as_tensor(ids), "attention_mask": torch.as_tensor(mask)}
            if upstream:
                masked, labels = collator.torch_mask_tokens(torch.as_tensor(ids).clone())
                model(input_ids=masked, attention_mask=inputs["attention_mask"], labels=labels)
            else:
                model(**inputs).logits.argmax(-1).numpy()
    args.out.mkdir(parents=True, exist_ok=True)
    if upstream:  # the patch, as the reference's trainer.save_model() leaves it
        model.save_adapter(str(args.out / "patch"), "debias")
    else:  # the fine-tuned model
        model.save_pretrained(str(args.out / "model"))
    emit({
        "first_step_s": first_step,
        "examples": args.updates * args.batch_size,
        "real_tokens": real_tokens,
        "padded_tokens": padded_tokens,
        "train_sequences": len(train_ids),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    })  # fmt: skip


if __name__ == "__main__":
    main()
