"""Model loading: the reference GGUF, GGUFWriter-made GGUFs, tiny HF dirs, dequantization, RoPE tables."""
import json
import math
import mmap
import struct
from collections import Counter

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

from tinyvllm.model import ModelConfig, ModelFormatError, WeightTensor, load_model
from tinyvllm.model.weights import F16, F32, Q4_0, Q4_1, Q8_0


@pytest.fixture(scope="module")
def ref(reference_gguf_path):
    return load_model(reference_gguf_path)


# ---- the reference model ------------------------------------------------------------------------------
def test_reference_config(ref):
    c = ref.config
    assert (c.arch, c.num_layers, c.num_heads, c.num_kv_heads) == ("llama", 30, 9, 3)
    assert (c.hidden_size, c.intermediate_size, c.head_dim, c.vocab_size) == (576, 1536, 64, 49152)
    assert c.rope_theta == 100000.0 and c.rms_norm_eps == pytest.approx(1e-5)
    assert c.max_position_embeddings == 8192 and c.rope_scaling is None
    assert c.rope_interleaved and c.tie_word_embeddings and not c.attention_bias
    assert (c.bos_token_id, c.eos_token_id) == (1, 2)
    assert ref.kind == "gguf" and ref.path.is_file() and ref.source


def test_reference_tensors(ref):
    assert len(ref.tensors) == 272
    assert Counter(t.dtype for t in ref.tensors.values()) == {Q4_1: 210, F32: 61, Q8_0: 1}
    assert "output.weight" not in ref and ref.lm_head is ref["token_embd.weight"]
    emb = ref["token_embd.weight"]
    assert emb.shape == (49152, 576) and emb.data.shape == (49152, 576 // 32 * 34) and emb.row_bytes == 612
    q = ref["blk.7.attn_q.weight"]
    assert q.dtype == Q4_1 and q.shape == (576, 576) and q.data.dtype == np.uint8 and q.data.flags.c_contiguous
    assert ref["blk.7.attn_k.weight"].shape == (192, 576) and ref["blk.7.ffn_down.weight"].shape == (576, 1536)
    assert ref["output_norm.weight"].data.dtype == np.float32
    assert sum(t.nbytes for t in ref.tensors.values()) == ref.nbytes
    # quantized data are views of the memory-mapped file, not copies
    base = q.data
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, mmap.mmap)


def test_reference_metadata(ref):
    md = ref.metadata
    assert md["general.architecture"] == "llama" and md["tokenizer.ggml.model"] == "gpt2"
    toks, merges = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.merges"]
    assert len(toks) == 49152 and toks[1] == "<|im_start|>" and toks[2] == "<|im_end|>"
    assert len(merges) == 48900 and all(isinstance(m, str) for m in merges[:100])
    tt = md["tokenizer.ggml.token_type"]
    assert len(tt) == 49152 and isinstance(tt[0], int)
    assert md["tokenizer.ggml.add_bos_token"] is False
    assert "<|im_start|>" in md["tokenizer.chat_template"]
    assert not any(k.startswith("GGUF.") for k in md)


@pytest.fixture(scope="module")
def ref_reader_tensors(reference_gguf_path):
    return {t.name: t for t in gguf.GGUFReader(reference_gguf_path).tensors}


@pytest.mark.parametrize("name", ["token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight",
                                  "blk.3.attn_v.weight", "blk.5.ffn_norm.weight", "output_norm.weight"])
def test_reference_dequantize_matches_gguf(ref, ref_reader_tensors, name):
    t = ref_reader_tensors[name]
    want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref[name].shape)
    got = ref[name].dequantize()
    assert got.dtype == np.float32 and got.shape == ref[name].shape
    np.testing.assert_array_equal(got, want)


# ---- dequantization of every block format -------------------------------------------------------------
def _scalar_dequant(qtype, row: bytes, cols: int) -> list[float]:
    """Straight from the block layouts, one value at a time (independent of the vectorized code)."""
    out, bb = [], {Q4_0: 18, Q4_1: 20, Q8_0: 34}[qtype]
    for b in range(cols // 32):
        blk = row[b * bb:(b + 1) * bb]
        d = float(np.frombuffer(blk[:2], "<f2")[0])
        if qtype == Q8_0:
            out += [np.float32(d) * np.float32(v) for v in np.frombuffer(blk[2:], np.int8)]
            continue
        m = float(np.frombuffer(blk[2:4], "<f2")[0]) if qtype == Q4_1 else None
        qs = blk[-16:]
        vals = [qs[j] & 15 for j in range(16)] + [qs[j] >> 4 for j in range(16)]
        out += [np.float32(d) * np.float32(q - 8) if m is None else np.float32(d) * np.float32(q) + np.float32(m)
                for q in vals]
    return out


@pytest.mark.parametrize("qtype", [Q4_0, Q4_1, Q8_0])
def test_dequantize_block_formats(qtype):
    rng = np.random.default_rng(qtype)
    a = (rng.standard_normal((5, 96)) * rng.uniform(0.01, 3, (5, 1))).astype(np.float32)
    raw = gguf.quants.quantize(a, gguf.GGMLQuantizationType(qtype))
    t = WeightTensor("x", qtype, a.shape, np.ascontiguousarray(raw))
    got = t.dequantize()
    np.testing.assert_array_equal(got, gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(qtype)))
    np.testing.assert_array_equal(got[3], np.array(_scalar_dequant(qtype, raw[3].tobytes(), 96), np.float32))
    assert np.abs(got - a).max() < 0.2 * np.abs(a).max()  # and it is the right neighbourhood of the input


