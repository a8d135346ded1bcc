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


# What constrained decoding adds to the process at its peak: peak RSS growth from before the first
# constrained request through six batched ones (llguidance 1.9.1, measured with tinyvllm 0a496da):
# 29.5 MiB at 49,152 tokens (SmolLM2: 369 KB of piece text), 155.5 MiB at 262,144 (Gemma 3: 2.3 MB),
# 10.4 / 47.0 / 130.3 MiB on synthetic vocabularies of 8K / 100K / 262K tokens (27 KB / 484 KB / 1.5 MB).
# Most of it is llguidance's token trie and token slices; about a third at 262K is the transient lists
# of token bytes it is built from. The line below lies 1-19% above each of those measurements.
_BASE_BYTES, _BYTES_PER_TOKEN, _BYTES_PER_PIECE_BYTE = 8 * 2**20, 340, 32


def ll_tokenizer_bytes(num_tokens: int, piece_bytes: int) -> int:
    """Peak resident bytes that structured outputs add: llguidance's tokenizer over `num_tokens` tokens
    whose vocabulary pieces (as stored, UTF-8) total `piece_bytes`, plus the first constrained requests."""
    return _BASE_BYTES + _BYTES_PER_TOKEN * num_tokens + _BYTES_PER_PIECE_BYTE * piece_bytes


def vocab_piece_bytes(tokenizer: Tokenizer, vocab_size: int, metadata: dict | None = None) -> int:
    """UTF-8 bytes of the first vocab_size vocabulary pieces: from a GGUF's token list when there is one
    (milliseconds), else read off the tokenizer (a second or so at 262K tokens)."""
    pieces = (metadata or {}).get("tokenizer.ggml.tokens")
    if not isinstance(pieces, list):
        pieces = tokenizer.convert_ids_to_tokens(range(min(vocab_size, len(tokenizer))))
    return sum(len(p.encode()) for p in pieces[:vocab_size] if isinstance(p, str))
