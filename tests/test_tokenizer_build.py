"""Building tokenizers from GGUF vocabularies fast: the vectorized sentencepiece merge derivation gives
exactly the merges of the plain loop (the rule llama.cpp and sentencepiece use), and falls back to the loop
where it cannot be sure."""
from pathlib import Path

import numpy as np
import pytest

from tinyvllm import tokenizer as T
from tinyvllm.model.gguf_parse import parse_gguf

GEMMA = Path.home() / ".cache/tinyvllm/gemma3-270m/gemma-3-270m-q4_k_m.gguf"


def _loop_merges(tokens, types, scores, vocab, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(T, "_spm_splits_hashed", lambda *a, **k: None)
        return T._spm_merges(tokens, types, scores, vocab)


def _arrays(md):
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    scores = md.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
    return tokens, types, scores, dict(zip(reversed(tokens), range(len(tokens) - 1, -1, -1)))


def _mergeable(tokens, types, vocab):
    return np.array([i for i, t in enumerate(tokens) if types[i] in (1, 4) and vocab[t] == i], dtype=np.int64)


@pytest.mark.parametrize("style", ["gemma3", "llama2"])
def test_hashed_spm_merges_equal_the_loop(monkeypatch, style):
    from tiny_models import spm_vocab_metadata
    tokens, types, scores, vocab = _arrays(spm_vocab_metadata(style, 3000))
    assert T._spm_splits_hashed(tokens, np.asarray(types), scores, _mergeable(tokens, types, vocab)) is not None
    fast = T._spm_merges(tokens, types, scores, vocab)
    assert len(fast) > 1000 and fast == _loop_merges(tokens, types, scores, vocab, monkeypatch)


def test_hashed_spm_merges_odd_vocabulary(monkeypatch):
    # repeated pieces, NULs, a piece that is its own split twice over, ties in score, user-defined pieces
    tokens = ["<unk>", "a", "b", "ab", "ba", "aba", "bab", "a\0", "\0", "a\0b", "ab", "\0\0", "abab", "[u]", "[", "u]"]
    types = [2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4, 1, 1]
    scores = [0.0, -1, -1, -2, -2, -3, -3, -2, -1, -4, -2, -2, -5, 0.0, -1, -1]
    vocab = dict(zip(reversed(tokens), range(len(tokens) - 1, -1, -1)))
    assert T._spm_splits_hashed(tokens, np.asarray(types), [float(s) for s in scores], _mergeable(tokens, types, vocab)) is not None
    fast = T._spm_merges(tokens, types, scores, vocab)
    assert ("a", "\0") in fast and ("ab", "ab") in fast
    assert fast == _loop_merges(tokens, types, scores, vocab, monkeypatch)


def test_hashed_spm_merges_long_pieces_fall_back_surrogates_work():
    tokens, types = ["a", "b", "x" * 100, "ab"], [1, 1, 1, 1]
    vocab = dict(zip(reversed(tokens), range(len(tokens) - 1, -1, -1)))
    assert T._spm_splits_hashed(tokens, np.asarray(types), [0.0] * 4, _mergeable(tokens, types, vocab)) is None
    tokens = ["a", "\udc80", "a\udc80"]  # a byte that was not UTF-8, decoded with surrogateescape
    vocab = dict(zip(reversed(tokens), range(len(tokens) - 1, -1, -1)))
    assert T._spm_merges(tokens, [1, 1, 1], [0.0, 0.0, -1.0], vocab) == [("a", "\udc80")]


@pytest.mark.skipif(not GEMMA.exists(), reason="gemma3-270m not downloaded")
def test_hashed_spm_merges_gemma3_262k(monkeypatch):
    tokens, types, scores, vocab = _arrays(parse_gguf(GEMMA).metadata)
    fast = T._spm_merges(tokens, types, scores, vocab)
    assert len(fast) > 500_000 and fast == _loop_merges(tokens, types, scores, vocab, monkeypatch)
