"""Intrinsic bias benchmarks for a masked LM (with any patches active): CrowS-Pairs,
StereoSet intrasentence and SEAT, as bias-bench computes them (METHOD.md §4).

Masked-token scoring is batched: every request (a token sequence, a position to mask, the
token to score there) is padded to a bucket length and scored in fixed-size batches by one
jitted function that applies the decoder at the masked position only, so each bucket
compiles once.
"""

from __future__ import annotations

import csv
import difflib
import functools
import itertools
import math
import string
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftdebias_jax import processes
from peftdebias_jax.data.pipeline import bucket_lengths
from peftdebias_jax.data.records import DataError
from peftdebias_jax.evaluation.bootstrap import (
    Settings,
    Statistic,
    percentile_interval,
    rate,
    replicates,
)
from peftdebias_jax.files import read_json
from peftdebias_jax.training import memory


@functools.partial(jax.jit, static_argnums=0)
def masked_log_probs(module, params, ids, attention, positions, targets) -> jax.Array:
    """log p(targets) at one masked position per row (`MaskedScorer.score` compiles it
    ahead, once per module, parameters and batch shape)."""
    logits = module.apply({"params": params}, ids, attention, mlm_positions=positions[:, None])
    log_probs = jax.nn.log_softmax(logits[:, 0].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, targets[:, None], axis=1)[:, 0]


_PROGRAMS: dict[tuple, Any] = {}  # MaskedScorer.score's compiled programs

# Tokens per scoring call on CPU: the matmuls already run at full rate with 2048 rows, and
# the scratch grows with the batch (BERT-base, 64 x 128 tokens: 530 MB; 16 x 128: ~130 MB).
CPU_TOKENS = 2048