def test_weight_tensor_rejects_mismatched_data():
    with pytest.raises(ModelFormatError, match="does not match"):
        WeightTensor("x", Q4_0, (2, 64), np.zeros((2, 37), np.uint8))
    with pytest.raises(ModelFormatError, match="multiple of 32"):
        WeightTensor("x", Q8_0, (2, 40), np.zeros((2, 34), np.uint8))


# ---- GGUF files written with GGUFWriter ---------------------------------------------------------------
@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0"])
def test_tiny_gguf_roundtrip(tmp_path, tiny_kit, qtype):
    path, W = tiny_kit.write_gguf(tmp_path / "m.gguf", qtype=qtype, tie=False)
    m = load_model(path)
    T = tiny_kit.TINY
    assert m.config.num_layers == T["layers"] and m.config.head_dim == T["head_dim"]
    assert m.config.rope_interleaved and not m.config.tie_word_embeddings and m.lm_head is m["output.weight"]
    assert m.config.vocab_size == T["vocab"] and m.metadata["tokenizer.ggml.tokens"][5] == "t5"
    assert len(m.tensors) == 2 + 1 + 9 * T["layers"]
    for name, t in m.tensors.items():
        src = W[tiny_kit.gguf_to_hf_name(name)]
        assert t.shape == src.shape
        tol = {"F32": 0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 0.05, "Q4_0": 0.6, "Q4_1": 0.6}[qtype] if src.ndim == 2 else 0
        # quantized blocks stay as stored (no silent dequantize-to-F32 at load), BF16 becomes F32, norms F32
        stored = {"F32": F32, "BF16": F32, "F16": F16, "Q4_0": Q4_0, "Q4_1": Q4_1, "Q8_0": Q8_0}[qtype]
        assert t.dtype == (stored if src.ndim == 2 else F32), (name, t.dtype)
        np.testing.assert_allclose(t.dequantize(), src, atol=tol * np.abs(src).max() + 1e-7)


def test_gguf_qwen2_biases_and_neox_rope(tmp_path, tiny_kit):
    path, W = tiny_kit.write_gguf(tmp_path / "q.gguf", arch="qwen2", qtype="Q8_0", bias=True)
    m = load_model(path)
    assert m.config.arch == "qwen2" and not m.config.rope_interleaved and m.config.attention_bias
    assert m["blk.1.attn_k.bias"].shape == (32,) and m["blk.1.attn_k.bias"].dtype == F32
    np.testing.assert_array_equal(m["blk.1.attn_k.bias"].data, W["model.layers.1.self_attn.k_proj.bias"])


