"""Dynamic masking rates and invariances; bucketed, deterministic, resumable batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftdebias_jax.data import mlm, pipeline

SPECIAL = (0, 1, 2, 3, 4)  # [PAD] [UNK] [CLS] [SEP] [MASK]
MASK_ID, VOCAB = 4, 1000


def draw(rng, ids, attention, index):
    return mlm.mask_tokens(
        rng, ids, attention, index, special_ids=SPECIAL, mask_id=MASK_ID, vocab_size=VOCAB
    )


def test_masking_rates_over_many_draws():
    rows, length = 64, 128
    rng = np.random.default_rng(0)
    ids = rng.integers(5, VOCAB, size=(rows, length)).astype(np.int32)
    ids[:, 0], ids[:, 100] = 2, 3  # [CLS] ... [SEP], then padding
    ids[:, 101:] = 0
    ids[:, 50] = 1  # an [UNK] in the middle
    attention = (ids != 0).astype(np.int32)
    fn = jax.jit(draw)
    selected_total = masked = randomized = kept = 0
    eligible = (attention.astype(bool) & ~np.isin(ids, SPECIAL)).sum()
    for seed in range(40):
        inputs, selected = map(
            np.asarray, fn(jax.random.key(seed), ids, attention, np.arange(rows))
        )
        assert not selected[~(attention.astype(bool) & ~np.isin(ids, SPECIAL))].any()
        np.testing.assert_array_equal(inputs[~selected], ids[~selected])
        selected_total += selected.sum()
        masked += (inputs[selected] == MASK_ID).sum()
        kept += (inputs[selected] == ids[selected]).sum()
        randomized += ((inputs[selected] != MASK_ID) & (inputs[selected] != ids[selected])).sum()
    assert abs(selected_total / (40 * eligible) - 0.15) < 0.005
    assert abs(masked / selected_total - 0.8) < 0.01
    # a random replacement can draw the original id (1/1000), so "kept" is ~0.1 + tiny
    assert abs(randomized / selected_total - 0.1) < 0.01
    assert abs(kept / selected_total - 0.1) < 0.01


def test_masks_depend_on_the_row_not_on_the_batch_it_sits_in():
    rng = np.random.default_rng(1)
    ids = rng.integers(5, VOCAB, size=(8, 32)).astype(np.int32)
    attention = np.ones_like(ids)
    key = jax.random.key(7)
    whole, sel = draw(key, ids, attention, jnp.arange(8))
    half, half_sel = draw(key, ids[4:], attention[4:], jnp.arange(4, 8))
    np.testing.assert_array_equal(np.asarray(whole)[4:], np.asarray(half))
    np.testing.assert_array_equal(np.asarray(sel)[4:], np.asarray(half_sel))


def sequences(count=37, seed=0):
    rng = np.random.default_rng(seed)
    return [np.arange(2, 2 + n, dtype=np.int32) for n in rng.integers(3, 60, size=count)]


def test_training_batches_are_bucketed_full_and_deterministic():
    seqs = sequences()
    batches = pipeline.Batches(seqs, batch_size=4, max_len=64, pad_id=0, seed=3)
    epoch = batches.training_epoch(0)
    assert epoch == pipeline.Batches(seqs, 4, 64, 0, seed=3).training_epoch(0)
    assert epoch != batches.training_epoch(1)
    assert {spec.length for spec in epoch} <= set(batches.lengths)
    assert len(batches.buckets) <= 8 and all(n % 8 == 0 or n == 64 for n in batches.lengths)
    seen = set()
    for spec in epoch:
        batch = batches.materialize(spec)
        assert batch["input_ids"].shape == (4, spec.length)
        assert batch["weight"].tolist() == [1.0] * 4
        for row, ids, mask in zip(
            spec.rows, batch["input_ids"], batch["attention_mask"], strict=True
        ):
            n = len(seqs[row])
            assert n <= spec.length and mask.sum() == n
            np.testing.assert_array_equal(ids[:n], seqs[row])
            seen.add(row)
    assert seen == set(range(len(seqs))), "every sequence is seen each epoch"


def calls_until(batches, limits):
    """Cut the stream into calls of the given limits: (specs of each call, end positions)."""
    position, calls, ends = (0, 0), [], []
    for limit in limits:
        specs, position = batches.next_call(*position, limit)
        calls.append(specs)
        ends.append(position)
    return calls, ends


@pytest.mark.parametrize("run_length", [1, 3, 50])
def test_calls_are_single_bucket_and_never_change_the_order(run_length):
    batches = pipeline.Batches(sequences(90), 4, 64, 0, seed=3, run_length=run_length)
    epochs = [batches.training_epoch(e) for e in range(20)]
    flat = [spec for epoch in epochs for spec in epoch]
    for limits in ([1] * 40, [10] * 40, [3, 1, 7, 2, 10] * 8):
        calls, ends = calls_until(batches, limits)
        assert all(0 < len(c) <= limit for c, limit in zip(calls, limits, strict=True))
        assert all(len({spec.length for spec in c}) == 1 for c in calls), "one shape per call"
        taken = [spec for c in calls for spec in c]
        assert taken == flat[: len(taken)], "the order does not depend on the cut"
        # resuming from any call's end continues the same order
        for i in (3, 17):
            resumed = pipeline.Batches(sequences(90), 4, 64, 0, seed=3, run_length=run_length)
            specs, _ = resumed.next_call(*ends[i], 1)
            assert specs == calls[i + 1][:1]


def test_epoch_order_is_runs_of_one_bucket():
    batches = pipeline.Batches(sequences(200), 2, 64, 0, seed=1, run_length=4, bucket_count=3)
    epoch = batches.training_epoch(0)
    assert len({spec.length for spec in epoch}) == 3
    lengths = [spec.length for spec in epoch]
    changes = [i for i in range(1, len(lengths)) if lengths[i] != lengths[i - 1]]
    assert len(changes) >= 3, "runs of different buckets are shuffled together"
    # same-bucket stretches are whole runs (adjacent runs of a bucket may meet): never
    # more stretches than runs
    runs = sum(-(-len(rows) // 2 // 4) for rows in batches.buckets.values())
    assert len(changes) + 1 <= runs
    plain = pipeline.Batches(sequences(200), 2, 64, 0, seed=1, run_length=1, bucket_count=3)
    plain = plain.training_epoch(0)
    assert sorted(s.rows for s in epoch) == sorted(s.rows for s in plain), "same batches"


def test_evaluation_covers_every_row_once():
    seqs = sequences(count=10)
    batches = pipeline.Batches(seqs, 4, 64, 0)
    rows, weights = [], []
    for spec in batches.evaluation():
        batch = batches.materialize(spec)
        rows += batch["row"][batch["weight"] > 0].tolist()
        weights += batch["weight"].tolist()
    assert sorted(rows) == list(range(10))
    assert sum(weights) == 10


def test_local_rows_of_a_batch():
    batches = pipeline.Batches(sequences(), 4, 64, 0)
    spec = batches.training_epoch(0)[0]
    whole = batches.materialize(spec)
    part = batches.materialize(spec, slice(2, 4))
    np.testing.assert_array_equal(part["input_ids"], whole["input_ids"][2:])
    assert part["index"].tolist() == [2, 3]


def tiny_mlm_batch():
    """A one-layer BERT with an MLM head, a 3 x 12 batch and a 40% selection draw."""
    from peftdebias_jax import models

    config = models.EncoderConfig(
        model_type="bert", vocab_size=40, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, max_position_embeddings=16,
        type_vocab_size=2,
    )  # fmt: skip
    module, params = models.from_config(config, "mlm", seed=0)
    ids = jax.random.randint(jax.random.key(1), (3, 12), 5, 40)
    attention = jnp.ones((3, 12), jnp.int32)
    draw = jax.random.uniform(jax.random.key(2), (3, 12)) < 0.4
    return module, params, ids, attention, draw


def assert_same_loss_and_gradient(module, params, ids, attention, selected, limits):
    """mlm_loss_sum with `limits` (per row, per batch) equals the full [B, L, V] path."""
    from peftdebias_jax.training import steps

    def loss(p, limits):
        return steps.mlm_loss_sum(module, p, ids, ids, attention, selected, None, *limits)

    full, gathered = loss(params, (None, None)), loss(params, limits)
    np.testing.assert_allclose(float(gathered), float(full), rtol=1e-5)
    grad_full = jax.grad(loss)(params, (None, None))
    grad_gathered = jax.grad(loss)(params, limits)
    for a, b in zip(jax.tree_util.tree_leaves(grad_full), jax.tree_util.tree_leaves(grad_gathered),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_decoder_on_masked_positions_only_gives_the_same_loss_and_gradient():
    """The gathered path (decoder on max_predictions positions per row) equals the full
    [B, L, V] path whenever no row selects more than that many positions."""
    from peftdebias_jax.training import steps

    module, params, ids, attention, draw = tiny_mlm_batch()
    selected = steps.cap_selection(draw, 4)
    assert int(selected.sum(1).max()) <= 4 and int(draw.sum()) > int(selected.sum())
    assert_same_loss_and_gradient(module, params, ids, attention, selected, (4, None))


def test_batch_cap_on_decoder_rows():
    """The batch-level cap: mean + 3 sd of the batch's masked count, only in the automatic
    setting and only when below the per-row caps; the head on that many rows gives the loss
    and gradient of the full path over the positions the caps leave."""
    from peftdebias_jax.training import steps

    assert steps.max_predictions_for(128, 0.15, -1) == 32
    assert steps.batch_predictions_for(8, 128, 0.15, -1) == 188  # of 8 x 32 = 256 rows
    assert steps.batch_predictions_for(1, 128, 0.15, -1) is None  # 32: no fewer than 1 x 32
    assert steps.batch_predictions_for(8, 128, 0.15, 20) is None  # an explicit per-row count

    module, params, ids, attention, draw = tiny_mlm_batch()
    per_row = steps.cap_selection(draw, 4)
    total = int(per_row.sum())
    capped = steps.cap_batch_selection(per_row, total - 2)
    assert int(capped.sum()) == total - 2
    flat, kept = np.asarray(per_row).reshape(-1), np.asarray(capped).reshape(-1)
    last_kept = np.flatnonzero(kept)[-1]  # the first total - 2 in row order are kept
    np.testing.assert_array_equal(kept[: last_kept + 1], flat[: last_kept + 1])
    assert not kept[last_kept + 1 :].any() and flat[last_kept + 1 :].sum() == 2

    for selected, rows in ((per_row, total), (per_row, total + 3), (capped, total - 2)):
        assert_same_loss_and_gradient(module, params, ids, attention, selected, (4, rows))

    # pmap: each device's part, told what earlier rows selected, caps as the whole batch
    half = per_row.shape[0] // 2
    parts = [np.asarray(per_row)[:half], np.asarray(per_row)[half:]]
    before = [0, int(parts[0].sum())]
    split = [steps.cap_batch_selection(p, total - 2, b) for p, b in zip(parts, before, strict=True)]
    np.testing.assert_array_equal(np.concatenate(split), np.asarray(capped))


def test_evaluation_scores_a_batch_over_the_decoder_caps_again_exactly():
    """The eval step runs the decoder on capped positions (one forward pass, no branch in
    its program) and flags a batch that selects more than a row's or the batch's cap;
    mlm_eval_metrics scores that one again with the exact step: the full path's sum always."""
    import optax

    from peftdebias_jax.training import steps
    from peftdebias_jax.training.state import TrainState

    module, params, ids, attention, _ = tiny_mlm_batch()
    ids, attention = jnp.tile(ids, (4, 4)), jnp.ones((12, 48), jnp.int32)
    rate = 0.15
    row_cap = steps.max_predictions_for(48, rate, -1)
    batch_cap = steps.batch_predictions_for(12, 48, rate, -1)
    assert row_cap < 48 and batch_cap < 12 * row_cap  # both caps exist

    class FixedSelection:
        """Masks nothing and selects `selected`: the selection under test, not a draw."""

        def __init__(self, selected):
            self.rate, self.selected = rate, selected

        def mask(self, rng, batch, row_seeds):
            return batch["input_ids"], self.selected

    state = TrainState.create(params, optax.sgd(0.0), 0)
    batch = {"input_ids": ids, "attention_mask": attention, "row": jnp.arange(12),
             "weight": jnp.ones(12)}  # fmt: skip
    fits = jax.random.uniform(jax.random.key(3), ids.shape) < rate
    over_a_row = fits.at[0, :40].set(True)
    over_the_batch = jnp.broadcast_to(jnp.arange(48) < row_cap - 1, ids.shape)
    assert int(fits.sum(1).max()) <= row_cap and int(fits.sum()) <= batch_cap
    assert int(over_the_batch.sum(1).max()) <= row_cap and int(over_the_batch.sum()) > batch_cap
    for selected, overflow in ((fits, 0.0), (over_a_row, 1.0), (over_the_batch, 1.0)):
        masking = FixedSelection(selected)
        capped = jax.jit(steps.make_mlm_eval_step(module, masking))
        exact = jax.jit(steps.make_mlm_eval_step(module, masking, exact=True))
        assert "stablehlo.case" not in capped.lower(state, batch).as_text()
        assert float(capped(state, batch)["overflow"]) == overflow
        got = steps.mlm_eval_metrics(capped, exact, state, batch)
        full = steps.mlm_loss_sum(module, params, ids, ids, attention, selected, None)
        np.testing.assert_allclose(float(got["loss_sum"]), float(full), rtol=1e-5)
        assert float(got["count"]) == int(selected.sum()) and float(got["overflow"]) == 0.0


