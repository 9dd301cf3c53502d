"""Mask rules -> labels -> optax partition; frozen leaves never move and hold no state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from peftdebias_jax import masks, models, peft
from peftdebias_jax.errors import ConfigError

CONFIG = models.EncoderConfig(
    vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24
)
PATCHES = {
    "race": peft.PatchConfig("seq_bn", reduction_factor=4),
    "task": peft.PatchConfig("lora", r=2),
}
RULES = [(masks.patch_regex("task"), "train"), (".*", "freeze")]


@pytest.fixture(scope="module")
def model():
    return models.from_config(CONFIG, head="classifier", num_labels=3, patches=PATCHES)


def flat_labels(label_tree):
    return {"/".join(p): v for p, v in traverse_util.flatten_dict(label_tree).items()}


def test_first_match_wins_and_counts_are_logged(model, caplog):
    _, params = model
    rules = [(r".*/lora_task/lora_A", "freeze"), *RULES]
    with caplog.at_level("INFO", logger="peftdebias_jax"):
        labels = flat_labels(masks.labels(params, rules))
    assert all(v == "freeze" for k, v in labels.items() if k.endswith("lora_A"))
    assert all(v == "train" for k, v in labels.items() if k.endswith("lora_B"))
    assert sum(v == "train" for v in labels.values()) == 4  # 2 layers x (query, value)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "-> freeze: 4 leaves" in logged and "-> train: 4 leaves" in logged


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([(masks.patch_regex("task"), "train")], "cover no rule for"),
        ([(".*", "freeze")], "no parameter to train"),
        ([("(", "train")], "not a valid regex"),
        ([(".*", "trainable")], "must be \\(regex"),
    ],
)
def test_rule_errors(model, rules, message):
    with pytest.raises(ConfigError, match=message):
        masks.labels(model[1], rules)


def test_uncovered_error_names_a_leaf(model):
    with pytest.raises(ConfigError, match="bert/"):
        masks.labels(model[1], [(r"classifier/.*", "train")])


def loss_fn(module):
    ids = jnp.array([[2, 7, 9, 11, 3, 0], [2, 5, 6, 3, 0, 0]])
    mask = (ids != 0).astype(jnp.int32)
    labels = jnp.array([1, 2])

    def loss(params):
        logits = module.apply({"params": params}, ids, mask)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return loss


def test_three_steps_move_only_trainable_leaves(model):
    module, params = model
    params = jax.tree_util.tree_map(jnp.asarray, params)
    label_tree = masks.labels(params, RULES)
    tx = masks.optimizer(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.05)), label_tree)
    opt_state = tx.init(params)
    grad_fn = jax.jit(masks.value_and_grad(loss_fn(module), label_tree))

    @jax.jit
    def step(params, opt_state):
        loss, grads = grad_fn(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    start = params
    losses = []
    for _ in range(3):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    before, after = traverse_util.flatten_dict(start), traverse_util.flatten_dict(params)
    labels = traverse_util.flatten_dict(label_tree)
    for path, label in labels.items():
        if label == "freeze":
            np.testing.assert_array_equal(np.asarray(after[path]), np.asarray(before[path]))
        elif path[-1] == "lora_B":  # zero at init, so it must have moved
            assert not np.array_equal(np.asarray(after[path]), np.asarray(before[path]))
    n_train, total = masks.counts(params, label_tree)
    state_size = sum(x.size for x in jax.tree_util.tree_leaves(opt_state) if x.ndim > 0)
    assert state_size == 2 * n_train, "Adam's mu and nu for trainable leaves only"
    assert total > 10 * n_train


def test_frozen_leaves_are_not_differentiated(model):
    """The gradient program has far fewer matmuls when only the LoRA leaves are trainable."""
    module, params = model
    loss = loss_fn(module)
    lora_only = masks.value_and_grad(loss, masks.labels(params, RULES))
    everything = masks.value_and_grad(loss, masks.labels(params, [(".*", "train")]))

    def dots(fn):
        return str(jax.make_jaxpr(fn)(params)).count("dot_general")

    assert dots(lora_only) < dots(everything)
    _, grads = lora_only(params)
    flat = traverse_util.flatten_dict(grads)
    assert all(not np.any(np.asarray(v)) for p, v in flat.items() if "lora_task" not in p)


def test_split_merge_round_trip(model):
    _, params = model
    label_tree = masks.labels(params, RULES)
    train, frozen = masks.split(params, label_tree)
    assert set(flat_labels(train)) & set(flat_labels(frozen)) == set()
    merged = masks.merge(train, frozen)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)


def test_summary_and_count_line(model):
    _, params = model
    label_tree = masks.labels(params, RULES)
    n_train, total = masks.counts(params, label_tree)
    line = masks.count_line(params, label_tree)
    assert line == (
        f"trainable params: {n_train:,} || all params: {total:,} || "
        f"trainable%: {100 * n_train / total:.4f}"
    )
    table = masks.summary(params, label_tree)
    assert "patch race" in table and "patch task" in table and line in table
    task_rows = [row for row in table.splitlines() if row.startswith("patch task")]
    assert sum(int(row.split()[-1].replace(",", "")) for row in task_rows) == n_train


def test_summary_counts_entry_masks(model):
    """SFT's masks: a masked leaf counts only the entries that may train."""
    _, params = model
    label_tree = masks.labels(params, RULES)
    flat_labels = traverse_util.flatten_dict(label_tree)
    flat = traverse_util.flatten_dict(params)
    path = next(p for p, label in flat_labels.items() if label == "train")
    entries = {path: np.zeros(np.shape(flat[path]), bool)}
    entries[path].flat[:3] = True
    n_train, total = masks.counts(params, label_tree)
    n_masked, same_total = masks.counts(params, label_tree, entries)
    assert same_total == total and n_masked == n_train - np.size(flat[path]) + 3
    table = masks.summary(params, label_tree, entries)
    assert masks.count_line(params, label_tree, entries) in table
    rows = [row for row in table.splitlines() if row.startswith("patch task")]
    assert sum(int(row.split()[-1].replace(",", "")) for row in rows) == n_masked