def test_gguf_rope_freqs_tensor_scales_rope(tmp_path, tiny_kit):
    factors = np.linspace(1, 8, 8).astype(np.float32)
    path, _ = tiny_kit.write_gguf(tmp_path / "r.gguf", extra={"rope_freqs.weight": (factors, None)})
    m = load_model(path)
    base = 10000.0 ** (-np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(m.config.rope_inv_freq(), base / factors, rtol=1e-6)


def test_dir_with_one_gguf(tmp_path, tiny_kit):
    tiny_kit.write_gguf(tmp_path / "only.gguf")
    assert load_model(tmp_path).path.name == "only.gguf"


# ---- HF directories -------------------------------------------------------------------------------------
def _bf16_bits(a):  # round-to-nearest-even f32 -> bf16 bit patterns
    u = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _write_bf16_safetensors(path, tensors):
    """safetensors' numpy API cannot write bf16, so write the (simple) format by hand."""
    header, blobs, off = {}, [], 0
    for name, a in tensors.items():
        raw = _bf16_bits(a).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def write_hf_dir(d, tensors, cfg, dtype="F32", sharded=False):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    names = list(tensors)
    parts = [names[: len(names) // 2], names[len(names) // 2:]] if sharded else [names]
    weight_map = {}
    for k, part in enumerate(parts):
        fn = f"model-{k + 1:05d}-of-{len(parts):05d}.safetensors" if sharded else "model.safetensors"
        sub = {n: tensors[n] for n in part}
        if dtype == "BF16":
            _write_bf16_safetensors(d / fn, sub)
        else:
            save_file({n: a.astype(np.float16 if dtype == "F16" else np.float32) for n, a in sub.items()}, str(d / fn))
        weight_map.update({n: fn for n in part})
    if sharded:
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("tie", [False, True])
def test_hf_dir(tmp_path, tiny_kit, dtype, sharded, tie):
    W = tiny_kit.hf_tensors(seed=3, tie=tie)
    d = write_hf_dir(tmp_path / "hf", W, tiny_kit.hf_config(tie=tie), dtype=dtype, sharded=sharded)
    m = load_model(d)
    T = tiny_kit.TINY
    c = m.config
    assert m.kind == "hf" and m.metadata == {} and not c.rope_interleaved
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (T["layers"], T["heads"], T["kv_heads"], 16)
    assert c.rope_theta == 500000.0 and c.eos_token_id == 2 and c.eos_token_ids == (2, 3)
    assert c.tie_word_embeddings == tie and ("output.weight" in m) == (not tie)
    assert len(m.tensors) == 2 + (not tie) + 9 * T["layers"]  # rotary_emb.inv_freq ignored
    for name, t in m.tensors.items():
        src = W[tiny_kit.gguf_to_hf_name(name)]
        assert t.shape == src.shape and t.data.flags.c_contiguous
        if dtype == "F16" and src.ndim == 2:
            assert t.dtype == F16 and t.data.dtype == np.float16
            np.testing.assert_array_equal(t.data, src.astype(np.float16))
        elif dtype == "BF16":
            assert t.dtype == F32
            np.testing.assert_array_equal(t.data, (_bf16_bits(src).astype(np.uint32) << 16).view(np.float32))
        else:  # F32, and 1-D tensors of F16 checkpoints (norms are widened to F32)
            assert t.dtype == F32
            np.testing.assert_array_equal(t.data, src.astype(np.float16).astype(np.float32) if dtype == "F16" else src)


def test_hf_tied_flag_drops_stored_lm_head(tmp_path, tiny_kit):
    W = tiny_kit.hf_tensors(tie=False)  # has lm_head.weight, but the config says tied: HF ties them
    m = load_model(write_hf_dir(tmp_path / "hf", W, tiny_kit.hf_config(tie=True)))
    assert "output.weight" not in m and m.lm_head is m["token_embd.weight"]


def test_hf_qwen2_biases_and_shards_without_index(tmp_path, tiny_kit):
    W = tiny_kit.hf_tensors(bias=True)
    d = write_hf_dir(tmp_path / "hf", W, tiny_kit.hf_config(arch="qwen2"), sharded=True)
    (d / "model.safetensors.index.json").unlink()  # fall back to every *.safetensors in the dir
    m = load_model(d)
    assert m.config.attention_bias and m.config.arch == "qwen2"
    np.testing.assert_array_equal(m["blk.0.attn_q.bias"].data, W["model.layers.0.self_attn.q_proj.bias"])


def test_tiny_models_helpers_load(tmp_path):
    """The shared tiny-model writers (tests/tiny_models.py) produce files this loader accepts."""
    tm = __import__("tiny_models")
    g = load_model(tm.make_tiny_gguf(tmp_path / "t.gguf", qtype="Q8_0"))
    h = load_model(tm.make_tiny_hf_dir(tmp_path / "hf", dtype="bfloat16", sharded=True))
    assert g.config.rope_interleaved and not h.config.rope_interleaved
    assert g.config.num_layers == h.config.num_layers and g.config.vocab_size == h.config.vocab_size


# ---- ModelConfig ----------------------------------------------------------------------------------------
def test_hf_config_defaults_and_variants(tiny_kit):
    cfg = tiny_kit.hf_config()
    del cfg["num_key_value_heads"]
    c = ModelConfig.from_hf_dict(cfg)
    assert c.num_kv_heads == c.num_heads == 4 and c.head_dim == 16 and not c.attention_bias
    c = ModelConfig.from_hf_dict(tiny_kit.hf_config(arch="mistral", head_dim=32))
    assert c.arch == "llama" and c.head_dim == 32
    assert ModelConfig.from_hf_dict(tiny_kit.hf_config(arch="qwen2")).attention_bias
    new = tiny_kit.hf_config(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1234.0})
    del new["rope_theta"]
    c = ModelConfig.from_hf_dict(new)
    assert c.rope_theta == 1234.0 and c.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(ModelFormatError, match="'rms_norm_eps'"):
        ModelConfig.from_hf_dict({k: v for k, v in tiny_kit.hf_config().items() if k != "rms_norm_eps"})
    with pytest.raises(ModelFormatError, match="unsupported architecture 'gemma'"):
        ModelConfig.from_hf_dict(tiny_kit.hf_config(arch="gemma"))
    with pytest.raises(ModelFormatError, match="yarn"):
        ModelConfig.from_hf_dict(tiny_kit.hf_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}))


