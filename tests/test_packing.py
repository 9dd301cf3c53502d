"""Packed rows (several examples per row): each example's states, logits and gradients are
those it gets alone in a row, here against our unpacked pass and against transformers on
the real all-MiniLM-L6-v2 weights and Gab Hate Corpus posts; and the packer wastes little
padding on that real text."""

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from config_fixtures import load_config
from patch_fixtures import randomize_patch
from test_real_text import GHC, assert_same_patches, real_config, train_shapes
from test_upstream import Interrupted, kill_at_batch

from peftdebias_jax import masks, models, peft, phases
from peftdebias_jax.data import mlm, packing, pipeline, splits, tasks
from peftdebias_jax.errors import ConfigError
from peftdebias_jax.models.encoder import offsets_in_segment
from peftdebias_jax.phases import common
from peftdebias_jax.training import steps
from peftdebias_jax.training.state import TrainState

PATCHES = {
    "none": None,
    "seq_bn": peft.PatchConfig("seq_bn", reduction_factor=4),
    "lora": peft.PatchConfig("lora", r=4, target_modules=("query", "value")),
    "prefix": peft.PatchConfig("prefix_tuning", flat=True, prefix_length=3),
}
LENGTHS = [7, 3, 5, 9, 4, 6, 2]  # [CLS] ... [SEP] examples of different lengths
WIDTH, SEGMENTS = 14, 3


def tiny(kind: str) -> models.EncoderConfig:
    return models.EncoderConfig(
        model_type=kind, vocab_size=53, hidden_size=24, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=40, max_position_embeddings=40,
        type_vocab_size=2 if kind == "bert" else 1, pad_token_id=1 if kind == "roberta" else 0,
    )  # fmt: skip


def build(kind: str, head: str, patch: str):
    patches = {} if PATCHES.get(patch) is None else {"debias": PATCHES[patch]}
    if patch == "prompt":
        patches = {"debias": peft.PatchConfig("prompt_tuning", prompt_length=2)}
    module, params = models.from_config(tiny(kind), head, 3, patches, seed=1)
    if patches:
        params = randomize_patch(params, "debias", seed=2)
    return module, params


def examples(pad_id: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(5, 53, size=n).astype(np.int32) for n in LENGTHS]


