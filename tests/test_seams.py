"""The encoder's patch seams: identity without patches, wired where the next issue needs them."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from hf_fixtures import padded_batch, save_model, tiny_config

from peftdebias_jax import models
from peftdebias_jax.models.seams import FFN_OUTPUT


class PrefixSlots(nn.Module):
    shape: tuple

    @nn.compact
    def __call__(self):
        init = nn.initializers.normal(1.0)
        return self.param("key", init, self.shape), self.param("value", init, self.shape)


@dataclasses.dataclass(frozen=True)
class ProbePatch(models.Patch):
    """Touches exactly one seam, with a parameter under a scope that carries its name."""

    name: str = "probe"
    seam: str = "none"

    @property
    def scope(self):
        kind = {"prompt": "prompt", "lora": "lora", "prefix": "prefix", "adapter": "adapter"}
        return f"{kind.get(self.seam, 'patch')}_{self.name}"

    def extra_embeddings(self, state, batch_size, hidden_size, dtype, deterministic):
        if self.seam != "prompt":
            return None
        soft = nn.Embed(2, hidden_size, name=f"prompt_{self.name}")(jnp.arange(2))
        return jnp.broadcast_to(soft, (batch_size, 2, hidden_size))

    def dense_delta(self, state, path, x, features, deterministic):
        if self.seam != "lora" or not path.endswith("attention.self.value"):
            return None
        return nn.Dense(features, name=f"lora_{self.name}")(x)

    def key_value_prefix(
        self, state, layer_index, batch_size, num_heads, head_dim, dtype, deterministic
    ):
        if self.seam != "prefix":
            return None
        keys, values = PrefixSlots((3, num_heads, head_dim), name=f"prefix_{self.name}")()
        shape = (batch_size, 3, num_heads, head_dim)
        return jnp.broadcast_to(keys, shape), jnp.broadcast_to(values, shape)

    def adapt_sublayer(self, state, slot, layer_index, hidden, residual, layer_norm, deterministic):
        if self.seam != "adapter" or slot != FFN_OUTPUT:
            return hidden
        return hidden + nn.Dense(hidden.shape[-1], name=f"adapter_{self.name}")(layer_norm(hidden))


def run(module, params, batch):
    return np.asarray(module.apply({"params": params}, *batch).last_hidden_state)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bert")
    config = tiny_config("bert")
    save_model(transformers.BertModel, config, directory)
    return directory, padded_batch("bert", config.vocab_size)


def test_identity_patch_changes_nothing(checkpoint):
    directory, batch = checkpoint
    plain_module, plain = models.from_pretrained(directory)
    module = plain_module.clone(patches=(ProbePatch(seam="none"),))
    np.testing.assert_array_equal(run(module, plain, batch), run(plain_module, plain, batch))


@pytest.mark.parametrize(
    ("seam", "scope"),
    [
        ("prompt", "bert/embeddings/prompt_probe"),
        ("lora", "bert/encoder/layer_1/attention/self/value/lora_probe"),
        ("prefix", "bert/encoder/layer_0/attention/self/prefix_probe/key"),
        ("adapter", "bert/encoder/layer_1/output/adapter_probe"),
    ],
)
def test_each_seam_is_wired(checkpoint, seam, scope):
    directory, batch = checkpoint
    plain_module, plain = models.from_pretrained(directory)
    module, params = models.from_pretrained(directory, patches=[ProbePatch(seam=seam)])
    paths = ["/".join(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert any(p.startswith(scope) for p in paths), paths
    # base weights come from the checkpoint; the patch is the only new thing
    assert len(paths) > len(jax.tree_util.tree_leaves(plain))
    base = params["bert"]["embeddings"]["word_embeddings"]["embedding"]
    np.testing.assert_array_equal(base, plain["bert"]["embeddings"]["word_embeddings"]["embedding"])
    out = run(module, params, batch)
    assert out.shape == run(plain_module, plain, batch).shape, "real positions only"
    assert not np.allclose(out, run(plain_module, plain, batch), atol=1e-3)
