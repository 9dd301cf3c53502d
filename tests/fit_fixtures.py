"""A spy on a phase's `fit` call: the parameters (and labels) it started from and ended at."""

import jax
from flax import traverse_util

from peftdebias_jax.training import loop


def spy_on_fit(monkeypatch, phase_module) -> dict:
    """Replaces `phase_module.fit` with a pass-through that records flat `start`, `labels`
    and `final` trees of the (last) training run."""
    captured = {}

    def spy(**kwargs):
        captured["start"] = traverse_util.flatten_dict(jax.device_get(kwargs["state"].params))
        captured["labels"] = traverse_util.flatten_dict(kwargs["label_tree"])
        final, selection = loop.fit(**kwargs)
        captured["final"] = traverse_util.flatten_dict(jax.device_get(final.params))
        return final, selection

    monkeypatch.setattr(phase_module, "fit", spy)
    return captured