def alone(sequences, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Every example in its own row, padded to the longest: the unpacked batch."""
    ids = np.full((len(sequences), max(map(len, sequences))), pad_id, np.int32)
    mask = np.zeros_like(ids)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)], mask[i, : len(seq)] = seq, 1
    return ids, mask


def packed(sequences, pad_id: int) -> dict:
    rows = packing.pack([len(s) for s in sequences], WIDTH, SEGMENTS)
    assert any(len(r) > 1 for r in rows), "the fixture should share rows"
    return packing.packed_arrays(sequences, rows, WIDTH, SEGMENTS, pad_id, row_count=len(rows) + 1)


def test_pack_places_every_example_once_within_the_limits():
    rows = packing.pack(LENGTHS, WIDTH, SEGMENTS)
    assert sorted(i for r in rows for i in r) == list(range(len(LENGTHS)))
    assert all(sum(LENGTHS[i] for i in r) <= WIDTH and len(r) <= SEGMENTS for r in rows)
    assert rows == packing.pack(LENGTHS, WIDTH, SEGMENTS)
    assert len(rows) == 3  # 36 tokens: the fewest rows of 14 that can hold them
    with pytest.raises(ValueError, match="example 3 has 9 tokens"):
        packing.pack(LENGTHS, 8, SEGMENTS)


def test_packed_arrays_number_segments_and_point_at_their_first_tokens():
    sequences = examples(0)
    arrays = packed(sequences, 0)
    for r in range(arrays["input_ids"].shape[0]):
        for s, i in enumerate(arrays["example"][r]):
            if i < 0:
                continue
            start = arrays["segment_starts"][r, s]
            span = slice(start, start + LENGTHS[i])
            np.testing.assert_array_equal(arrays["input_ids"][r, span], sequences[i])
            assert np.all(arrays["segment_ids"][r, span] == s + 1)
    assert np.all(arrays["example"][-1] == -1) and np.all(arrays["attention_mask"][-1] == 0)
    offsets = np.asarray(offsets_in_segment(jnp.asarray(arrays["segment_ids"])))
    assert offsets[0, arrays["segment_starts"][0, 1]] == 0
    assert offsets[0, arrays["segment_starts"][0, 1] + 1] == 1


def pick(arrays: dict, values: np.ndarray) -> np.ndarray:
    """Per-slot outputs [R, P, ...] -> one per example, in example order."""
    real = arrays["example"] >= 0
    order = np.argsort(arrays["example"][real])
    return np.asarray(values)[real][order]


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("patch", list(PATCHES))
def test_classifier_logits_and_gradients_equal_each_example_alone(kind, patch):
    module, params = build(kind, "classifier", patch)
    pad = module.config.pad_token_id
    sequences = examples(pad)
    ids, mask = alone(sequences, pad)
    arrays = packed(sequences, pad)
    labels = np.arange(len(sequences)) % 3
    slot_labels = np.where(arrays["example"] >= 0, labels[np.maximum(arrays["example"], 0)], 0)
    weights = (arrays["example"] >= 0).astype(np.float32)

    def unpacked_loss(p):
        logits = module.apply({"params": p}, ids, mask)
        return jnp.sum(-jax.nn.log_softmax(logits)[np.arange(len(labels)), labels]), logits

    def packed_loss(p):
        logits = module.apply({"params": p}, arrays["input_ids"], arrays["attention_mask"],
                              arrays["token_type_ids"], segment_ids=arrays["segment_ids"],
                              segment_starts=arrays["segment_starts"])  # fmt: skip
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), slot_labels[..., None], -1)[..., 0]
        return jnp.sum(ce * weights), logits

    (want, want_logits), want_grads = jax.value_and_grad(unpacked_loss, has_aux=True)(params)
    (got, got_logits), got_grads = jax.value_and_grad(packed_loss, has_aux=True)(params)
    assert got_logits.shape == (*arrays["example"].shape, 3)
    np.testing.assert_allclose(pick(arrays, got_logits), want_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want_grads),
                            jax.tree_util.tree_leaves(got_grads), strict=True):  # fmt: skip
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=str(path))


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_masked_lm_logits_at_packed_positions_equal_each_example_alone(kind):
    module, params = build(kind, "mlm", "seq_bn")
    pad = module.config.pad_token_id
    sequences = examples(pad)
    ids, mask = alone(sequences, pad)
    arrays = packed(sequences, pad)
    full = module.apply({"params": params}, ids, mask)
    got = module.apply({"params": params}, arrays["input_ids"], arrays["attention_mask"],
                       segment_ids=arrays["segment_ids"])  # fmt: skip
    for r, s in zip(*np.nonzero(arrays["example"] >= 0), strict=True):
        i, start = arrays["example"][r, s], arrays["segment_starts"][r, s]
        np.testing.assert_allclose(got[r, start : start + LENGTHS[i]], full[i, : LENGTHS[i]],
                                   rtol=1e-5, atol=1e-5)  # fmt: skip


def test_prompt_tuning_refuses_packed_rows():
    module, params = build("bert", "classifier", "prompt")
    arrays = packed(examples(0), 0)
    with pytest.raises(ValueError, match="prompt tuning cannot run on packed rows"):
        module.apply({"params": params}, arrays["input_ids"], arrays["attention_mask"],
                     segment_ids=arrays["segment_ids"],
                     segment_starts=arrays["segment_starts"])  # fmt: skip


@pytest.mark.parametrize("key", ["config.upstream.pack", "config.downstream.pack"])
def test_a_phase_refuses_to_pack_beside_a_prompt_tuning_patch(key):
    module, _ = build("bert", "classifier", "prompt")
    with pytest.raises(ConfigError, match=f"{key}=True cannot train beside a prompt tuning"):
        common.check_packable(module, key)
    common.check_packable(build("bert", "classifier", "lora")[0], key)


def test_the_configs_pack_except_prompt_tuning_and_the_small_presets():
    for name, preset, packs in [("race_adapter", None, True), ("gender_lora", "minilm", True),
                                ("race_prompt", None, False), ("race_adapter", "demo", False),
                                ("race_adapter", "smoke", False)]:  # fmt: skip
        config = load_config(name, preset)
        assert config.upstream.pack is config.downstream.pack is packs, (name, preset)


def ghc_rows(count: int) -> list[dict]:
    """The first `count` rows of the Gab Hate Corpus file (text, hd, cv, vo)."""
    with GHC.open(newline="") as f:
        return [
            row for _, row in zip(range(count), csv.DictReader(f, delimiter="\t"), strict=False)
        ]


def ghc_posts(count: int) -> list[str]:
    return [row["text"] for row in ghc_rows(count)]


def test_packed_minilm_states_match_transformers_on_each_post_alone(minilm_dir):
    """The gold standard: transformers' BertModel on each real post alone, against our
    encoder on those posts packed several to a row of 128, real weights."""
    tokenizer = models.load_tokenizer(minilm_dir)
    posts = ghc_posts(24)
    sequences = [np.asarray(s, np.int32) for s in
                 tokenizer(posts, truncation=True, max_length=128)["input_ids"]]  # fmt: skip
    rows = packing.pack([len(s) for s in sequences], 128, 16)
    assert len(rows) < len(sequences) / 2
    arrays = packing.packed_arrays(sequences, rows, 128, 16, tokenizer.pad_token_id)
    module, params = models.from_pretrained(minilm_dir)
    out = module.apply({"params": params}, arrays["input_ids"], arrays["attention_mask"],
                       arrays["token_type_ids"], segment_ids=arrays["segment_ids"])  # fmt: skip
    reference = transformers.BertModel.from_pretrained(minilm_dir).eval()
    for r, s in zip(*np.nonzero(arrays["example"] >= 0), strict=True):
        i, start = arrays["example"][r, s], arrays["segment_starts"][r, s]
        with torch.no_grad():
            want = reference(torch.as_tensor(sequences[i][None].astype(np.int64)))
        got = np.asarray(out.last_hidden_state[r, start : start + len(sequences[i])])
        np.testing.assert_allclose(got, want.last_hidden_state[0].numpy(), rtol=1e-4, atol=1e-4)


def test_packing_real_posts_pads_far_less_than_padding_each_batch(minilm_dir):
    """Batches of 32 real Gab Hate Corpus posts: packed into rows of 128 tokens, as many
    rows as each batch needs, under 5% of the tokens are padding; padded to each batch's
    longest post (a tuned PyTorch user's dynamic padding) about half are."""
    tokenizer = models.load_tokenizer(minilm_dir)
    lengths = np.asarray([len(s) for s in tokenizer(ghc_posts(3200), truncation=True,
                                                    max_length=128)["input_ids"]])  # fmt: skip
    packed_slots = dynamic_slots = 0
    for batch in np.random.default_rng(0).permutation(len(lengths)).reshape(-1, 32):
        packed_slots += 128 * len(packing.pack(lengths[batch].tolist(), 128, 16))
        dynamic_slots += 32 * lengths[batch].max()
    real = lengths.sum()
    packed_padding, dynamic_padding = 1 - real / packed_slots, 1 - real / dynamic_slots
    assert packed_padding < 0.08, packed_padding
    assert dynamic_padding > 0.4, dynamic_padding


def ghc_sequences(minilm_dir, count: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Token ids of the first `count` Gab Hate Corpus posts, and their hate labels."""
    tokenizer = models.load_tokenizer(minilm_dir)
    rows = ghc_rows(count)
    ids = tokenizer([r["text"] for r in rows], truncation=True, max_length=128)["input_ids"]
    return [np.asarray(s, np.int32) for s in ids], np.asarray([int(r["hd"]) for r in rows])


def test_length_stratified_batches_are_random_samples_with_steady_token_totals(minilm_dir):
    """Each real post once an epoch, batches differing from epoch to epoch, and each
    batch's token total spread far less than shuffled batches' (what packing rounds up)."""
    sequences, _ = ghc_sequences(minilm_dir, 640)
    sizes = np.asarray([len(s) for s in sequences])
    draw = lambda seed: packing.length_stratified_batches(sizes, 32, np.random.default_rng(seed))  # noqa: E731
    batches = draw(0)
    assert sorted(i for batch in batches for i in batch) == list(range(640))
    assert {frozenset(b) for b in batches}.isdisjoint({frozenset(b) for b in draw(1)})
    assert batches == draw(0)
    stratified = np.std([sizes[list(b)].sum() for b in batches])
    shuffled = np.std(sizes[np.random.default_rng(0).permutation(640)].reshape(20, 32).sum(axis=1))
    assert stratified < shuffled / 3, (stratified, shuffled)


def test_packed_batches_hold_each_example_once_an_epoch_in_few_row_counts(minilm_dir):
    sequences, labels = ghc_sequences(minilm_dir, 600)
    weights = np.where(labels == 1, 5.0, 1.0)
    make = lambda: packing.PackedBatches(sequences, 32, 128, 0, 7, None, labels, 40,  # noqa: E731
                                         run_length=10, row_count_limit=8, compile_steps=4.0,
                                         weights=weights)  # fmt: skip
    batches = make()
    assert 1 <= len(batches.row_counts) <= 3, batches.row_counts
    for epoch in (0, 1):
        specs = batches.training_epoch(epoch)
        assert len(specs) == 19  # ceil(600 / 32): the last batch wraps around
        seen = [i for spec in specs for i in spec.rows]
        assert set(seen) == set(range(600)) and len(seen) == 19 * 32
        assert all(spec.length in batches.row_counts for spec in specs)
        assert specs == make().training_epoch(epoch), "a pure function of (seed, epoch)"
    assert batches.training_epoch(0) != batches.training_epoch(1)
    spec = batches.training_epoch(0)[0]
    arrays = batches.materialize(spec)
    assert arrays["input_ids"].shape == (spec.length, 128)
    assert arrays["label"].shape == arrays["weight"].shape == (spec.length, 16)
    slots = arrays["weight"] > 0
    assert slots.sum() == 32
    segment_lengths = [
        int(np.sum(arrays["segment_ids"][r] == s + 1))
        for r, s in zip(*np.nonzero(slots), strict=True)
    ]
    assert sorted(segment_lengths) == sorted(len(sequences[i]) for i in spec.rows)
    assert sorted(arrays["weight"][slots]) == sorted(weights[list(spec.rows)])
    specs, _ = batches.next_call(0, 0, 10)
    assert len({s.length for s in specs}) == 1, "a call stacks batches of one shape"
    padding = 1 - sum(map(len, sequences)) / (
        128 * sum(s.length for s in batches.training_epoch(0))
    )
    assert padding < 0.2, padding


def test_a_packed_train_step_equals_the_unpacked_one_on_real_posts(minilm_dir):
    """One downstream step (class weights) on 32 real posts with the real weights, dropout
    off: packed and padded batches give the same loss and gradient (plain SGD with rate 1:
    each weight moves by its gradient; Adam's first update, about lr * sign(gradient),
    would blow float rounding of near-zero gradients up to the rate)."""
    sequences, labels = ghc_sequences(minilm_dir, 32)
    module, params = models.from_pretrained(minilm_dir, head="classifier", num_labels=2)
    config = module.config.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    module = module.clone(config=config)
    label_tree = masks.labels(params, [(".*", "train")])
    tx = masks.optimizer(optax.sgd(1.0), label_tree)
    step = jax.jit(steps.make_classification_train_step(module, tx, label_tree))
    weights = np.where(labels == 1, 5.0, 1.0).astype(np.float32)
    padded = pipeline.Batches(
        sequences, 32, 128, 0, 0, None, labels, weights=weights, lengths=[128]
    )
    packed = packing.PackedBatches(sequences, 32, 128, 0, 0, None, labels, 1, weights=weights)
    plain_batch = padded.materialize(padded.evaluation()[0])
    plain_batch["token_type_ids"] = np.zeros_like(plain_batch["input_ids"])
    packed_spec = packed.training_epoch(0)[0]
    packed_batch = packed.materialize(packed_spec)
    assert packed_batch["input_ids"].size < plain_batch["input_ids"].size / 2
    state = TrainState.create(params, tx, 0)
    want_state, want = step(state, plain_batch)
    got_state, got = step(TrainState.create(params, tx, 0), packed_batch)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-4)
    moved = lambda new: jax.tree_util.tree_map(jnp.subtract, params, new.params)  # noqa: E731
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(moved(want_state)),
                            jax.tree_util.tree_leaves(moved(got_state)), strict=True):  # fmt: skip
        # float32 weights near 1 resolve steps of about 1e-7: a floor for leaves that barely move
        atol = max(1e-4 * float(jnp.max(jnp.abs(w))), 1e-6)
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=atol, err_msg=str(path))


def test_packed_masked_lm_batches_weigh_rows_and_seed_their_masks(minilm_dir):
    """Without labels (upstream) a packed batch carries a weight and a mask seed per row,
    as padded rows do: weight 1 where a row holds a sequence, 0 in filler rows."""
    sequences, _ = ghc_sequences(minilm_dir, 200)
    batches = packing.PackedBatches(sequences, 32, 128, 0, 3, None, None, 7, run_length=10)
    seen = []
    for spec in batches.training_epoch(0):
        batch = batches.materialize(spec)
        assert "label" not in batch and "segment_starts" not in batch
        np.testing.assert_array_equal(batch["index"], np.arange(spec.length))
        holds = batch["segment_ids"].max(axis=1) > 0
        np.testing.assert_array_equal(batch["weight"], holds.astype(np.float32))
        for row in batch["segment_ids"]:
            seen.append(int(row.max()))
    assert sum(seen) == 32 * len(batches.training_epoch(0))


@pytest.mark.parametrize("labelled", [True, False])
def test_each_process_takes_its_share_of_a_packed_batch(minilm_dir, labelled):
    """Two processes' halves of a packed batch (`Runner.local_rows` of the 32 positions) are
    the two halves of its rows, mask seeds included: together, the one-process batch."""
    sequences, labels = ghc_sequences(minilm_dir, 200)
    batches = packing.PackedBatches(sequences, 32, 128, 0, 3, None,
                                    labels if labelled else None, 7, rows_multiple=4)  # fmt: skip
    spec = batches.training_epoch(0)[0]
    whole = batches.materialize(spec)
    halves = [batches.materialize(spec, slice(0, 16)), batches.materialize(spec, slice(16, 32))]
    assert whole.keys() == halves[0].keys() and spec.length % 4 == 0
    for key, value in whole.items():
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), value, key)
    with pytest.raises(ValueError, match="do not split"):
        batches.materialize(spec, slice(0, 5))


def test_packed_masked_lm_loss_and_gradients_equal_the_unpacked_ones(minilm_dir):
    """The upstream loss on 32 real posts packed into rows of 128, with the decoder on the
    training step's capped positions (mean + 3 sd a row and a batch), equals the exact loss
    on the same posts padded one to a row with the same tokens masked, gradients too."""
    sequences, _ = ghc_sequences(minilm_dir, 32)
    tokenizer = models.load_tokenizer(minilm_dir)
    module, params = models.from_pretrained(minilm_dir, head="mlm")
    config = module.config.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    module = module.clone(config=config)
    ids, attention = alone(sequences, 0)
    plain = {"input_ids": ids, "attention_mask": attention, "weight": np.ones(32, np.float32),
             "index": np.arange(32)}  # fmt: skip
    masking = steps.MaskingConfig(
        mlm.special_ids_of(tokenizer), tokenizer.mask_token_id, len(tokenizer)
    )
    inputs, selected = masking.mask(jax.random.key(0), plain, plain["index"])
    rows = packing.pack([len(s) for s in sequences], 128, 16)
    arrays = packing.packed_arrays(sequences, rows, 128, 16, 0)
    assert len(rows) < 32 / 3
    packed_inputs = np.array(arrays["input_ids"])
    packed_selected = np.zeros_like(packed_inputs, bool)
    for r, s in zip(*np.nonzero(arrays["example"] >= 0), strict=True):
        i, start = arrays["example"][r, s], arrays["segment_starts"][r, s]
        packed_inputs[r, start : start + len(sequences[i])] = inputs[i, : len(sequences[i])]
        packed_selected[r, start : start + len(sequences[i])] = selected[i, : len(sequences[i])]
    assert packed_selected.sum() == int(selected.sum()) > 100
    limit = steps.max_predictions_for(128, 0.15, -1)
    total = steps.batch_predictions_for(len(rows), 128, 0.15, -1)
    assert packed_selected.sum(axis=1).max() <= limit and packed_selected.sum() <= total

    most = int(selected.sum(axis=1).max())  # every selected position: exact, fewer logits

    def unpacked(p):
        return steps.mlm_loss_sum(module, p, inputs, plain["input_ids"],
                                  plain["attention_mask"], selected, None, most)  # fmt: skip

    def packed_loss(p):
        return steps.mlm_loss_sum(module, p, packed_inputs, arrays["input_ids"],
                                  arrays["attention_mask"], packed_selected, None, limit, total,
                                  segment_ids=arrays["segment_ids"])  # fmt: skip

    want, want_grads = jax.jit(jax.value_and_grad(unpacked))(params)
    got, got_grads = jax.jit(jax.value_and_grad(packed_loss))(params)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want_grads),
                            jax.tree_util.tree_leaves(got_grads), strict=True):  # fmt: skip
        atol = max(1e-4 * float(jnp.max(jnp.abs(w))), 1e-6)
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=atol, err_msg=str(path))


def test_packed_scoring_holds_each_example_once_in_one_shape(minilm_dir):
    """A scored set of 600 real posts packed: every post once, in batches of one shape of at
    most the row limit (a multiple of the devices) that pad little, with its label per slot,
    its example count per row, and outputs per slot traced back to their posts."""
    sequences, labels = ghc_sequences(minilm_dir, 600)
    scoring = packing.PackedScoring(sequences, 32, 128, 0, None, labels, 16, rows_multiple=4)
    specs = scoring.evaluation()
    assert scoring.batch_size <= 32 and scoring.batch_size % 4 == 0
    assert len(specs) * scoring.batch_size < len(scoring.rows) + 4 * len(specs)
    seen, tokens = [], 0
    for spec in specs:
        arrays = scoring.materialize(spec)
        assert arrays["input_ids"].shape == (scoring.batch_size, 128)
        example = scoring.examples(spec)
        assert arrays["weight"].tolist() == (example >= 0).sum(axis=1).tolist()
        np.testing.assert_array_equal(arrays["label"][example >= 0], labels[example[example >= 0]])
        outputs = np.where(example >= 0, example, -7)[..., None] * np.ones(3)
        got, scored = scoring.per_example(spec, outputs)
        np.testing.assert_array_equal(scored[:, 0], got)
        seen += got.tolist()
        tokens += arrays["input_ids"].size
        half = scoring.materialize(spec, slice(0, scoring.batch_size // 2))
        np.testing.assert_array_equal(half["segment_ids"],
                                      arrays["segment_ids"][: scoring.batch_size // 2])  # fmt: skip
    assert sorted(seen) == list(range(600))
    padding = 1 - sum(map(len, sequences)) / tokens
    assert padding < 0.1, padding


def test_packed_predictions_and_eval_loss_equal_each_example_alone(minilm_dir):
    """On 64 real posts with the real weights: the predict step on packed rows gives each
    post the logits it gets padded alone, and the masked-LM eval step on packed rows the
    exact loss, masked-position count and example count of the posts alone with the same
    tokens masked."""
    sequences, labels = ghc_sequences(minilm_dir, 64)
    scoring = packing.PackedScoring(sequences, 12, 128, 0, None, labels, 16)
    specs = scoring.evaluation()  # 21 rows: 11 and 10 with a filler row
    assert [spec.real for spec in specs] == [scoring.batch_size, scoring.batch_size - 1]
    module, params = models.from_pretrained(minilm_dir, head="classifier", num_labels=2)
    predict = jax.jit(steps.make_predict_step(module))
    state = TrainState.create(params, optax.sgd(0.0), 0)
    ids, attention = alone(sequences, 0)
    want = predict(state, {"input_ids": ids, "attention_mask": attention,
                           "token_type_ids": np.zeros_like(ids)})  # fmt: skip
    got = np.zeros_like(want)
    for spec in scoring.evaluation():
        examples, scored = scoring.per_example(spec, predict(state, scoring.materialize(spec)))
        got[examples] = scored
    np.testing.assert_allclose(got, want, atol=2e-5)

    tokenizer = models.load_tokenizer(minilm_dir)
    module, params = models.from_pretrained(minilm_dir, head="mlm")
    masking = steps.MaskingConfig(
        mlm.special_ids_of(tokenizer), tokenizer.mask_token_id, len(tokenizer)
    )
    evaluate = jax.jit(steps.make_mlm_eval_step(module, masking))
    state = TrainState.create(params, optax.sgd(0.0), 0)
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, steps.EVAL_STREAM), 0)
    for spec in scoring.evaluation():
        batch = scoring.materialize(spec)
        got = evaluate(state, batch)
        inputs, selected = masking.mask(rng, batch, batch["row"])
        example = scoring.examples(spec)
        members = example[example >= 0]
        alone_inputs, alone_attention = alone([sequences[i] for i in members], 0)
        alone_selected = np.zeros(alone_inputs.shape, bool)
        for k, (r, s) in enumerate(zip(*np.nonzero(example >= 0), strict=True)):
            start, n = batch["segment_starts"][r, s], len(sequences[members[k]])
            alone_inputs[k, :n] = inputs[r, start : start + n]
            alone_selected[k, :n] = selected[r, start : start + n]
        alone_ids, _ = alone([sequences[i] for i in members], 0)
        want = steps.mlm_loss_sum(module, params, alone_inputs, alone_ids, alone_attention,
                                  alone_selected, None)  # fmt: skip
        assert float(got["count"]) == alone_selected.sum() > 20
        assert float(got["examples"]) == len(members)
        np.testing.assert_allclose(got["loss_sum"], want, rtol=1e-5)


def padding_of(workdir, phase: str) -> float:
    """The phase's padding fraction over its logged steps (metrics.jsonl)."""
    real = padded = 0.0
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("phase") == phase and "padding" in record:
            tokens = record["real_tokens_per_s"] / record["examples_per_s"]
            real, padded = real + tokens, padded + tokens / (1 - record["padding"])
    return 1 - real / padded


def compiled_shapes(caplog, program: str) -> list[str]:
    """The batch shapes `program` (e.g. "predict step") was compiled for, in order."""
    return [r.getMessage().split("batch shape ")[1].split(" (")[0] for r in caplog.records
            if f"compiling {program} for batch shape" in r.getMessage()]  # fmt: skip


def bucket_padding(config) -> float:
    """The padding of the length buckets `config`'s downstream phase trains on when it does
    not pack: its first num_steps training batches' real tokens over their slots, the
    batches built as the phase builds them (no training needed to count them)."""
    dn = config.downstream
    data = splits.load_task_data(config, tasks.get(dn.task))
    tokenizer = models.load_tokenizer(config.model.name)
    ids, types, ys = splits.encode_examples(tokenizer, data["train"], data["labels"], dn.max_len)
    batches = pipeline.Batches(ids, dn.batch_size, dn.max_len, tokenizer.pad_token_id,
                               config.seed, types, ys, dn.bucket_run_length, dn.bucket_count,
                               **common.bucket_costs(dn, ids, dn.num_steps))  # fmt: skip
    specs, epoch = [], 0
    while len(specs) < dn.num_steps:
        specs, epoch = specs + batches.training_epoch(epoch), epoch + 1
    specs = specs[: dn.num_steps]
    real = sum(len(ids[i]) for spec in specs for i in spec.rows)
    return 1 - real / sum(len(spec.rows) * spec.length for spec in specs)


def test_packed_downstream_on_gab_hate_corpus(tmp_path, minilm_dir, monkeypatch, caplog):
    """The downstream phase as the race config runs it (steps_per_call 10, runs of 10,
    max_len 128), plain fine-tuning of the real all-MiniLM-L6-v2 on real posts, batches of
    32 packed: it finishes with finite numbers, predicts with one program, pads less than
    the length buckets would on the same examples, and a run killed inside a multi-step
    call resumes to the same predictions."""
    caplog.set_level("INFO", logger="peftdebias_jax")

    def config(pack: bool):
        config = real_config("race_adapter", minilm_dir, GHC)
        config.phases, config.patch.method = ("downstream",), "none"
        dn = config.downstream
        dn.update(batch_size=32, pack=pack)
        dn.max_examples.update(train=320, validation=64)
        return config

    phases.run(config(True), tmp_path / "packed")
    shapes = train_shapes(caplog, "downstream")
    assert shapes and all(shape.endswith(", 128)") for shape in shapes), shapes
    assert any("packed into rows of 128 tokens" in r.getMessage() for r in caplog.records)
    predict_shapes = compiled_shapes(caplog, "predict step")
    assert len(predict_shapes) == 1 and predict_shapes[0].endswith(", 128)"), predict_shapes
    results = json.loads((tmp_path / "packed" / "downstream_results.json").read_text())
    assert 0 <= results["validation"]["accuracy"] <= 100
    packed, buckets = padding_of(tmp_path / "packed", "downstream"), bucket_padding(config(False))
    assert packed < buckets and packed < 0.2, (packed, buckets)

    with kill_at_batch(monkeypatch, 15), pytest.raises(Interrupted):
        phases.run(config(True), tmp_path / "resumed")
    phases.run(config(True), tmp_path / "resumed")
    for name in ("packed", "resumed"):
        assert (tmp_path / name / "downstream.done.json").exists()
    want = (tmp_path / "packed" / "predictions" / "validation.jsonl").read_text()
    assert (tmp_path / "resumed" / "predictions" / "validation.jsonl").read_text() == want


def test_packed_upstream_on_gab_hate_corpus(tmp_path, minilm_dir, monkeypatch, caplog):
    """The upstream phase as the race config runs it (CDA, seq_bn, steps_per_call 10, runs
    of 10) with its head warm-up, real all-MiniLM-L6-v2 on real posts, batches of 32
    sequences packed into rows of 128: it finishes, pads under 15% of its training tokens,
    evaluates with one program, and a run killed inside a multi-step call resumes to the
    same patch bits."""
    caplog.set_level("INFO", logger="peftdebias_jax")
    config = real_config("race_adapter", minilm_dir, GHC, batch_size=32, pack=True)
    config.phases = ("upstream",)
    phases.run(config, tmp_path / "packed")
    for name in ("upstream_head", "upstream"):
        shapes = train_shapes(caplog, name)
        assert shapes and all(shape.endswith(", 128)") for shape in shapes), (name, shapes)
        assert any(r.getMessage().startswith(f"{name}: 32 sequences a batch packed into rows")
                   for r in caplog.records), name  # fmt: skip
        padding = padding_of(tmp_path / "packed", name)
        assert padding < 0.15, (name, padding)
        eval_shapes = compiled_shapes(caplog, f"{name} eval step")
        assert len(eval_shapes) == 1 and eval_shapes[0].endswith(", 128)"), (name, eval_shapes)

    # killed while its step 14 is prepared (a call of steps 11-20, after the warm-up's 10)
    with kill_at_batch(monkeypatch, 24), pytest.raises(Interrupted):
        phases.run(config, tmp_path / "resumed")
    phases.run(config, tmp_path / "resumed")
    assert_same_patches(tmp_path / "packed", tmp_path / "resumed")


def test_the_epoch_order_is_the_same_on_any_number_of_devices(minilm_dir):
    """Row counts round up to the devices, but batches are grouped by the counts fitted
    without them: one device and four train on the same batches in the same order."""
    sequences, labels = ghc_sequences(minilm_dir, 600)
    make = lambda devices: packing.PackedBatches(sequences, 32, 128, 0, 5, None, labels, 60,  # noqa: E731
                                                 run_length=10, compile_steps=1.0,
                                                 rows_multiple=devices)  # fmt: skip
    one, four = make(1), make(4)
    assert len(one.fitted) > 1 and all(count % 4 == 0 for count in four.row_counts)
    for epoch in range(3):
        specs = [four.training_epoch(epoch), one.training_epoch(epoch)]
        assert [s.rows for s in specs[0]] == [s.rows for s in specs[1]]
        assert all(a.length == -(-b.length // 4) * 4 for a, b in zip(*specs, strict=True))


def test_row_counts_hold_every_batch_of_the_epochs_a_run_touches():
    """A run of fewer updates than an epoch still builds the whole epoch's order: the row
    counts are fitted over all its batches, not only the first `updates` drawn."""
    sequences = [np.ones(n, np.int32) for n in [1] * 32 + [10] * 32]
    for seed in range(10):
        batches = packing.PackedBatches(sequences, 32, 10, 0, seed, None, [0] * 64, 1)
        needs = [len(batches.packed(spec.rows)) for spec in batches.training_epoch(0)]
        assert max(needs) <= batches.row_counts[-1], (seed, needs, batches.row_counts)
