"""Run by test_parallel.py in a subprocess with 4 host devices: the upstream (5 steps) and
downstream (4 steps) phases under each parallel mode, length buckets or packed rows;
prints the largest difference of the trained parameters to single-device jit."""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from config_fixtures import load_config
from flax import traverse_util

from peftdebias_jax import phases
from peftdebias_jax.training import parallel


def run(mode: str, workdir: Path, name: str, pack: bool) -> dict:
    config = load_config(name, "smoke")
    config.upstream.pack = config.downstream.pack = pack
    config.model.architecture.hidden_dropout_prob = 0.1  # masks drawn by global row
    config.model.architecture.attention_probs_dropout_prob = 0.1
    config.upstream.max_predictions = -1  # the batch's cap counts across devices
    config.upstream.update(
        num_steps=5,
        batch_size=8,
        learning_rate=1e-2,
        eval_every=5,
        synthetic_size=60,
        log_every=5,
        checkpoint_every=5,
        steps_per_call=4,  # calls of 4 and 1 steps
    )
    config.downstream.update(num_steps=4, batch_size=8, learning_rate=1e-3, eval_every=2,
                             log_every=4, checkpoint_every=4, steps_per_call=4)  # fmt: skip
    config.parallel.mode = mode
    phases.upstream.upstream(config, workdir / mode)
    phases.downstream.downstream(config, workdir / mode)
    with ocp.StandardCheckpointer() as c:
        leaves = c.restore(workdir / mode / "patch_final" / "weights")
        tuned = c.restore(workdir / mode / "checkpoints" / "downstream" / "4" / "state")
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(leaves).items()}
    for k, v in traverse_util.flatten_dict(tuned["params"]).items():
        flat["downstream/" + "/".join(k)] = np.asarray(v)
    return flat


def donation_reuses_buffers(mode: str) -> bool:
    """put_state's buffers are donatable: a donated step writes its outputs into them, and
    the caller's arrays (a device array and a numpy view of one) stay valid."""
    runner = parallel.Runner(mode, 8)
    state = {"a": jax.numpy.ones((64, 64)), "b": np.asarray(jax.device_get(jax.numpy.ones(8)))}
    placed = runner.put_state(state)
    step = runner.compile(lambda s, b: (jax.tree_util.tree_map(lambda x: x + 1, s), {}), mode)

    def pointers(tree):
        leaves = jax.tree_util.tree_leaves(tree)
        return [s.data.unsafe_buffer_pointer() for x in leaves for s in x.addressable_shards]

    before = pointers(placed)
    updated, _ = step(placed, runner.put_batch({"input_ids": np.ones((8, 2), np.int32)}))
    assert float(state["a"][0, 0]) == float(state["b"][0]) == 1.0
    return pointers(updated) == before


def main() -> None:
    workdir, name, pack = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "packed"
    assert jax.device_count() == 4, jax.devices()
    assert parallel.resolve_mode("auto") == "jit"
    reference = run("single", workdir, name, pack)
    report = {"devices": jax.device_count()}
    report["donates"] = {m: donation_reuses_buffers(m) for m in ("single", "jit", "pmap")}
    for mode in ("jit", "pmap"):
        other = run(mode, workdir, name, pack)
        assert other.keys() == reference.keys()
        report[mode] = max(float(np.abs(other[k] - reference[k]).max()) for k in reference)
        report[f"{mode}_moved"] = (
            max(float(np.abs(other[k]).max()) for k in reference if k.endswith("lora_B"))
            if any(k.endswith("lora_B") for k in reference)
            else None
        )
    print("RESULT " + json.dumps(report))


if __name__ == "__main__":
    main()
