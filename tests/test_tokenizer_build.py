"""Building tokenizers from GGUF vocabularies fast: the vectorized sentencepiece merge derivation gives
exactly the merges of the plain rule (the one llama.cpp and sentencepiece use), and the merges of large
vocabularies are cached in the cache dir, keyed by the vocabulary's content."""
from pathlib import Path

import numpy as np
import pytest

from tinyvllm import tokenizer as T
from tinyvllm.model.gguf_parse import parse_gguf

GEMMA = Path.home() / ".cache/tinyvllm/gemma3-270m/gemma-3-270m-q4_k_m.gguf"


def _loop_merges(tokens, types, scores, vocab):
    """The rule, written plainly: every split of a normal piece into two mergeable pieces, best score first."""
    mergeable = {t: i for i, t in enumerate(tokens) if types[i] in (1, 4) and vocab[t] == i}
    ranked = sorted((-scores[i], i, mergeable[t[:k]], mergeable[t[k:]]) for t, i in mergeable.items()
                    if types[i] == 1 for k in range(1, len(t)) if t[:k] in mergeable and t[k:] in mergeable)
    return [(tokens[r[2]], tokens[r[3]]) for r in ranked]


def _arrays(md):
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    scores = md.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
    return tokens, types, scores, dict(zip(reversed(tokens), range(len(tokens) - 1, -1, -1)))


@pytest.mark.parametrize("style", ["gemma3", "llama2"])
def test_spm_merges_equal_the_loop(style):
    from tiny_models import spm_vocab_metadata
    tokens, types, scores, vocab = _arrays(spm_vocab_metadata(style, 3000))
    fast = T._spm_merges(tokens, types, scores, vocab)
    assert len(fast) > 1000 and fast == _loop_merges(tokens, types, scores, vocab)


def test_spm_merges_odd_vocabulary():
    # repeated pieces, NULs, a piece that is its own split twice over, ties in score, user-defined pieces,
    # a long piece, a byte that was not UTF-8 (decoded with surrogateescape)
    tokens = ["<unk>", "a", "b", "ab", "ba", "aba", "bab", "a\0", "\0", "a\0b", "ab", "\0\0", "abab", "[u]", "[",
              "u]", "x" * 100, "x" * 99, "x", "\udc80", "a\udc80"]
    types = [2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4, 1, 1, 1, 1, 1, 1, 1]
    scores = [0.0, -1, -1, -2, -2, -3, -3, -2, -1, -4, -2, -2, -5, 0.0, -1, -1, -9, -8, -1, 0.0, -1]
    vocab = dict(zip(reversed(tokens), range(len(tokens) - 1, -1, -1)))
    fast = T._spm_merges(tokens, types, scores, vocab)
    assert {("a", "\0"), ("ab", "ab"), ("x" * 99, "x"), ("a", "\udc80")} <= set(fast)
    assert fast == _loop_merges(tokens, types, scores, vocab)


def test_spm_merges_cached_by_content(tmp_path, monkeypatch):
    from tiny_models import spm_vocab_metadata
    monkeypatch.setenv("TINYVLLM_CACHE", str(tmp_path))
    monkeypatch.setattr(T, "_CACHE_MERGES_FROM", 0)
    tokens, types, scores, vocab = _arrays(spm_vocab_metadata("gemma3", 3000))
    want = _loop_merges(tokens, types, scores, vocab)
    assert T._spm_merges(tokens, types, scores, vocab) == want
    (cached,) = (tmp_path / "tokenizer").iterdir()
    np.save(cached, np.load(cached)[::-1].copy())  # tampered: read back as it is (the key is the content)
    assert T._spm_merges(tokens, types, scores, vocab) != want
    cached.write_bytes(b"damaged")  # unreadable: derived again and rewritten
    assert T._spm_merges(tokens, types, scores, vocab) == want and np.load(cached).shape == (2, len(want))
    scores = list(scores)
    scores[500] += 100.0  # another vocabulary: another key
    assert T._spm_merges(tokens, types, scores, vocab) == _loop_merges(tokens, types, scores, vocab)
    assert len(list((tmp_path / "tokenizer").iterdir())) == 2


@pytest.mark.skipif(not GEMMA.exists(), reason="gemma3-270m not downloaded")
def test_spm_merges_gemma3_262k(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYVLLM_CACHE", str(tmp_path))
    tokens, types, scores, vocab = _arrays(parse_gguf(GEMMA).metadata)
    fast = T._spm_merges(tokens, types, scores, vocab)
    assert len(fast) > 500_000 and fast == _loop_merges(tokens, types, scores, vocab)
    assert T._spm_merges(tokens, types, scores, vocab) == fast  # from the cache


def test_merge_pairs_split_like_llamacpp(reference_gguf_path):
    """Byte-level merges split at the first space after the first character (llama.cpp's rule), on the
    reference vocabulary and on texts that start with a space, lack one or hold several."""
    odd = [" a b", "ab", "a  b", "  ", "a b c", " ", "x ", "Ġ Ġ", "é ñ"]
    texts = odd + parse_gguf(reference_gguf_path).metadata["tokenizer.ggml.merges"]
    assert T._merge_pairs(texts) == [T._split_merge(m) for m in texts]
    assert T._merge_pairs(odd) == [(" a", "b"), ("a", "ab"), ("a", " b"), (" ", ""), ("a", "b c"), ("", " "),
                                   ("x", ""), ("Ġ", "Ġ"), ("é", "ñ")]
