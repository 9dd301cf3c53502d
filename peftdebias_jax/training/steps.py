"""Pure train and eval steps: step(state, batch) -> (state, metrics).

The masked-LM loss is the mean cross-entropy over the selected positions of the whole
(global) batch. Under `pmap` (axis_name set) each device holds part of the batch: counts
are summed across devices before normalising and gradients are summed after, a batch's
cap on masked positions counts across devices, and dropout masks are drawn by global row
(`dropout.rows_from`), so every mode computes the same update as one device would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from peftdebias_jax import masks
from peftdebias_jax.data import mlm
from peftdebias_jax.models import dropout
from peftdebias_jax.training.state import TrainState

EVAL_STREAM = 2**31 - 1  # fold-in constant of the evaluation masks (fixed across evals)


@dataclass(frozen=True)
class MaskingConfig:
    special_ids: tuple[int, ...]
    mask_id: int
    vocab_size: int
    rate: float = 0.15

    def mask(self, rng, batch, row_seeds) -> tuple[jax.Array, jax.Array]:
        """(masked inputs, selected positions) of a batch; filler rows select nothing."""
        inputs, selected = mlm.mask_tokens(
            rng,
            batch["input_ids"],
            batch["attention_mask"],
            row_seeds,
            special_ids=self.special_ids,
            mask_id=self.mask_id,
            vocab_size=self.vocab_size,
            rate=self.rate,
        )
        return inputs, selected & (batch["weight"][:, None] > 0)


def psum(x, axis_name: str | None):
    return jax.lax.psum(x, axis_name) if axis_name else x


def _mean_plus_three_sd(n: int, rate: float) -> int:
    """ceil(mean + 3 standard deviations) of Binomial(n, rate)."""
    return math.ceil(n * rate + 3 * math.sqrt(n * rate * (1 - rate)))


def max_predictions_for(length: int, rate: float, setting: int) -> int:
    """Decoder positions per sequence: `setting` when > 0; 0 = every position (exact); -1 =
    mean + 3 standard deviations of Binomial(length, rate), e.g. 32 of 128 at 15%."""
    if setting > 0:
        return min(setting, length)
    if setting == 0:
        return length
    return min(length, _mean_plus_three_sd(length, rate))


def batch_predictions_for(batch: int, length: int, rate: float, setting: int) -> int | None:
    """Decoder rows per batch: with `setting` -1, mean + 3 standard deviations of
    Binomial(batch * length, rate) when that is fewer than the rows max_predictions_for
    leaves (188 of 8 x 32 = 256 for 8 x 128 at 15%: a batch's total varies far less than
    a row's); otherwise None, no cap on the batch."""
    if setting != -1:
        return None
    total = _mean_plus_three_sd(batch * length, rate)
    return total if total < batch * max_predictions_for(length, rate, setting) else None


def cap_selection(selected: jax.Array, limit: int) -> jax.Array:
    """The first `limit` selected positions of each row (the rest unselected)."""
    return selected & (jnp.cumsum(selected, axis=1) <= limit)


def cap_batch_selection(selected: jax.Array, limit: int, before: jax.Array | int = 0) -> jax.Array:
    """The first `limit` selected positions of the whole batch, rows in order; `before`:
    how many the devices holding earlier rows of the batch selected."""
    flat = selected.reshape(-1)
    return (flat & (jnp.cumsum(flat) + before <= limit)).reshape(selected.shape)


def first_row(axis_name: str | None, rows: int) -> jax.Array | int:
    """Global index of this device's first row of the batch (0 off `pmap`)."""
    return jax.lax.axis_index(axis_name) * rows if axis_name else 0


def selected_before(count: jax.Array, axis_name: str | None) -> jax.Array | int:
    """Sum of `count` over the devices holding earlier rows of the batch (0 off `pmap`)."""
    if not axis_name:
        return 0
    counts = jax.lax.all_gather(count, axis_name)
    index = jax.lax.axis_index(axis_name)
    return jnp.sum(jnp.where(jnp.arange(counts.shape[0]) < index, counts, 0))


def _selected_first(selected: jax.Array, count: int) -> jax.Array:
    """Indices of the first `count` entries of each row of `selected`, selected ones first
    (in order): a static shape holding every selected entry when at most `count` are."""
    return jnp.argsort(~selected, axis=-1, stable=True)[..., :count]


def mlm_loss_sum(module, params, inputs, labels, attention_mask, selected, dropout_rng,
                 max_predictions: int | None = None,
                 batch_predictions: int | None = None,
                 segment_ids: jax.Array | None = None):  # fmt: skip
    """Summed cross-entropy over the selected positions. With `max_predictions` the last
    block runs on that many positions per row (the selected ones first; a static shape)
    instead of all of them, and with `batch_predictions` too the head and decoder run on
    that many of those rows: `selected` must then hold at most that many per row
    (cap_selection) and per batch (cap_batch_selection). `segment_ids`: packed rows
    (`data.packing`), each example attending only to itself."""
    positions = rows = None
    if max_predictions is not None and max_predictions < inputs.shape[1]:
        positions = _selected_first(selected, max_predictions)
        labels = jnp.take_along_axis(labels, positions, axis=1)
        selected = jnp.take_along_axis(selected, positions, axis=1)
        if batch_predictions is not None and batch_predictions < selected.size:
            rows = _selected_first(selected.reshape(-1), batch_predictions)
            labels, selected = labels.reshape(-1)[rows], selected.reshape(-1)[rows]
    logits = module.apply(
        {"params": params},
        inputs,
        attention_mask,
        deterministic=dropout_rng is None,
        rngs=None if dropout_rng is None else {"dropout": dropout_rng},
        mlm_positions=positions,
        mlm_rows=rows,
        segment_ids=segment_ids,
    )
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return jnp.sum(ce * selected)


def all_finite(tree) -> jax.Array:
    """1.0 if every value of `tree` is finite, else 0.0. The built-in steps do not report
    it: AdamW's update is finite whenever the gradient norm (always reported and checked)
    is, and a pass over every parameter costs ~2% of a full fine-tuning step on CPU. A
    custom step may still report it as "params_finite"; the training loop checks it."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)).astype(jnp.float32)


def l1_penalty(trainable, anchor, coefficient: float, total_params: int) -> jax.Array:
    """The sparse fine-tuning regulariser: coefficient * sum |theta - theta_0| / N_all, with
    N_all every parameter of the model, frozen ones included (METHOD.md §3.6)."""
    diffs = jax.tree_util.tree_map(lambda p, a: jnp.sum(jnp.abs(p - a)), trainable, anchor)
    return coefficient * sum(jax.tree_util.tree_leaves(diffs)) / total_params


def make_mlm_train_step(
    module,
    tx: optax.GradientTransformation,
    label_tree,
    masking: MaskingConfig,
    axis_name: str | None = None,
    l1: float = 0.0,
    total_params: int = 1,
    max_predictions: int = 0,
):
    """The upstream step: dynamic masking, masked-LM loss, gradients of trainable leaves;
    with `l1` > 0 also the L1 pull of the trainable leaves towards `state.anchor`, whose
    gradient is added after the (cross-device) masked-LM gradient, as the reference adds
    it in a separate backward pass. `max_predictions` (see max_predictions_for): the
    decoder runs only on that many masked positions per row; 0 = on all positions; -1
    also caps the batch's decoder rows (batch_predictions_for). A batch with `segment_ids`
    holds packed rows (`data.packing.PackedBatches`): the caps count per packed row."""

    def loss_fn(params, inputs, labels, attention_mask, selected, dropout_rng, count, limits,
                segment_ids):  # fmt: skip
        total = mlm_loss_sum(module, params, inputs, labels, attention_mask, selected,
                             dropout_rng, *limits, segment_ids=segment_ids)  # fmt: skip
        return total / count

    grad_fn = masks.value_and_grad(loss_fn, label_tree)

    def step(state: TrainState, batch):
        step_rng = jax.random.fold_in(state.rng, state.step)
        mask_rng, dropout_rng = jax.random.split(step_rng)
        ids, attention = batch["input_ids"], batch["attention_mask"]
        inputs, selected = masking.mask(mask_rng, batch, batch["index"])
        rows, length = ids.shape
        devices = jax.lax.axis_size(axis_name) if axis_name else 1
        limit = max_predictions_for(length, masking.rate, max_predictions)
        total = batch_predictions_for(rows * devices, length, masking.rate, max_predictions)
        selected = cap_selection(selected, limit)
        if total is not None:
            before = selected_before(jnp.sum(selected), axis_name)
            selected = cap_batch_selection(selected, total, before)
            total = min(total, rows * limit)  # what this device's part can hold
        count = jnp.maximum(psum(jnp.sum(selected), axis_name), 1).astype(jnp.float32)
        with dropout.rows_from(first_row(axis_name, rows)):
            loss, grads = grad_fn(state.params, inputs, ids, attention, selected, dropout_rng,
                                  count, (limit, total), batch.get("segment_ids"))  # fmt: skip
        loss, grads = psum(loss, axis_name), psum(grads, axis_name)
        if l1:
            current, frozen = masks.split(state.params, label_tree)
            penalty, pull = jax.value_and_grad(l1_penalty)(current, state.anchor, l1, total_params)
            zeros = jax.tree_util.tree_map(jnp.zeros_like, frozen)
            grads = jax.tree_util.tree_map(jnp.add, grads, masks.merge(pull, zeros))
            loss = loss + penalty
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        trainable, _ = masks.split(grads, label_tree)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(trainable),
            "masked": count,
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


def capped_loss_sum(module, params, inputs, labels, attention_mask, selected,
                    rate: float | None, segment_ids: jax.Array | None = None):  # fmt: skip
    """(mlm_loss_sum, fits): the decoder on at most mean + 3 sd of Binomial(length, rate)
    positions per row and of Binomial(rows * length, rate) per batch, about a fifth of the
    vocabulary-sized logits (1 GB at 32 x 256 for BERT's vocabulary). The sum is exact
    when `fits`; in the rare batch that selects more, it leaves positions out and the batch
    must be scored again with `rate=None` (every position). One forward pass per program:
    choosing on the device (`lax.cond`) would compile both."""
    rows, length = labels.shape
    per_row = None if rate is None else max_predictions_for(length, rate, -1)
    if per_row is None or per_row >= length:
        total = mlm_loss_sum(module, params, inputs, labels, attention_mask, selected, None,
                             segment_ids=segment_ids)  # fmt: skip
        return total, jnp.bool_(True)
    per_batch = batch_predictions_for(rows, length, rate, -1)
    counts = jnp.sum(selected, axis=1)
    fits = jnp.all(counts <= per_row)
    if per_batch is not None:
        fits &= jnp.sum(counts) <= per_batch
    total = mlm_loss_sum(module, params, inputs, labels, attention_mask, selected, None,
                         per_row, per_batch, segment_ids)  # fmt: skip
    return total, fits


def make_mlm_eval_step(module, masking: MaskingConfig, axis_name: str | None = None,
                       exact: bool = False):  # fmt: skip
    """Summed loss and count of masked positions for one batch, with fixed eval masks
    (seeded by each row's `row`); packed rows (`data.packing.PackedScoring`) weigh a row
    by the examples it holds, so `examples` counts examples either way. The decoder runs on
    capped positions (capped_loss_sum) unless `exact`; `overflow` > 0 says the batch
    selected more than the caps hold and must be scored again by the `exact` step
    (mlm_eval_metrics does that), whose program then compiles."""
    rate = None if exact else masking.rate

    def step(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, EVAL_STREAM), 0)
        ids, attention = batch["input_ids"], batch["attention_mask"]
        inputs, selected = masking.mask(rng, batch, batch["row"])
        total, fits = capped_loss_sum(module, state.params, inputs, ids, attention, selected,
                                      rate, batch.get("segment_ids"))  # fmt: skip
        return {
            "loss_sum": psum(total, axis_name),
            "count": psum(jnp.sum(selected).astype(jnp.float32), axis_name),
            "examples": psum(jnp.sum(batch["weight"]), axis_name),
            "overflow": psum(1.0 - fits.astype(jnp.float32), axis_name),
        }

    return step


def mlm_eval_metrics(capped: Callable, exact: Callable, state: TrainState, batch) -> dict:
    """One eval batch's metrics on the host: the capped step's, or the exact step's for a
    batch that overflows the caps (make_mlm_eval_step)."""
    metrics = jax.device_get(capped(state, batch))
    if float(metrics["overflow"]) > 0:
        metrics = jax.device_get(exact(state, batch))
    return metrics


def hf_eval_loss(batch_metrics: Sequence[dict]) -> float:
    """transformers' eval loss: per-batch mean loss, weighted by the batch's example count."""
    weighted = examples = 0.0
    for m in batch_metrics:
        if float(m["count"]) > 0:
            weighted += float(m["loss_sum"]) / float(m["count"]) * float(m["examples"])
            examples += float(m["examples"])
    return weighted / examples if examples else float("nan")


def make_classification_train_step(
    module,
    tx: optax.GradientTransformation,
    label_tree,
    axis_name: str | None = None,
    regularizer=None,
):
    """The downstream step: weighted cross-entropy, normalised like torch's class-weighted
    mean: sum_i w_i ce_i / sum_i w_i over the (global) batch, with each row's weight w_i
    (its label's class weight; 0 for filler) in batch["weight"], so that one program serves
    every weighting; plus `regularizer(params)` when given (its gradient added once, after
    the cross-device sum). Packed batches (`data.packing`) carry labels and weights per
    slot [rows, slots]: the same sums."""

    def loss_fn(params, batch, dropout_rng, total_weight):
        logits = module.apply(
            {"params": params},
            batch["input_ids"],
            batch["attention_mask"],
            batch["token_type_ids"],
            deterministic=False,
            rngs={"dropout": dropout_rng},
            **packed_inputs(batch),
        )
        ce = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch["label"]
        )
        return jnp.sum(ce * batch["weight"]) / total_weight

    grad_fn = masks.value_and_grad(loss_fn, label_tree)

    def step(state: TrainState, batch):
        dropout_rng = jax.random.fold_in(state.rng, state.step)
        total = jnp.maximum(psum(jnp.sum(batch["weight"]), axis_name), 1e-12)
        with dropout.rows_from(first_row(axis_name, batch["label"].shape[0])):
            loss, grads = grad_fn(state.params, batch, dropout_rng, total)
        loss, grads = psum(loss, axis_name), psum(grads, axis_name)
        if regularizer is not None:
            penalty, pull = masks.value_and_grad(regularizer, label_tree)(state.params)
            grads = jax.tree_util.tree_map(jnp.add, grads, pull)
            loss = loss + penalty
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(masks.split(grads, label_tree)[0]),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


def packed_inputs(batch) -> dict:
    """The model's packed-row inputs when the batch has them (`data.packing`), else none."""
    if "segment_ids" not in batch:
        return {}
    return {"segment_ids": batch["segment_ids"], "segment_starts": batch["segment_starts"]}


def make_predict_step(module):
    """Label logits of a batch (no dropout); used for validation and test predictions.
    Packed rows (`data.packing.PackedScoring`): logits per slot [rows, slots, labels]."""

    def step(state: TrainState, batch):
        return module.apply(
            {"params": state.params},
            batch["input_ids"],
            batch["attention_mask"],
            batch["token_type_ids"],
            **packed_inputs(batch),
        ).astype(jnp.float32)

    return step


def repeated(step):
    """`step(state, batch)` as `run(state, batches, count)`: the first `count` of the stacked
    batches (leaves [K, ...]) applied in order within one compiled call; metrics come back
    stacked [K] (entries past `count` are zeros). One program serves every count <= K, and
    K steps share one dispatch and one scratch allocation: on CPU XLA maps a fresh scratch
    block (1.3-1.6 GB at BERT-base shapes) for every call and page-faults it in again."""

    # jitted so that the loop body reuses the trace that `eval_shape` makes (tracing a
    # BERT-base train step takes seconds)
    traced_once = jax.jit(step)

    def run(state: TrainState, batches, count: jax.Array):
        first = jax.tree_util.tree_map(lambda x: x[0], batches)
        shapes = jax.eval_shape(traced_once, state, first)[1]
        slots = jax.tree_util.tree_leaves(batches)[0].shape[0]
        stacked = jax.tree_util.tree_map(lambda s: jnp.zeros((slots, *s.shape), s.dtype), shapes)

        def body(i, carry):
            state, stacked = carry
            batch = jax.tree_util.tree_map(
                lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), batches
            )
            state, metrics = traced_once(state, batch)
            stacked = jax.tree_util.tree_map(lambda buf, v: buf.at[i].set(v), stacked, metrics)
            return state, stacked

        return jax.lax.fori_loop(0, count, body, (state, stacked))

    return run
