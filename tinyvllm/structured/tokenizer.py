"""The llguidance tokenizer of a model, built from the vocabulary tinyvllm already loaded (a GGUF
vocab or tokenizer.json / tokenizer.model), so every model tinyvllm runs can be constrained."""
from __future__ import annotations

from ..tokenizer import Tokenizer

# llguidance's marker for special tokens: their bytes never match grammar text, only EOS is let through
_SPECIAL = b"\xff"


class _Vocab:
    """What llguidance.TokenizerWrapper reads: token bytes, bos/eos, and a callable that tokenizes text."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self._tokenizer = tokenizer
        special = set(tokenizer.all_special_ids)
        pieces = tokenizer.token_bytes()[:vocab_size]
        pieces += [b""] * (vocab_size - len(pieces))  # model rows past the tokenizer's vocabulary
        self.tokens = [_SPECIAL + b if i in special else b for i, b in enumerate(pieces)]
        self.special_token_ids = sorted(i for i in special if i < vocab_size)
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id

    def __call__(self, text):
        if isinstance(text, bytes):  # llguidance probes for a bytes API; ours takes text
            raise TypeError("text only")
        return self._tokenizer.encode(text, add_special_tokens=False)


def ll_tokenizer(tokenizer: Tokenizer, vocab_size: int, eos_token_ids):
    """An llguidance.LLTokenizer over the model's `vocab_size` logits; any of `eos_token_ids` ends a
    completion once the grammar is satisfied. Costs about a second on a 49K vocabulary: build once."""
    import llguidance
    vocab = _Vocab(tokenizer, vocab_size)
    wrapper = llguidance.TokenizerWrapper(vocab)
    ll = llguidance.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=sorted(eos_token_ids))
    # llguidance copied the token bytes into its trie but keeps the wrapper (to tokenize text): drop
    # the Python copy (34 MiB at a 262K vocabulary)
    vocab.tokens = wrapper.tokens = []
    return ll
