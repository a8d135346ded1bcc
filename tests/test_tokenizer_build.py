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


# ---- the sentencepiece encoder of large no-dummy-prefix vocabularies (Gemma 3) ------------------------------
def _both_paths(md, monkeypatch):
    """(the `tokenizers` BPE over derived merges, the sentencepiece-encoded one) of the same metadata."""
    with monkeypatch.context() as m:
        m.setattr(T, "_SP_ENCODER_FROM", 10**9)
        bpe = T.Tokenizer.from_gguf_metadata(md)
    with monkeypatch.context() as m:
        m.setattr(T, "_SP_ENCODER_FROM", 0)
        sp = T.Tokenizer.from_gguf_metadata(md)
    assert isinstance(bpe._backend, T._HFBackend) and isinstance(sp._backend, T._SPBackendGGUF)
    return bpe, sp


def _special_mixes(tok, n: int = 200, seed: int = 0) -> list[str]:
    """Texts with control and user-defined token texts inside words, next to each other and to spaces."""
    import random
    rng = random.Random(seed)
    added = sorted(t.content for t in tok._backend.tok.get_added_tokens_decoder().values())
    words = ["hello", " world", "  ", "\n", "é", "12", "<", ">", "<start", "of_turn>", "▁", "x"]
    return ["".join(rng.choice(added if rng.random() < 0.3 else words) for _ in range(rng.randint(1, 12)))
            for _ in range(n)]


def test_sentencepiece_backend_equals_bpe(tmp_path, monkeypatch):
    """The sentencepiece backend gives the BPE pipeline's ids on every check string and on texts full of
    control and user-defined token texts, and decodes as that pipeline does (byte runs that are not UTF-8,
    specials skipped or kept, ids past the vocabulary, incremental detokenizing), with the same pieces,
    ids, special ids and token bytes."""
    import random
    from tiny_models import spm_vocab_metadata, tokenizer_check_strings
    monkeypatch.setenv("TINYVLLM_CACHE", str(tmp_path))
    md = spm_vocab_metadata("gemma3")
    assert md["tokenizer.ggml.add_space_prefix"] is False
    bpe, sp = _both_paths(md, monkeypatch)
    texts = tokenizer_check_strings(n_random=300, n_unicode=300) + _special_mixes(bpe)
    for s in texts:
        assert sp.encode(s) == bpe.encode(s), s
        assert sp.encode(s, add_special_tokens=False) == bpe.encode(s, add_special_tokens=False), s
    n, rng = len(bpe), random.Random(1)
    byte_ids = [i for i in range(n) if bpe.convert_ids_to_tokens(i).startswith("<0x")]
    assert len(byte_ids) == 256
    for _ in range(2000):
        ids = [rng.choice(byte_ids) if rng.random() < 0.4 else rng.randrange(n + 5) for _ in range(rng.randint(0, 16))]
        for skip in (True, False):
            assert sp.decode(ids, skip) == bpe.decode(ids, skip), ids
        d_sp, d_bpe = sp.detokenizer(ids[:2]), bpe.detokenizer(ids[:2])
        assert [d_sp.add(i) for i in ids[2:]] + [d_sp.flush()] == [d_bpe.add(i) for i in ids[2:]] + [d_bpe.flush()]
    for bad in (-1, 2**32):
        for tok in (sp, bpe):
            with pytest.raises(OverflowError):
                tok.decode([bad])
    assert sp.convert_ids_to_tokens(list(range(n + 3))) == bpe.convert_ids_to_tokens(list(range(n + 3)))
    pieces = [bpe.convert_ids_to_tokens(i) for i in range(n)] + ["no such piece", "", "\u2581x\u2581"]
    assert sp.convert_tokens_to_ids(pieces) == bpe.convert_tokens_to_ids(pieces)
    assert sp.token_bytes() == bpe.token_bytes() and sp.eos_token_ids == bpe.eos_token_ids
    assert (sp.all_special_ids, len(sp), sp.bos_token, sp.eos_token) == (bpe.all_special_ids, len(bpe), bpe.bos_token,
                                                                         bpe.eos_token)
    assert len(list((tmp_path / "tokenizer").glob("*.model"))) == 1  # the model proto, cached


def test_sentencepiece_encoder_cache(tmp_path, monkeypatch):
    """The cached model proto is named by the vocabulary's content: a damaged file is rebuilt, another
    vocabulary gets another file, and either way the ids stay the BPE's."""
    from tiny_models import spm_vocab_metadata, tokenizer_check_strings
    monkeypatch.setenv("TINYVLLM_CACHE", str(tmp_path))
    md = spm_vocab_metadata("gemma3")
    texts = tokenizer_check_strings(n_random=50)
    bpe, sp = _both_paths(md, monkeypatch)
    (cached,) = (tmp_path / "tokenizer").glob("*.model")
    good = cached.read_bytes()
    for damaged in (good[: len(good) // 2], b"", b"\x0a\x05other"):  # truncated, empty, another proto
        cached.write_bytes(damaged)
        _, sp = _both_paths(md, monkeypatch)
        assert cached.read_bytes() == good and [sp.encode(s) for s in texts] == [bpe.encode(s) for s in texts]
    scores = list(md["tokenizer.ggml.scores"])
    scores[300], scores[301] = scores[301], scores[300]
    md2 = dict(md, **{"tokenizer.ggml.scores": scores})
    bpe2, sp2 = _both_paths(md2, monkeypatch)
    assert len(list((tmp_path / "tokenizer").glob("*.model"))) == 2
    assert [sp2.encode(s) for s in texts] == [bpe2.encode(s) for s in texts]


@pytest.mark.parametrize("change", [{"tokenizer.ggml.add_space_prefix": True}, {"general.name": "Phi-3 mini"},
                                    {"tokenizer.ggml.unknown_token_id": None}])
def test_sentencepiece_encoder_only_where_equal(tmp_path, monkeypatch, change):
    """Where the two rules could part (a dummy prefix: per-segment prefix handling; Phi-3's right-stripping
    special tokens; no unknown token for sentencepiece), the BPE encodes."""
    from tiny_models import spm_vocab_metadata
    monkeypatch.setenv("TINYVLLM_CACHE", str(tmp_path))
    md = {k: v for k, v in {**spm_vocab_metadata("gemma3"), **change}.items() if v is not None}
    monkeypatch.setattr(T, "_SP_ENCODER_FROM", 0)
    assert isinstance(T.Tokenizer.from_gguf_metadata(md)._backend, T._HFBackend)


@pytest.mark.skipif(not GEMMA.exists(), reason="gemma3-270m not downloaded")
def test_sentencepiece_encoder_gemma3_262k(monkeypatch):
    """The real 262,144-token Gemma 3 vocabulary: sentencepiece gives the BPE's ids (benchmarks/
    check_tokenizers.py compares the same tokenizer with llama.cpp's)."""
    from tiny_models import tokenizer_check_strings
    md = parse_gguf(GEMMA).metadata
    bpe, sp = _both_paths(md, monkeypatch)
    for s in tokenizer_check_strings(n_random=200, n_unicode=300) + _special_mixes(bpe, 100):
        assert sp.encode(s) == bpe.encode(s), s
