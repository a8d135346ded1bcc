"""GGUF tokenizers against llama.cpp's own (`llama_tokenize` through llama-cpp-python).

Vocab-only GGUF files of each tokenizer type tinyvllm reads (trained vocabularies written with the metadata
real Llama 3 / Qwen2.5 / SmolLM2 / Gemma 3 / Llama 2 files carry, plus the reference SmolLM2 model) are
tokenized by llama.cpp and by tinyvllm; the ids must be equal, with special-token text parsed, with and
without BOS/EOS. benchmarks/check_tokenizers.py runs the same check on real vocabularies and more strings
(docs/benchmarks/tokenizers.md). The two differences tinyvllm keeps on purpose are tested as such.
"""
import unicodedata

import llama_cpp
import pytest

import tiny_models as tm
from tinyvllm.tokenizer import Tokenizer

STRINGS = tm.tokenizer_check_strings(n_random=40, seed=1, n_unicode=80)


_QUIET = llama_cpp.llama_log_callback(lambda level, text, user: None)  # module-level: llama.cpp keeps the pointer
llama_cpp.llama_log_set(_QUIET, None)  # it would warn on every double BOS of the special-token strings


def _special_strings(md):
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    out = []
    for t in [t for t, ty in zip(tokens, types) if ty in (3, 4) and t.strip()][:8]:
        out += [t, f"a{t}b", f" {t} x", f"{t}{t}", f"hi {t}\n", f"{t}Hello world"]
    return out


def _mismatches(path, md, strings):
    tok = Tokenizer.from_gguf_metadata(md)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    nfc = md.get("tokenizer.ggml.pre") == "qwen2"
    bad = []
    for s in strings:
        for add in (False, True):
            # llama.cpp has no NFC step for qwen2 vocabs, Qwen2's tokenizer.json has: tinyvllm keeps it
            ref = llm.tokenize((unicodedata.normalize("NFC", s) if nfc else s).encode(), add_bos=add, special=True)
            ours = tok.encode(s, add_special_tokens=add)
            if ours != ref:
                bad.append((s, add, ref, ours, tok.convert_ids_to_tokens(ref), tok.convert_ids_to_tokens(ours)))
    return bad


def _check(path, md, extra=()):
    strings = list(dict.fromkeys(STRINGS + _special_strings(md) + list(extra)))
    bad = _mismatches(path, md, strings)
    assert not bad, f"{len(bad)} of {2 * len(strings)} differ from llama.cpp; first: {bad[:3]}"


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "smollm"])
def test_trained_bpe_matches_llamacpp(tmp_path, pre):
    md = tm.bpe_vocab_metadata(pre)
    _check(tm.write_vocab_gguf(tmp_path / f"{pre}.gguf", md), md)


@pytest.mark.parametrize("style", ["gemma3", "llama2"])
def test_trained_spm_matches_llamacpp(tmp_path, style):
    md = tm.spm_vocab_metadata(style)
    runs = ["a  b", "x\n\n\ny", "\t\tz", "▁▁hello", "▁ ▁", "<start_of_turn>user\n  hi<end_of_turn>\n"]
    _check(tm.write_vocab_gguf(tmp_path / f"spm-{style}.gguf", md), md, runs)


def test_reference_gguf_matches_llamacpp(reference_gguf_path):
    from tinyvllm.model.gguf_loader import load_gguf
    _check(reference_gguf_path, load_gguf(reference_gguf_path).metadata)


def test_qwen2_nfc_kept(tmp_path):
    """The one normalization llama.cpp skips: decomposed text tokenizes as its NFC form in tinyvllm."""
    md = tm.bpe_vocab_metadata("qwen2")
    path = tm.write_vocab_gguf(tmp_path / "qwen2.gguf", md)
    tok = Tokenizer.from_gguf_metadata(md)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    s = "cafe\u0301 nai\u0308ve"
    assert tok.encode(s) == llm.tokenize("café naïve".encode(), add_bos=False, special=True)
    assert tok.encode(s) != llm.tokenize(s.encode(), add_bos=False, special=True)
