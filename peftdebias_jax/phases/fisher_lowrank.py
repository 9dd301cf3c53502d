"""The fisher_lowrank phase (MASKS.md Part A; RECONSTRUCTED): per-group Fisher ->
neutralized importance -> Fisher-weighted low-rank factors of the target kernels."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from peftdebias_jax import checkpoint, files, masks
from peftdebias_jax.data import pipeline, splits, tasks
from peftdebias_jax.evaluation.extrinsic import example_groups
from peftdebias_jax.importance import fisher, lowrank
from peftdebias_jax.phases.common import build_model, tokenizer_for

log = logging.getLogger(__name__)


def fisher_lowrank(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """Fisher group importance -> neutralized importance -> Fisher-weighted low-rank factors
    of the target kernels (MASKS.md Part A; RECONSTRUCTED, see importance/). Writes
    fisher.json (group sizes, overlap@k, factorization errors), fisher/ (per-group Fishers,
    importance and influence mask, Orbax) and lowrank/ (factors and the kernels they sit on),
    which the downstream phase trains with `downstream.trainable="lowrank"`."""
    workdir = Path(workdir)
    out = workdir / "fisher.json"
    if out.exists():
        log.info("fisher_lowrank already finished (%s); delete it to run again", out)
        return json.loads(out.read_text())
    fc, dn = config.fisher, config.downstream
    task = tasks.get(dn.task)
    data = splits.load_task_data(config, task)
    train = data["train"][: fc.max_examples]
    tokenizer = tokenizer_for(config, workdir, [e.text for e in data["train"]])
    module, params = build_model(config, "classifier", len(data["labels"]), tokenizer=tokenizer)
    paths = fisher.target_paths(params, fc.target)
    flat = traverse_util.flatten_dict(params)
    scored = traverse_util.unflatten_dict({p: flat[p] for p in paths})
    rest = traverse_util.unflatten_dict({p: v for p, v in flat.items() if p not in paths})

    def logits_fn(sub: dict, example: dict) -> jax.Array:
        batch = {k: v[None] for k, v in example.items()}
        return module.apply({"params": masks.merge(sub, rest)}, batch["input_ids"],
                            batch["attention_mask"], batch["token_type_ids"])[0]  # fmt: skip

    ids, types, ys = splits.encode_examples(tokenizer, train, data["labels"], dn.max_len)
    batches = pipeline.Batches(ids, len(ids), dn.max_len, tokenizer.pad_token_id, 0, types, ys)
    keep = ("input_ids", "attention_mask", "token_type_ids", "label")
    examples = {k: v for k, v in pipeline.padded_examples(batches).items() if k in keep}
    groups, group_names = example_groups(train, dn.groups)
    fishers = fisher.group_fisher(logits_fn, scored, examples, groups, fc.labels, fc.chunk,
                                    config.seed)  # fmt: skip
    importance, influence = fisher.neutralize(fishers, fc.neutralize, fc.lam, fc.quantile)
    factors, errors = {}, {}
    for path in paths:
        down, up = lowrank.fwsvd(flat[path], importance[path], fc.rank)
        plain_down, plain_up = lowrank.fwsvd(flat[path], np.ones_like(importance[path]), fc.rank)
        kernel = np.zeros_like(flat[path]) if fc.mode == "replace" else flat[path] - down @ up
        factors["/".join(path)] = {"down": down, "up": up, "kernel": np.asarray(kernel),
                                   "original": np.asarray(flat[path])}  # fmt: skip
        errors["/".join(path)] = {
            "fisher_weighted": lowrank.weighted_error(flat[path], importance[path], down, up),
            "plain_svd": lowrank.weighted_error(flat[path], importance[path], plain_down, plain_up),
        }
    entries = sum(int(np.size(flat[p])) for p in paths)
    group_ids = sorted(fishers)
    record = {
        "reconstructed": "MASKS.md Part A: the paper's equations are not known",
        "target": fc.target, "paths": ["/".join(p) for p in paths], "rank": fc.rank,
        "mode": fc.mode, "labels": fc.labels, "neutralize": fc.neutralize,
        "grouping": dn.groups, "group_names": {str(g): group_names[g] for g in group_ids},
        "group_sizes": {str(g): int(np.sum(groups == g)) for g in group_ids},
        "overlap_at_1pct": fisher.overlap_at_k(
            fishers[group_ids[0]], fishers[group_ids[-1]], max(1, entries // 100)
        ),
        "influence_masked": int(sum(m.sum() for m in influence.values())) if influence else 0,
        "errors": errors,
    }  # fmt: skip
    unflat = traverse_util.unflatten_dict
    saved = {f"group_{g}": unflat(f) for g, f in fishers.items()}
    saved["importance"] = unflat(importance)
    if influence:
        saved["influence_mask"] = unflat(influence)
    checkpoint.save_tree(workdir / "fisher", saved)
    checkpoint.save_tree(workdir / "lowrank", {"factors": [factors[k] for k in sorted(factors)]})
    files.write_json(out, record)
    log.info("fisher_lowrank: %s", {k: record[k] for k in ("group_sizes", "overlap_at_1pct")})
    return record
