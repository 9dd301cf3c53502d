"""A lower-cased WordPiece tokenizer built from a corpus, for random-init models.

The vocabulary is built deterministically (the `tokenizers` WordPiece trainer breaks
ties differently from run to run, which would change token ids between a run and its
rerun): special tokens, every character and its `##` continuation, then whole words by
descending count (ties by spelling), `extra_words` always included.
"""

from __future__ import annotations

import string
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def words_of(texts: Iterable[str]) -> Counter:
    """Word counts after BERT's normalisation and pre-tokenisation (lower-cased)."""
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    counts: Counter = Counter()
    for text in texts:
        for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)):
            counts[word] += 1
    return counts


def train_wordpiece(texts: Iterable[str], vocab_size: int = 2000, extra_words: Iterable[str] = ()):
    """A BERT-style tokenizer whose vocabulary covers `texts` (and `extra_words` whole)."""
    import transformers
    from transformers import BertTokenizerFast

    counts = words_of(texts)
    extra = sorted(words_of(extra_words))
    basic = set(string.ascii_lowercase + string.digits + string.punctuation)
    chars = sorted(basic | {c for word in [*counts, *extra] for c in word})
    vocab = [*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)]
    ranked = [w for w in sorted(counts, key=lambda w: (-counts[w], w)) if len(w) > 1]
    budget = max(vocab_size - len(vocab) - len(extra), 0)
    chosen = sorted(set(ranked[:budget]) | {w for w in extra if len(w) > 1})
    vocab += [w for w in chosen if w not in set(vocab)]
    if int(transformers.__version__.split(".")[0]) >= 5:
        return BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
    with tempfile.TemporaryDirectory() as directory:  # transformers 4 reads a vocab file
        path = Path(directory) / "vocab.txt"
        path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
        return BertTokenizerFast(vocab_file=str(path), do_lower_case=True)