def test_batches_carry_each_rows_weight_and_filler_weighs_nothing():
    seqs = sequences(count=10)
    weights = np.linspace(0.5, 5.0, 10).astype(np.float32)
    batches = pipeline.Batches(seqs, 4, 64, 0, labels=[0] * 10, weights=weights)
    for spec in batches.evaluation():
        batch = batches.materialize(spec)
        expected = [weights[r] if p < spec.real else 0.0 for p, r in enumerate(spec.rows)]
        np.testing.assert_allclose(batch["weight"], expected)


def test_the_classification_step_is_torchs_class_weighted_mean():
    """Row weights (class weight of the label, 0 for filler) in the batch give the loss of
    torch's cross_entropy(weight=class weights); one program serves every weighting."""
    import optax
    import torch

    from peftdebias_jax import masks, models
    from peftdebias_jax.training import steps
    from peftdebias_jax.training.state import TrainState

    config = models.EncoderConfig(
        model_type="bert", vocab_size=40, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, max_position_embeddings=16,
        type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    module, params = models.from_config(config, "classifier", 3, seed=0)
    label_tree = masks.labels(params, [(".*", masks.TRAIN)])
    state = TrainState.create(params, optax.sgd(0.0), 0)
    step = jax.jit(steps.make_classification_train_step(module, optax.sgd(0.0), label_tree))
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 40, (5, 12)).astype(np.int32)
    labels = np.array([0, 1, 2, 2, 1], np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "token_type_ids": np.zeros_like(ids), "label": labels}  # fmt: skip
    logits = np.asarray(steps.make_predict_step(module)(state, batch))
    for class_weights in ([1.0, 1.0, 1.0], [1.0, 6.7, 0.5]):
        row_weights = np.asarray(class_weights, np.float32)[labels] * [1, 1, 1, 1, 0]
        loss = step(state, {**batch, "weight": row_weights})[1]["loss"]
        expected = torch.nn.functional.cross_entropy(
            torch.tensor(logits[:4]), torch.tensor(labels[:4]).long(),
            weight=torch.tensor(class_weights),
        )  # fmt: skip
        np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
    assert step._cache_size() == 1
