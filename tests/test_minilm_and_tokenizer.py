"""Real all-MiniLM-L6-v2 weights match transformers; tokenizers load their vocabulary."""

import json

import numpy as np
import pytest
import transformers
from hf_fixtures import BERT_VOCAB, torch_outputs

from peftdebias_jax import models
from peftdebias_jax.errors import CheckpointError

SENTENCES = [
    "The nurse said she was tired.",
    "He is a doctor, and a good one; his patients trust him.",
    "Whose car is that?",
]


def test_minilm_last_hidden_state_matches(minilm_dir):
    tokenizer = models.load_tokenizer(minilm_dir)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
    assert batch["attention_mask"].min() == 0, "the batch should contain padding"
    reference = transformers.BertModel.from_pretrained(minilm_dir).eval()
    expected = torch_outputs(
        reference, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    )
    module, params = models.from_pretrained(minilm_dir)
    out = module.apply(
        {"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    )
    np.testing.assert_allclose(
        np.asarray(out.last_hidden_state), expected["last_hidden_state"], atol=1e-4, rtol=0
    )


def test_minilm_tokenizer_knows_words(minilm_dir):
    tokenizer = models.load_tokenizer(minilm_dir)
    ids = tokenizer("the nurse said she was tired", add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["the", "nurse", "said", "she", "was", "tired"]


def write_vocab(directory, with_config: bool):
    directory.mkdir(exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    if with_config:
        cfg = {"tokenizer_class": "BertTokenizer", "do_lower_case": True}
        (directory / "tokenizer_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("with_config", [True, False], ids=["with_config", "vocab_only"])
def test_vocab_txt_directory_is_not_all_unk(tmp_path, with_config):
    """transformers 5's BertTokenizerFast(vocab_file=...) maps every word to [UNK]: we must not."""
    write_vocab(tmp_path, with_config)
    tokenizer = models.load_tokenizer(tmp_path)
    ids = tokenizer("The nurse said she was tired")["input_ids"]
    expected = [BERT_VOCAB.index(t) for t in ["[CLS]", "the", "nurse", "said", "she", "was"]]
    assert ids[:-2] == expected
    assert BERT_VOCAB[ids[-2]] == "tired" and BERT_VOCAB[ids[-1]] == "[SEP]"


def test_tokenizer_that_lost_its_vocabulary_is_rejected(tmp_path, monkeypatch):
    write_vocab(tmp_path, with_config=True)
    broken = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: broken)
    with pytest.raises(CheckpointError, match="did not load"):
        models.load_tokenizer(tmp_path)


def test_sentence_pair_token_types(minilm_dir):
    tokenizer = models.load_tokenizer(minilm_dir)
    batch = tokenizer(["A man sleeps."], ["A person rests."], return_tensors="np")
    types = batch["token_type_ids"][0]
    assert types[0] == 0 and types[-1] == 1 and set(types.tolist()) == {0, 1}
    module, params = models.from_pretrained(minilm_dir)
    paired = module.apply({"params": params}, **batch).last_hidden_state
    flat = module.apply(
        {"params": params}, batch["input_ids"], batch["attention_mask"]
    ).last_hidden_state
    assert not np.allclose(np.asarray(paired), np.asarray(flat)), "token types are used"