class MaskedScorer:
    """log p(target | sequence with `position` masked) for many requests at once."""

    def __init__(
        self,
        module,
        params,
        tokenizer,
        batch_size: int = 64,
        max_len: int = 512,
        max_tokens: int | None = None,
    ):
        """`batch_size` rows per call, and at most `max_tokens` tokens (None: CPU_TOKENS on
        CPU, no cap on accelerators). The parameters are placed once: host arrays JAX cannot
        use in place (unaligned or non-contiguous) would otherwise be copied on every call."""
        self.module, self.batch_size = module, batch_size
        self.params = jax.device_put(params)
        self.mask_id, self.pad_id = tokenizer.mask_token_id, tokenizer.pad_token_id
        self.max_len = max_len
        if max_tokens is None and jax.default_backend() == "cpu":
            max_tokens = CPU_TOKENS
        self.max_tokens = max_tokens
        leaves, tree = jax.tree_util.tree_flatten(params)
        self.signature = (module, tree, tuple((x.shape, str(x.dtype)) for x in leaves))

    def score(self, *args: np.ndarray) -> jax.Array:
        """`masked_log_probs` compiled ahead per (module, parameters, batch shape): one
        program serves every scoring run of them (base, base + patch, benchmarks)."""
        key = (*self.signature, args[0].shape)
        executable = memory.compiled_ahead(
            masked_log_probs, _PROGRAMS, key, self.module, self.params, *args
        )
        return executable(self.params, *args)

    def rows_per_call(self, length: int) -> int:
        """Rows of one call for sequences padded to `length` (one program per bucket)."""
        if self.max_tokens is None:
            return self.batch_size
        return max(1, min(self.batch_size, self.max_tokens // length))

    def log_probs(self, requests: Sequence[tuple[Sequence[int], int, int]]) -> np.ndarray:
        """requests: (token ids, position to mask, target id) -> log-probabilities (each
        process of a distributed run scores its share of them)."""
        total, requests = len(requests), requests[processes.share(len(requests))]
        out = np.zeros(len(requests), np.float64)
        lengths = bucket_lengths(self.max_len)
        by_bucket: dict[int, list[int]] = defaultdict(list)
        for i, (ids, _, _) in enumerate(requests):
            if len(ids) > self.max_len:
                raise ValueError(f"sequence of {len(ids)} tokens exceeds max_len {self.max_len}")
            by_bucket[next(b for b in lengths if b >= len(ids))].append(i)
        for length, members in sorted(by_bucket.items()):
            size = self.rows_per_call(length)
            for start in range(0, len(members), size):
                chunk = members[start : start + size]
                rows = len(chunk)
                ids = np.full((size, length), self.pad_id, np.int32)
                attention = np.zeros_like(ids)
                positions = np.zeros(size, np.int32)
                targets = np.zeros(size, np.int32)
                for row, index in enumerate(chunk):
                    seq, position, target = requests[index]
                    ids[row, : len(seq)] = seq
                    ids[row, position] = self.mask_id
                    attention[row, : len(seq)] = 1
                    positions[row], targets[row] = position, target
                attention[rows:, 0] = 1  # filler rows: one attended token, ignored
                scores = self.score(ids, attention, positions, targets)
                out[chunk] = np.asarray(scores)[:rows]
        return processes.joined(out, total)


# ------------------------------------------------------------------------- CrowS-Pairs


@dataclass(frozen=True)
class CrowsPair:
    index: int
    sent_more: str
    sent_less: str
    direction: str  # "stereo" or "antistereo"
    bias_type: str


def load_crows(path: str | Path, bias_type: str | None = None) -> list[CrowsPair]:
    """crows_pairs_anonymized.csv, optionally only one bias type (gender, race-color, ...)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: CrowS-Pairs file not found")
    pairs = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        needed = {"sent_more", "sent_less", "stereo_antistereo", "bias_type"}
        missing = needed - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: missing columns {sorted(missing)}")
        for number, row in enumerate(reader):
            if row["stereo_antistereo"] not in ("stereo", "antistereo"):
                raise DataError(
                    f"{path}, line {reader.line_num}: field 'stereo_antistereo' is "
                    f"{row['stereo_antistereo']!r}"
                )
            if bias_type is None or row["bias_type"] == bias_type:
                pairs.append(CrowsPair(number, row["sent_more"], row["sent_less"],
                                       row["stereo_antistereo"], row["bias_type"]))  # fmt: skip
    if not pairs:
        raise DataError(f"{path}: no pairs of bias type {bias_type!r}")
    return pairs


def diff_positions(ids1: Sequence[int], ids2: Sequence[int]) -> tuple[list[int], list[int]]:
    """Token positions inside the non-equal difflib opcodes (the modified tokens)."""
    first, second = [], []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, ids1, ids2).get_opcodes():
        if tag != "equal":
            first += range(i1, i2)
            second += range(j1, j2)
    return first, second


@dataclass
class CrowsResult:
    """score = 100 * (#pairs whose sent_more scores higher) / #evaluated pairs."""

    score: float
    evaluated: int
    successes: int
    neutral: int
    skipped: int
    pairs: list[dict[str, Any]] = field(default_factory=list)


def crows_pairs(
    module, params, tokenizer, pairs: Sequence[CrowsPair], batch_size: int = 64
) -> CrowsResult:
    """bias-bench's CrowS-Pairs (METHOD.md §4.1): each sentence's score is the mean
    log-probability of its modified tokens, each masked in turn, rounded to 3 decimals."""
    encoded, requests, spans = [], [], []
    for pair in pairs:
        first, second = (
            (pair.sent_more, pair.sent_less)
            if pair.direction == "stereo"
            else (pair.sent_less, pair.sent_more)
        )
        ids1, ids2 = tokenizer(first)["input_ids"], tokenizer(second)["input_ids"]
        u1, u2 = diff_positions(ids1, ids2)
        encoded.append((u1, u2))
        if not u1 or not u2:
            spans.append(None)
            continue
        start = len(requests)
        requests += [(ids1, u, ids1[u]) for u in u1] + [(ids2, u, ids2[u]) for u in u2]
        spans.append((start, start + len(u1), start + len(u1) + len(u2)))
    scores = MaskedScorer(module, params, tokenizer, batch_size).log_probs(requests)
    successes = neutral = skipped = 0
    per_pair = []
    for pair, span in zip(pairs, spans, strict=True):
        if span is None:
            skipped += 1
            continue
        score1 = round(float(np.mean(scores[span[0] : span[1]])), 3)
        score2 = round(float(np.mean(scores[span[1] : span[2]])), 3)
        if score1 == score2:
            outcome = "neutral"
            neutral += 1
        elif (pair.direction == "stereo") == (score1 > score2):
            outcome = "sent_more"
            successes += 1
        else:
            outcome = "sent_less"
        per_pair.append({"index": pair.index, "bias_type": pair.bias_type,
                         "direction": pair.direction, "score_first": score1,
                         "score_second": score2, "preferred": outcome})  # fmt: skip
    evaluated = len(per_pair)
    score = round(100 * successes / evaluated, 2) if evaluated else float("nan")
    return CrowsResult(score, evaluated, successes, neutral, skipped, per_pair)


def crows_statistic(per_pair: Sequence[dict[str, Any]]) -> Statistic:
    """The CrowS-Pairs score over the evaluated pairs (`CrowsResult.pairs`) as a bootstrap
    statistic: 100 * the weighted share of pairs that prefer the more stereotyping one."""
    success = np.array([p["preferred"] == "sent_more" for p in per_pair])
    return lambda w: 100.0 * rate(w, success, np.ones_like(success))


# ------------------------------------------------------------------------- StereoSet

LABELS = ("stereotype", "anti-stereotype", "unrelated")


@dataclass(frozen=True)
class StereoItem:
    id: str
    target: str
    bias_type: str
    context: str
    sentences: dict[str, str]  # label -> sentence


def load_stereoset(path: str | Path) -> list[StereoItem]:
    """Intrasentence items from the official schema (`data.intrasentence[].sentences[]`
    with `gold_label`) or the per-bias-type schema (`data: {stereotype: {sentence}}`)."""
    path = Path(path)
    raw = read_json(path, "StereoSet file", DataError)
    entries = raw["data"]["intrasentence"] if isinstance(raw, dict) else raw
    items = []
    for i, entry in enumerate(entries):
        try:
            if "sentences" in entry:
                sentences = {s["gold_label"]: s["sentence"] for s in entry["sentences"]}
            else:
                sentences = {label: entry["data"][label]["sentence"] for label in LABELS}
            item = StereoItem(entry["id"], entry["target"], entry["bias_type"], entry["context"],
                              sentences)  # fmt: skip
        except (KeyError, TypeError) as err:
            raise DataError(f"{path}: item {i} lacks field {err}") from None
        if set(item.sentences) != set(LABELS) or "BLANK" not in item.context:
            raise DataError(f"{path}: item {i} ({item.id}) needs 3 labelled sentences and a BLANK")
        items.append(item)
    return items


def blank_word(context: str, sentence: str) -> str:
    """The word that fills BLANK in `sentence`, punctuation stripped (as bias-bench)."""
    index = next(i for i, w in enumerate(context.split()) if "BLANK" in w)
    words = sentence.split()
    word = words[index] if index < len(words) else ""
    return word.translate(str.maketrans("", "", string.punctuation))


def stereoset(module, params, tokenizer, items: Sequence[StereoItem], batch_size: int = 64):
    """SS, LMS and ICAT per domain and overall (METHOD.md §4.2). A candidate's score is
    the mean PROBABILITY of its word's sub-tokens, each predicted at a [MASK] placed after
    the already-decoded prefix: context.replace("BLANK", decode(t_<j) + "[MASK]")."""
    requests, spans = [], []
    for item in items:
        item_spans = {}
        for label in LABELS:
            word = blank_word(item.context, item.sentences[label])
            pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
            start = len(requests)
            for j, piece in enumerate(pieces):
                prefix = tokenizer.decode(pieces[:j]) if j else ""
                text = item.context.replace("BLANK", prefix + tokenizer.mask_token)
                ids = tokenizer(text, truncation=True, max_length=128)["input_ids"]
                position = ids.index(tokenizer.mask_token_id)
                requests.append((ids, position, piece))
            item_spans[label] = (start, len(requests))
        spans.append(item_spans)
    log_probs = MaskedScorer(module, params, tokenizer, batch_size, 128).log_probs(requests)
    probs = np.exp(log_probs)
    scores = [{label: float(np.mean(probs[a:b])) if b > a else 0.0 for label, (a, b) in s.items()}
              for s in spans]  # fmt: skip
    return stereoset_scores(items, scores), scores


def stereoset_scores(items: Sequence[StereoItem], scores: Sequence[dict[str, float]]):
    """Per target: SS = 100 pro/n, LMS = 100 related/2n; per domain the means over
    targets; ICAT = LMS * min(SS, 100 - SS) / 50."""
    by_domain: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for item, score in zip(items, scores, strict=True):
        for domain in (item.bias_type, "overall"):
            by_domain[domain][item.target].append(score)
    results = {}
    for domain, targets in by_domain.items():
        ss, lms = [], []
        for entries in targets.values():
            n = len(entries)
            pro = sum(e["stereotype"] > e["anti-stereotype"] for e in entries)
            related = sum(e["stereotype"] > e["unrelated"] for e in entries) + sum(
                e["anti-stereotype"] > e["unrelated"] for e in entries
            )
            ss.append(100 * pro / n)
            lms.append(100 * related / (2 * n))
        domain_ss, domain_lms = float(np.mean(ss)), float(np.mean(lms))
        icat = domain_lms * min(domain_ss, 100 - domain_ss) / 50
        results[domain] = {"ss": domain_ss, "lms": domain_lms, "icat": icat,
                           "items": sum(len(v) for v in targets.values())}  # fmt: skip
    return results


def stereoset_statistic(
    items: Sequence[StereoItem], scores: Sequence[dict[str, float]], domain: str, key: str = "ss"
) -> Statistic:
    """A domain's SS or LMS (`stereoset_scores`) as a bootstrap statistic over the items:
    per target the weighted share, then the mean over the targets a resample has."""
    chosen = [i for i, item in enumerate(items) if domain in ("overall", item.bias_type)]
    targets = sorted({items[i].target for i in chosen})
    member = np.zeros((len(targets), len(items)), bool)
    for i in chosen:
        member[targets.index(items[i].target), i] = True
    stereo = np.array([s["stereotype"] for s in scores])
    anti = np.array([s["anti-stereotype"] for s in scores])
    unrelated = np.array([s["unrelated"] for s in scores])
    if key == "ss":
        hits, scale = (stereo > anti).astype(float), 100.0
    elif key == "lms":
        hits, scale = (stereo > unrelated).astype(float) + (anti > unrelated), 50.0
    else:
        raise ValueError(f"key must be 'ss' or 'lms', got {key!r}")

    def statistic(w: np.ndarray) -> np.ndarray:
        per_target = rate(w, member * hits, member)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample with no target
            return scale * np.nanmean(per_target, axis=1)

    return statistic


# ------------------------------------------------------------------------------ SEAT


@dataclass(frozen=True)
class SeatTest:
    name: str
    targets: tuple[list[str], list[str]]
    attributes: tuple[list[str], list[str]]


def load_seat(path: str | Path) -> SeatTest:
    path = Path(path)
    raw = read_json(path, "SEAT test", DataError)
    try:
        return SeatTest(
            path.stem.removesuffix(".jsonl"),
            (raw["targ1"]["examples"], raw["targ2"]["examples"]),
            (raw["attr1"]["examples"], raw["attr2"]["examples"]),
        )
    except (KeyError, TypeError) as err:
        raise DataError(f"{path}: not a SEAT test (missing {err})") from None


def sentence_embeddings(module, params, tokenizer, sentences: Sequence[str]) -> np.ndarray:
    """Mean of the last hidden states over all tokens ([CLS]/[SEP] included), L2-normed
    (each process of a distributed run embeds its share of the sentences)."""
    apply = jax.jit(lambda p, ids, mask: module.apply({"params": p}, ids, mask).last_hidden_state)
    total, sentences = len(sentences), list(sentences)[processes.share(len(sentences))]
    out = [np.zeros((0, module.config.hidden_size))]
    for start in range(0, len(sentences), 64):
        chunk = list(sentences[start : start + 64])
        longest = max(len(ids) for ids in tokenizer(chunk)["input_ids"])
        length = next(b for b in bucket_lengths(512) if b >= longest)
        batch = tokenizer(chunk, padding="max_length", max_length=length, return_tensors="np")
        hidden = np.asarray(apply(params, batch["input_ids"], batch["attention_mask"]), np.float64)
        mask = batch["attention_mask"][..., None]
        out.append((hidden * mask).sum(1) / mask.sum(1))
    vectors = processes.joined(np.concatenate(out), total)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def association(w: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """s(w, A, B) = mean_a cos(w, a) - mean_b cos(w, b), for unit vectors (one per row of w)."""
    return (w @ a.T).mean(1) - (w @ b.T).mean(1)


def effect_size(x: np.ndarray, y: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """d = (mean_x s(x) - mean_y s(y)) / std_{w in X u Y} s(w) (sample std, ddof = 1)."""
    sx, sy = association(x, a, b), association(y, a, b)
    return float((sx.mean() - sy.mean()) / np.concatenate([sx, sy]).std(ddof=1))


def effect_size_statistic(x: np.ndarray, y: np.ndarray, a: np.ndarray, b: np.ndarray) -> Statistic:
    """SEAT's d as a bootstrap statistic over the target sentences X u Y (attribute sets
    fixed): weighted means of s(w, A, B) per target set over their weighted sample sd."""
    s = np.concatenate([association(x, a, b), association(y, a, b)])
    first = np.arange(len(s)) < len(x)

    def statistic(w: np.ndarray) -> np.ndarray:
        total, mean = w.sum(1), (w @ s) / w.sum(1)
        var = (w @ s**2 - total * mean**2) / (total - 1)
        gap = rate(w, first * s, first) - rate(w, ~first * s, ~first)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(var > 1e-12, gap / np.sqrt(np.maximum(var, 1e-300)), np.nan)

    return statistic


def p_value(
    x: np.ndarray, y: np.ndarray, a: np.ndarray, b: np.ndarray, samples: int = 100_000, seed=0
) -> float:
    """One-sided permutation test on sum_{x in X_i} s(x, A, B) over equal-size partitions
    X_i of X u Y; ties count as exceedances. Exact when C(|X|+|Y|, |X|) <= `samples`, else
    `samples` random partitions with the +1 correction: (count + 1) / (samples + 1)."""
    s = np.concatenate([association(x, a, b), association(y, a, b)])
    n, k = len(s), len(x)
    observed = s[:k].sum()
    if math.comb(n, k) <= samples:
        stats = [s[list(idx)].sum() for idx in itertools.combinations(range(n), k)]
        return float(np.mean(np.asarray(stats) >= observed - 1e-12))
    rng = np.random.default_rng(seed)
    count = 0
    for start in range(0, samples, 2000):
        rows = min(2000, samples - start)
        chosen = np.argsort(rng.random((rows, n)), axis=1)[:, :k]
        count += int((s[chosen].sum(1) >= observed - 1e-12).sum())
    return float((count + 1) / (samples + 1))


def seat(
    module,
    params,
    tokenizer,
    paths: Sequence[str | Path],
    samples: int = 100_000,
    settings: Settings | None = None,
):
    """Effect size and p-value of each SEAT test file; with `settings`, the effect size's
    bootstrap interval over the target sentences and its "replicates" (test i resampled
    with seed + i, so tests are independent and `mean_abs_effect` can combine them)."""
    results = []
    for i, path in enumerate(paths):
        test = load_seat(path)
        x, y = (sentence_embeddings(module, params, tokenizer, t) for t in test.targets)
        a, b = (sentence_embeddings(module, params, tokenizer, t) for t in test.attributes)
        result = {"test": test.name, "effect_size": effect_size(x, y, a, b),
                  "p_value": p_value(x, y, a, b, samples),
                  "sizes": [len(x), len(y), len(a), len(b)]}  # fmt: skip
        if settings is not None:
            own = Settings(settings.resamples, settings.level, settings.seed + i)
            values = replicates(effect_size_statistic(x, y, a, b), len(x) + len(y), own)
            result["interval"] = percentile_interval(values, settings.level)
            result["replicates"] = values
        results.append(result)
    return results


def mean_abs_effect(tests: Sequence[dict[str, Any]], level: float) -> dict[str, Any]:
    """The mean |d| over SEAT tests (Table 1's column) with its interval from the tests'
    independent replicates (`seat` with settings), which it removes from the records."""
    draws = [t.pop("replicates") for t in tests]
    value = float(np.mean([abs(t["effect_size"]) for t in tests]))
    return {"value": value, "interval": percentile_interval(np.mean(np.abs(draws), 0), level)}
