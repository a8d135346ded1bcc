"""Tests of the independent float64 oracle (tests/reference_forward.py) and the tiny-model writers
(tests/tiny_models.py). Nothing here imports tinyvllm."""
import json
import os
import time

import numpy as np
import pytest

from reference_forward import (ReferenceModel, apply_rope, permute_qk, read_safetensors, rope_inv_freq,
                               unpermute_qk)
import tiny_models as tm

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHAT_PROMPT = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nWhat is the capital of France?"
               "<|im_end|>\n<|im_start|>assistant\n")


def gguf_bpe_tokenizer(meta: dict):
    """tokenizers-library byte-level BPE built from GGUF gpt2 tokenizer metadata (SmolLM pre-tokenizer:
    digits one by one, then GPT-2 byte-level regex); control tokens become special added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    toks, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(toks)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s, t in zip(toks, types) if t == 3])
    return tok


@pytest.fixture(scope="module")
def smollm_tok(reference_model):
    return gguf_bpe_tokenizer(reference_model.metadata)


# ----------------------------------------------------------------------------- RoPE layout (pure unit)

def test_permute_roundtrip_and_rope_identity():
    rng = np.random.default_rng(0)
    H, d, D = 3, 8, 5
    w = rng.standard_normal((H * d, D))
    assert np.array_equal(unpermute_qk(permute_qk(w, H), H), w)
    assert not np.array_equal(permute_qk(w, H), w)
    # rotating GGUF-permuted vectors interleaved == permuting HF vectors rotated half-split
    x = rng.standard_normal((4, H, d))
    pos, inv = np.arange(7, 11), rope_inv_freq(d, 10000.0, None)
    perm = lambda v: permute_qk(v.reshape(v.shape[0], H * d).T, H).T.reshape(v.shape)
    np.testing.assert_allclose(apply_rope(perm(x), pos, inv, "interleaved"), perm(apply_rope(x, pos, inv, "half")),
                               atol=1e-14)
    # position 0 is the identity, and rotation preserves pairwise norms
    np.testing.assert_array_equal(apply_rope(x, np.zeros(4), inv, "half"), x)
    np.testing.assert_allclose(np.linalg.norm(apply_rope(x, pos, inv, "half"), axis=-1), np.linalg.norm(x, axis=-1))


def test_rope_scaling_frequencies():
    d, theta = 64, 500000.0
    base = rope_inv_freq(d, theta, None)
    np.testing.assert_allclose(rope_inv_freq(d, theta, {"type": "linear", "factor": 4.0}), base / 4)
    sc = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    got, wavelen = rope_inv_freq(d, theta, sc), 2 * np.pi / base
    hi, lo = wavelen < 8192 / 4, wavelen > 8192 / 1
    assert hi.any() and lo.any() and (~hi & ~lo).any()
    np.testing.assert_array_equal(got[hi], base[hi])            # high frequencies untouched
    np.testing.assert_allclose(got[lo], base[lo] / 8)            # low frequencies scaled by factor
    mid = ~hi & ~lo                                              # in between: strictly between the two
    assert np.all(got[mid] < base[mid]) and np.all(got[mid] > base[mid] / 8)


# ----------------------------------------------------------------------------- (a) + (b) the real model

def test_gguf_interleaved_equals_unpermuted_half_split(reference_model, smollm_tok):
    ids = smollm_tok.encode(CHAT_PROMPT).ids[-8:]
    a = reference_model.prefill_logits(ids)
    b = reference_model.unpermuted().prefill_logits(ids)
    assert a.shape == (8, reference_model.cfg.vocab) and a.dtype == np.float64
    assert np.max(np.abs(a - b)) < 1e-9
    # teeth: half-split rotation on the still-permuted weights is measurably wrong
    from dataclasses import replace
    wrong = ReferenceModel(replace(reference_model.cfg, rope_style="half"), reference_model.embed,
                           reference_model.norm, reference_model.out, reference_model.layers)
    assert np.max(np.abs(wrong.prefill_logits(ids) - a)) > 0.1


def test_smollm_chat_greedy_is_paris(reference_model, smollm_tok):
    ids = smollm_tok.encode(CHAT_PROMPT).ids
    assert ids[0] == 1 and ids[-4:] == smollm_tok.encode("<|im_start|>assistant\n").ids and len(ids) == 37
    out, gaps = reference_model.greedy(ids, 48)
    text = smollm_tok.decode(out, skip_special_tokens=True)
    print("greedy:", repr(text), "gaps:", np.round(gaps, 3).tolist())
    assert text.startswith("The capital of France is Paris.")
    assert out[-1] == 2  # <|im_end|>


def test_kv_cache_matches_prefill(reference_model, smollm_tok):
    m = reference_model
    ids = smollm_tok.encode(CHAT_PROMPT).ids[-30:]
    t0 = time.perf_counter()
    out, gaps = m.greedy(ids, 48, eos_ids=[])
    dt = time.perf_counter() - t0
    print(f"48 greedy tokens after 30-token prompt: {dt:.2f}s, min gap {min(gaps):.3f}")
    assert len(out) == 48 and len(gaps) == 48 and min(gaps) >= 0
    # incremental (cached) logits == one-shot prefill logits over the whole sequence
    seq = ids + out[:10]
    full = m.prefill_logits(seq)
    cache = m.new_cache()
    chunks = [m.forward(ids[:17], 0, cache), m.forward(ids[17:], 17, cache)]
    chunks += [m.forward([t], len(cache), cache) for t in out[:10]]
    np.testing.assert_allclose(np.concatenate(chunks), full, atol=1e-9, rtol=0)
    assert int(np.argmax(full[len(ids) - 1])) == out[0]


# ----------------------------------------------------------------------------- (c) tiny HF dirs

@pytest.mark.parametrize("kw", [dict(), dict(tokenizer="spm"), dict(dtype="float16", tie=False),
                                dict(dtype="bfloat16"), dict(arch="qwen2"),
                                dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32})])
def test_tiny_hf_dir_loads(tmp_path, kw):
    p = tm.make_tiny_hf_dir(tmp_path / "m", seed=3, **kw)
    cfg = json.load(open(os.path.join(p, "config.json")))
    m = ReferenceModel.from_hf_dir(p)
    c = m.cfg
    assert (c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden, c.ffn) == (2, 4, 2, 16, 64, 160)
    assert c.vocab == cfg["vocab_size"] and c.vocab % 32 == 0 and c.rope_style == "half"
    assert c.tied == kw.get("tie", True) and (m.out is m.embed) == c.tied
    assert (m.layers[0]["bq"] is not None) == (kw.get("arch") == "qwen2")
    if kw.get("tokenizer") == "spm":
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=os.path.join(p, "tokenizer.model"))
        assert sp.get_piece_size() <= c.vocab and sp.bos_id() == 1 and sp.eos_id() == 2
        assert sp.decode(sp.encode("Hello, world! 42")) == "Hello, world! 42"
        ids = [1] + sp.encode("The capital of France is Paris.")
    else:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(os.path.join(p, "tokenizer.json"))
        assert tok.get_vocab_size() <= c.vocab
        assert tok.encode("<|im_start|>user\nhi<|im_end|>").ids[0] == 1 and tok.token_to_id("<|im_end|>") == 2
        assert tok.decode(tok.encode("Hello, world! 42").ids) == "Hello, world! 42"
        ids = tok.encode("The capital of France is Paris.").ids
    logits = m.prefill_logits(ids)
    assert logits.shape == (len(ids), c.vocab) and np.isfinite(logits).all()
    assert 1 < np.abs(logits).max() < 100
    out, gaps = m.greedy(ids, 16, eos_ids=[])
    assert len(set(out)) > 1  # not a single-token loop


def test_bf16_writer_roundtrips(tmp_path):
    from safetensors import safe_open
    # round to nearest even: 1 + 2^-8 is a tie -> 1.0 ; 1 + 3*2^-8 is a tie -> 1 + 2^-6
    v = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -2.5, 3.0e-3, 1e30], dtype=np.float32)
    back = tm.bf16_bits_to_f32(tm.to_bf16_bits(v))
    assert back[1] == 1.0 and back[2] == 1 + 2**-6 and back[3] == -2.5
    np.testing.assert_allclose(back, v, rtol=2**-8)
    p = tm.make_tiny_hf_dir(tmp_path / "bf", dtype="bfloat16", seed=1)
    f32 = tm.make_tiny_hf_dir(tmp_path / "f32", dtype="float32", seed=1)
    with safe_open(os.path.join(p, "model.safetensors"), framework="np") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_shape() == [64, 64]
    ref = read_safetensors(os.path.join(f32, "model.safetensors"))
    got = read_safetensors(os.path.join(p, "model.safetensors"))
    assert keys == set(ref) == set(got)
    for k in ref:
        expect = tm.bf16_bits_to_f32(tm.to_bf16_bits(ref[k].astype(np.float32)))
        np.testing.assert_array_equal(got[k], expect)


def test_f32_f16_writer_matches_safetensors_library(tmp_path):
    from safetensors.numpy import load_file
    for dt in ("float32", "float16"):
        p = tm.make_tiny_hf_dir(tmp_path / dt, dtype=dt, seed=2, tie=False)
        lib = load_file(os.path.join(p, "model.safetensors"))
        ours = read_safetensors(os.path.join(p, "model.safetensors"))
        assert set(lib) == set(ours) and "lm_head.weight" in lib
        for k, a in lib.items():
            assert a.dtype == np.dtype(dt)
            np.testing.assert_array_equal(a.astype(np.float64), ours[k])


def test_sharded_equals_unsharded(tmp_path):
    one = tm.make_tiny_hf_dir(tmp_path / "one", seed=5, tie=False)
    two = tm.make_tiny_hf_dir(tmp_path / "two", seed=5, tie=False, sharded=True)
    idx = json.load(open(os.path.join(two, "model.safetensors.index.json")))
    assert not os.path.exists(os.path.join(two, "model.safetensors"))
    assert len(set(idx["weight_map"].values())) == 2
    assert set(idx["weight_map"]) == set(read_safetensors(os.path.join(one, "model.safetensors")))
    ids = [1, 40, 41, 100, 7, 250, 3]
    np.testing.assert_array_equal(ReferenceModel.from_hf_dir(one).prefill_logits(ids),
                                  ReferenceModel.from_hf_dir(two).prefill_logits(ids))


# ----------------------------------------------------------------------------- (d) tiny GGUF vs HF

@pytest.mark.parametrize("tie", [True, False])
def test_tiny_gguf_f32_matches_hf_dir(tmp_path, tie):
    g = ReferenceModel.from_gguf(tm.make_tiny_gguf(tmp_path / "m.gguf", qtype="F32", seed=7, tie=tie))
    h = ReferenceModel.from_hf_dir(tm.make_tiny_hf_dir(tmp_path / "hf", seed=7, tie=tie))
    assert g.cfg.rope_style == "interleaved" and h.cfg.rope_style == "half"
    assert g.cfg.vocab == h.cfg.vocab and g.cfg.tied == h.cfg.tied == tie
    assert not np.array_equal(g.layers[0]["wq"], h.layers[0]["wq"])        # stored permuted
    np.testing.assert_array_equal(g.unpermuted().layers[1]["wk"], h.layers[1]["wk"])
    ids = [1, 30, 31, 32, 200, 201, 5, 9, 77, 300]
    lg, lh = g.prefill_logits(ids), h.prefill_logits(ids)
    assert np.max(np.abs(lg - lh)) < 1e-9
    assert g.greedy(ids, 12, eos_ids=[]) [0] == h.greedy(ids, 12, eos_ids=[])[0]


def test_tiny_gguf_tokenizer_and_quant_types(tmp_path):
    from tokenizers import Tokenizer
    f32 = ReferenceModel.from_gguf(tm.make_tiny_gguf(tmp_path / "f32.gguf", qtype="F32", seed=1))
    meta = f32.metadata
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.bos_token_id"] == 1
    assert meta["tokenizer.ggml.eos_token_id"] == 2 and "<|im_start|>" in meta["tokenizer.chat_template"]
    assert len(meta["tokenizer.ggml.tokens"]) == f32.cfg.vocab
    hf = Tokenizer.from_str(tm.trained_bpe_json())
    gt = gguf_bpe_tokenizer(meta)
    text = "<|im_start|>user\nThe capital of France is Paris, 1234 fox!<|im_end|>\n"
    assert gt.encode(text).ids == hf.encode(text).ids
    ids = hf.encode(text).ids
    ref = f32.prefill_logits(ids)
    rms = lambda a: float(np.sqrt(np.mean(a * a)))
    for qtype, tol in (("F16", 1e-3), ("Q8_0", 0.03), ("Q4_1", 0.4), ("Q4_0", 0.4)):  # relative RMS error
        q = ReferenceModel.from_gguf(tm.make_tiny_gguf(tmp_path / f"{qtype}.gguf", qtype=qtype, seed=1))
        err = np.max(np.abs(q.layers[0]["w_up"] - f32.layers[0]["w_up"]))
        assert 0 < err < {"F16": 1e-3, "Q8_0": 0.02, "Q4_1": 0.2, "Q4_0": 0.2}[qtype]
        rel = rms(q.prefill_logits(ids) - ref) / rms(ref)
        print(f"{qtype}: relative logit RMS error {rel:.4f}")
        assert rel < tol, qtype


# ----------------------------------------------------------------------------- qwen3 / gemma3 readings

@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_reference_hf_and_gguf_readings_agree(tmp_path, arch):
    """The same weights as an HF dir and as a GGUF (tests/tiny_arch_models.py) give the same float64 logits:
    the two readings (HF names and (1 + w) norms vs GGUF names and stored w + 1; gemma3's window, pattern and
    local RoPE base from config.json vs GGUF keys) describe one model. query_pre_attn_scalar = head_dim so
    HF's scale equals llama.cpp's GGUF rule."""
    import tiny_arch_models as ta
    g = ReferenceModel.from_gguf(ta.write_gguf(tmp_path / "m.gguf", arch, "F32"))
    h = ReferenceModel.from_hf_dir(ta.write_hf_dir(tmp_path / "hf", arch, query_pre_attn_scalar=32.0))
    ids = list(range(5, 45))
    np.testing.assert_allclose(g.prefill_logits(ids), h.prefill_logits(ids), rtol=0, atol=1e-9)
    if arch == "gemma3":
        assert g.cfg.window == h.cfg.window == 8 and g.cfg.swa == h.cfg.swa == [True, True, False]
