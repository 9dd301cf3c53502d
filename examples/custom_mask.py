"""A research fork's new parameter masks and group definition, from outside the package.

Two masks for fine-tuning a hate-speech classifier: the value projections of the top two
layers plus the classifier, and only the top 5% of those kernels' entries by magnitude;
DP/EO computed over a new grouping (short vs long posts). Each is one registered function;
the library's downstream phase trains, predicts, scores and reports.

Run: python examples/custom_mask.py [WORKDIR]   (default runs/custom_mask; about a minute)
"""

import sys
from pathlib import Path

import numpy as np
from flax import traverse_util

from peftdebias_jax import masks, phases
from peftdebias_jax.evaluation.extrinsic import GROUPINGS
from peftdebias_jax.trainable_sets import TRAINABLE_SETS

ROOT = Path(__file__).resolve().parents[1]


@TRAINABLE_SETS.register("top_values")
def top_values(config, workdir, module, params, patch_rules):
    """The value projections (kernel and bias) of the top two layers, and the classifier."""
    top = module.config.num_hidden_layers
    layers = "|".join(str(i) for i in range(max(0, top - 2), top))
    return [*patch_rules, (rf".*/layer_({layers})/attention/self/value/.*", "train"),
            (r"classifier/.*", "train"), (".*", "freeze")]  # fmt: skip


@TRAINABLE_SETS.register("top5_magnitude")
def top5_magnitude(config, workdir, module, params, patch_rules):
    """As top_values, but of those value kernels only the 5% largest entries by |w| train."""
    rules = top_values(config, workdir, module, params, patch_rules)
    labels = traverse_util.flatten_dict(masks.labels(params, rules))
    flat = traverse_util.flatten_dict(params)
    kernels = {p: np.abs(np.asarray(flat[p])) for p, label in labels.items()
               if label == "train" and "value" in p and p[-1] == "kernel"}  # fmt: skip
    cut = np.quantile(np.concatenate([k.ravel() for k in kernels.values()]), 0.95)
    return masks.Trainable(rules, {p: k >= cut for p, k in kernels.items()})


@GROUPINGS.register("post_length")
def post_length(examples):
    """Short (up to 8 words) vs long posts."""
    return ["short" if len(e.text.split()) <= 8 else "long" for e in examples]


def main(workdir: Path) -> None:
    for trainable in ("top_values", "top5_magnitude"):
        config = phases.load_config(ROOT / "configs" / "race_ft.py:smoke")
        config.phases = ("downstream", "report")
        config.downstream.update(trainable=trainable, groups="post_length", num_steps=6)
        phases.run(config, workdir / trainable)
        print(f"{trainable}: {workdir / trainable / 'report.md'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/custom_mask"))
