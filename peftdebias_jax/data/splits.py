"""A downstream task's splits as the config names them: files or generated data, a
held-out validation part, split caps and extra evaluation sets, all validated up front;
and their token ids."""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from peftdebias_jax.data import pipeline, sampling, stereotypes, synthetic, tasks
from peftdebias_jax.data.records import DataError


def load_task_data(config: ml_collections.ConfigDict, task: tasks.Task) -> dict[str, Any]:
    """train / validation / test examples and extra evaluation sets, all validated now."""
    dn = config.downstream
    if dn.train_file == "synthetic":
        size, bias = dn.synthetic_size, dn.synthetic_bias
        train = synthetic.labelled(task.name, size, config.seed, bias)
        splits = {  # a test split as large as train: the per-group rates need the examples
            "validation": synthetic.labelled(task.name, max(size // 4, 8), config.seed + 1, bias),
            "test": synthetic.labelled(task.name, size, config.seed + 2, bias),
        }
        labels = tasks.label_set(task, train)
        if task.labels is None or task.name == "bias_bios":
            labels = tuple(sorted({e.label for e in train + splits["validation"]}))
    elif dn.train_file == "stereotyped":  # a fixed dataset: seeds vary training only, and
        size = dn.synthetic_size  # every seed's predictions are of the same test examples
        if task.name != "bias_bios" and task.name not in stereotypes.HATE_STYLES:
            raise DataError(
                f"config.downstream.train_file='stereotyped': no generated data for the task "
                f"{task.name!r} (there is for bias_bios, {', '.join(stereotypes.HATE_STYLES)}); "
                "use 'synthetic' or a file"
            )
        train = stereotypes.task(task.name, size, 0, "train")
        splits = {
            "validation": stereotypes.task(task.name, max(size // 4, 8), 1, "train"),
            "test": stereotypes.task(task.name, size, 2, "test"),
        }
        labels = tuple(sorted({e.label for e in train}))
    else:
        train = tasks.load_split(task, dn.train_file)
        labels = tasks.label_set(task, train)
        splits = {}
        if dn.validation_file:
            splits["validation"] = tasks.load_split(task, dn.validation_file, labels)
        else:
            order = np.random.default_rng(config.seed).permutation(len(train))
            held = set(order[: max(1, round(len(train) * dn.validation_fraction))].tolist())
            splits["validation"] = [e for i, e in enumerate(train) if i in held]
            train = [e for i, e in enumerate(train) if i not in held]
        if dn.test_file:
            splits["test"] = tasks.load_split(task, dn.test_file, labels)
    extra = {}
    for entry in dn.extra_evals:
        name, _, path = entry.partition("=")
        extra_task = tasks.get(name)
        extra[name] = (extra_task, tasks.load_split(extra_task, path, labels))
    if dn.bias_nli_occupations:
        probes = tasks.bias_nli_probes(
            tasks.read_word_file(dn.bias_nli_occupations),
            tasks.read_word_file(dn.bias_nli_gendered_words),
        )
        extra["bias_nli"] = (tasks.get("bias_nli"), probes)
    for name, examples in [("train", train), *splits.items()]:
        if not examples:
            raise DataError(f"config.downstream: the {name} split of {task.name} is empty")
    caps = sampling.check_caps(dn.max_examples, "config.downstream.max_examples")
    sampled = {}
    train, sampled["train"] = sampling.cap(train, caps["train"], config.seed, "train")
    for name in list(splits):
        splits[name], sampled[name] = sampling.cap(splits[name], caps[name], config.seed, name)
    for name, (extra_task, examples) in list(extra.items()):
        examples, sampled[name] = sampling.cap(examples, caps["extra"], config.seed, name)
        extra[name] = (extra_task, examples)
    return {"train": train, "labels": labels, **splits, "extra": extra, "sampled": sampled}


def encode_examples(tokenizer, examples, labels, max_len) -> tuple[list, list, list[int]]:
    index = {name: i for i, name in enumerate(labels)}
    ids, types = pipeline.encode_pairs(
        tokenizer, [e.text for e in examples], [e.text_pair for e in examples], max_len
    )
    return ids, types, [index.get(e.label, 0) for e in examples]
