"""Sparse fine-tuning: top-k selection, the sparse diff on disk, entries that stay at their
pre-trained values upstream, and entries that stay frozen downstream."""

import jax
import numpy as np
import pytest
from config_fixtures import load_config
from fit_fixtures import spy_on_fit
from flax import traverse_util

from peftdebias_jax import checkpoint, phases
from peftdebias_jax.errors import CheckpointError
from peftdebias_jax.peft import sft
from peftdebias_jax.phases import downstream


def test_top_k_takes_the_largest_moves_and_keeps_ties():
    delta = {("a",): np.array([0.5, -3.0, 0.1]), ("b",): np.array([[2.0, -0.5], [0.0, 0.4]])}
    chosen = sft.select_top_k(delta, 2)
    np.testing.assert_array_equal(chosen[("a",)], [False, True, False])
    np.testing.assert_array_equal(chosen[("b",)], [[True, False], [False, False]])
    tied = sft.select_top_k(delta, 3)  # the 3rd largest |delta| is 0.5, held by two entries
    assert sum(int(m.sum()) for m in tied.values()) == 4
    with pytest.raises(ValueError, match="k > 0"):
        sft.select_top_k(delta, 0)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sft")
    config = load_config("gender_sft", "smoke")
    config.upstream.update(num_steps=4, learning_rate=1e-2)
    phases.upstream.upstream(config, workdir)
    return config, workdir


def test_upstream_moves_only_selected_entries_and_stores_a_sparse_diff(sft_run):
    config, workdir = sft_run
    module, params = phases.common.build_model(
        config, "mlm", tokenizer=phases.common.tokenizer_for(config, workdir)
    )
    mask = traverse_util.flatten_dict(checkpoint.load_tree(workdir / "sft_mask"))
    k = sum(int(m.sum()) for m in mask.values())
    info = checkpoint.read_patch_info(workdir / "patch_final")
    assert info["patch"] == {"method": "sft", "fraction": 0.01, "k": k}
    patched, changed = checkpoint.load_sft_patch(workdir / "patch_final", module, params)
    stored = sum(int(m.sum()) for m in changed.values())
    assert 0 < stored <= k
    before, after = traverse_util.flatten_dict(params), traverse_util.flatten_dict(patched)
    for path, entries in changed.items():
        assert not np.any(entries & ~mask[path]), f"{path}: an unselected entry moved"
        same = np.asarray(before[path]) == np.asarray(after[path])
        assert np.all(same[~entries]), "entries outside the diff keep their exact values"
    # the weights on disk are the sparse entries only, not a dense copy
    leaves = jax.tree_util.tree_leaves(checkpoint.load_tree(workdir / "patch_final" / "weights"))
    assert sum(leaf.size for leaf in leaves) == 2 * stored
    assert (workdir / "dense_model" / "model.safetensors").exists(), "the Full-Debias base"


def test_diff_round_trips_exactly(tmp_path):
    base = {("w",): np.zeros((3, 4), np.float32), ("v",): np.ones(5, np.float32)}
    moved = {("w",): base[("w",)].copy(), ("v",): base[("v",)].copy()}
    moved[("w",)][1, 2] = 0.25
    moved[("w",)][2, 0] = -1e-8  # at or below 1e-7: not stored
    diff = sft.sparse_diff(moved, base)
    assert list(diff) == ["w"] and diff["w"]["indices"].tolist() == [6]
    params = traverse_util.unflatten_dict(base)
    restored = traverse_util.flatten_dict(sft.apply_diff(params, diff, "test"))
    assert float(restored[("w",)][1, 2]) == 0.25 and float(np.abs(restored[("w",)]).sum()) == 0.25
    with pytest.raises(CheckpointError, match="leaf nope does not exist"):
        sft.apply_diff(params, {"nope": diff["w"]}, "test")


def test_downstream_freezes_exactly_the_patched_entries(sft_run, monkeypatch):
    config, workdir = sft_run
    captured = spy_on_fit(monkeypatch, downstream)
    config.downstream.update(num_steps=4, learning_rate=1e-2)
    phases.downstream.downstream(config, workdir)
    _, changed = checkpoint.load_sft_patch(
        workdir / "patch",
        *phases.common.build_model(
            config, "mlm", tokenizer=phases.common.tokenizer_for(config, workdir)
        ),
    )
    moved_elsewhere = 0
    for path, entries in changed.items():
        start, final = captured["start"][path], captured["final"][path]
        np.testing.assert_array_equal(start[entries], final[entries])
        moved_elsewhere += int(np.sum(start[~entries] != final[~entries]))
    assert moved_elsewhere > 0, "the rest of those leaves trains"