def _llama3_inv_freq_reference(d, theta, factor, lo, hi, old_ctx):
    """Llama 3.1 frequency scaling written out per frequency, as in Meta's reference code."""
    out = []
    for i in range(0, d, 2):
        f = 1.0 / theta ** (i / d)
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / hi:
            out.append(f)
        elif wavelen > old_ctx / lo:
            out.append(f / factor)
        else:
            s = (old_ctx / wavelen - lo) / (hi - lo)
            out.append((1 - s) * f / factor + s * f)
    return np.array(out, np.float32)


def test_rope_inv_freq(tiny_kit):
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    c = ModelConfig.from_hf_dict(tiny_kit.hf_config(head_dim=128, rope_scaling=llama3))
    got = c.rope_inv_freq()
    assert got.dtype == np.float32 and got.shape == (64,)
    want = _llama3_inv_freq_reference(128, 500000.0, 8.0, 1.0, 4.0, 8192)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    plain = ModelConfig.from_hf_dict(tiny_kit.hf_config(head_dim=128)).rope_inv_freq()
    assert got[0] == plain[0] and got[-1] == pytest.approx(plain[-1] / 8, rel=1e-6)  # high kept, low / factor
    assert np.any((got > plain / 8 * 1.01) & (got < plain * 0.99))  # some frequencies are blended
    lin = ModelConfig.from_hf_dict(tiny_kit.hf_config(rope_scaling={"type": "linear", "factor": 4.0}))
    np.testing.assert_allclose(lin.rope_inv_freq(), 500000.0 ** (-np.arange(0, 16, 2) / 16) / 4, rtol=1e-6)


def test_gguf_metadata_config():
    md = {"general.architecture": "mistral", "mistral.block_count": 2, "mistral.embedding_length": 64,
          "mistral.feed_forward_length": 96, "mistral.attention.head_count": 4,
          "mistral.attention.layer_norm_rms_epsilon": 1e-5, "mistral.context_length": 128,
          "mistral.rope.scaling.type": "linear", "mistral.rope.scaling.factor": 2.0,
          "tokenizer.ggml.tokens": ["a"] * 50}
    c = ModelConfig.from_gguf_metadata(md)
    assert (c.arch, c.vocab_size, c.num_kv_heads, c.rope_theta, c.rope_interleaved) == ("llama", 50, 4, 10000.0, True)
    assert c.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(ModelFormatError, match="mistral.feed_forward_length"):
        ModelConfig.from_gguf_metadata({k: v for k, v in md.items() if k != "mistral.feed_forward_length"})


# ---- Mistral's sliding window (HF config.json) --------------------------------------------------------------
def test_mistral_sliding_window_is_applied_on_every_layer(tmp_path):
    """A mistral config's sliding_window masks every layer (native forward vs the float64 reference with the
    same window); with rope_scaling, and on device='tinygrad', it is refused rather than ignored."""
    import tiny_models as tm
    from reference_forward import ReferenceModel
    from tinyvllm import LLM, SamplingParams
    from tinyvllm.runner.tinygrad_runner import check_supported
    path = tm.make_tiny_hf_dir(tmp_path / "m", tokenizer="json", dtype="float32", tie=False)
    cfg_file = tmp_path / "m" / "config.json"
    cfg = {**json.loads(cfg_file.read_text()), "model_type": "mistral", "sliding_window": 4}
    cfg_file.write_text(json.dumps(cfg))
    llm = LLM(path, threads=2)
    c = llm.engine.config
    assert c.sliding_window == 4 and c.swa_layers == (True,) * c.num_layers
    out = llm.generate("the cat sat on the mat and the dog ran", SamplingParams(temperature=0, max_tokens=16,
                                                                                 ignore_eos=True))[0]
    ids, got = out.prompt_token_ids, out.outputs[0].token_ids
    ref = ReferenceModel.from_hf_dir(path)  # reads a window for gemma3 only: give it Mistral's by hand
    unwindowed = ref.greedy(ids, 16, eos_ids=[])[0]
    ref.cfg.window, ref.cfg.swa, ref.inv_freq_swa = 4, [True] * c.num_layers, ref.inv_freq
    assert len(ids) > 4 and got == ref.greedy(ids, 16, eos_ids=[])[0]
    assert got != unwindowed  # the window changes this answer, so the check above sees whether it is applied
    with pytest.raises(NotImplementedError, match="sliding-window"):
        check_supported(c)
    cfg_file.write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}))
    with pytest.raises(ModelFormatError, match="sliding_window"):
        load_model(path)
