"""Tiny random-weight models of every supported architecture (llama, qwen2, qwen3, gemma3, smollm3, phi3), as GGUF files
(gguf's GGUFWriter, with the trained BPE vocabulary of tiny_models and its tokenizer metadata, so the
whole engine loads them) and as HF directories (config.json + safetensors + tokenizer.json).

Independent of `tinyvllm`. The weight type of the 2-D matrices is a parameter (`qtype`: any type
gguf.quants can quantize: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; K-quants can be added in
`_quantize`). Norms stay F32.

Shapes are chosen so each architecture's own features matter: qwen3 and gemma3 have head_dim 32 with
hidden 64 and 4 heads (q_size 128 != hidden); gemma3 has 3 layers with a sliding window of 8 and
pattern 3 (layers 0 and 1 slide, layer 2 is global), its own local RoPE base, a query_pre_attn_scalar
that is not head_dim in the HF config, and (1 + w) norms in HF / w + 1 in GGUF.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

import tiny_models as tm

ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "smollm3", "phi3")


@dataclass(frozen=True)
class Spec:
    arch: str
    hidden: int = 64
    ffn: int = 160
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    theta: float = 10000.0
    eps: float = 1e-5
    window: int = 0            # gemma3: sliding window; layers i with i % pattern < pattern - 1 slide
    pattern: int = 0
    theta_swa: float = 10000.0
    max_pos: int = 512
    extra: dict = field(default_factory=dict)


SPECS = {
    "llama": Spec("llama"),
    "qwen2": Spec("qwen2"),
    "qwen3": Spec("qwen3", head_dim=32, theta=1_000_000.0, eps=1e-6),
    "gemma3": Spec("gemma3", layers=3, head_dim=32, kv_heads=1, theta=1_000_000.0, eps=1e-6, window=8, pattern=3,
                   theta_swa=10000.0),
    # 4 layers: layer 3 is SmolLM3's NoPE layer ((i + 1) % 4 == 0)
    "smollm3": Spec("smollm3", layers=4, theta=2_000_000.0, eps=1e-6),
    # Phi-4-mini-like: partial RoPE (12 of 16 values per head), LongRoPE factors past an original context of
    # 256 (of 1024), and a sliding window in the file that llama.cpp (and so we) ignore
    "phi3": Spec("phi3", max_pos=1024, window=8, extra=dict(rope_dim=12, orig_ctx=256)),
}


def longrope_factors(spec: Spec) -> tuple[np.ndarray, np.ndarray]:
    """(short, long) per-frequency divisors for phi3's rope_factors_short / rope_factors_long."""
    rng = np.random.default_rng(99)
    n = spec.extra["rope_dim"] // 2
    return (1.0 + rng.uniform(0, 1.5, n)).astype(np.float32), np.linspace(1.0, 16.0, n, dtype=np.float32)


def swa_layers(spec: Spec) -> list[bool]:
    return [bool(spec.window) and (i % spec.pattern < spec.pattern - 1) for i in range(spec.layers)]


def arch_weights(spec: Spec, vocab: int, *, seed: int = 0, tie: bool = True) -> dict[str, np.ndarray]:
    """Random float32 weights with HF names in the model's effective form (norm weights are the factors
    the model multiplies by; the HF gemma3 writer subtracts the 1 it stores implicitly). Scales follow
    tiny_models.tiny_weights (layers dominate the residual, diverse greedy paths)."""
    rng = np.random.default_rng(seed + 1000 * ARCHS.index(spec.arch))
    mat = lambda o, i: (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)
    vec = lambda n, gain=1.0: (gain * (1.0 + 0.1 * rng.standard_normal(n))).astype(np.float32)
    H, q, kv = spec.hidden, spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    W = {"model.embed_tokens.weight": (tm.EMBED_STD * rng.standard_normal((vocab, H))).astype(np.float32)}
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        W[p + "input_layernorm.weight"] = vec(H)
        W[p + "self_attn.q_proj.weight"] = mat(q, H)
        W[p + "self_attn.k_proj.weight"] = mat(kv, H)
        W[p + "self_attn.v_proj.weight"] = mat(kv, H)
        W[p + "self_attn.o_proj.weight"] = tm.OUT_GAIN * mat(H, q)
        if spec.arch == "qwen2":
            for n, d in (("q", q), ("k", kv), ("v", kv)):
                W[p + f"self_attn.{n}_proj.bias"] = (0.5 * rng.standard_normal(d)).astype(np.float32)
        if spec.arch in ("qwen3", "gemma3"):
            W[p + "self_attn.q_norm.weight"] = vec(spec.head_dim)
            W[p + "self_attn.k_norm.weight"] = vec(spec.head_dim)
        if spec.arch == "gemma3":
            W[p + "post_attention_layernorm.weight"] = vec(H)
            W[p + "pre_feedforward_layernorm.weight"] = vec(H)
            W[p + "post_feedforward_layernorm.weight"] = vec(H)
        else:
            W[p + "post_attention_layernorm.weight"] = vec(H)
        W[p + "mlp.gate_proj.weight"] = mat(spec.ffn, H)
        W[p + "mlp.up_proj.weight"] = mat(spec.ffn, H)
        W[p + "mlp.down_proj.weight"] = tm.OUT_GAIN * mat(H, spec.ffn)
    W["model.norm.weight"] = vec(H, tm.FINAL_GAIN)
    lm_head = (tm.EMBED_STD * rng.standard_normal((vocab, H))).astype(np.float32)
    if not tie:
        W["lm_head.weight"] = lm_head
    return W


# HF name (layer part) -> GGUF name, per architecture
_GGUF_LAYER = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
               "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
               "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_proj.bias": "attn_q.bias",
               "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
               "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
               "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
               "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}
_GGUF_LAYER_GEMMA3 = {**_GGUF_LAYER, "post_attention_layernorm.weight": "post_attention_norm.weight",
                      "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                      "post_feedforward_layernorm.weight": "post_ffw_norm.weight"}


def gguf_name(hf: str, arch: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}." + (_GGUF_LAYER_GEMMA3 if arch == "gemma3" else _GGUF_LAYER)[rest]


def _quantize(a: np.ndarray, qtype: str):
    """(data, raw_dtype) for GGUFWriter.add_tensor: floats as numpy arrays, quantized types as raw blocks."""
    import gguf
    qt = gguf.GGMLQuantizationType[qtype]
    if qt == gguf.GGMLQuantizationType.F32:
        return a.astype(np.float32), None
    if qt == gguf.GGMLQuantizationType.F16:
        return a.astype(np.float16), None
    return gguf.quants.quantize(a, qt), qt


def _file_type(qtype: str) -> int:
    import gguf
    name = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16"}.get(qtype, f"MOSTLY_{qtype}")
    return int(gguf.LlamaFileType[name])


def write_gguf(path, arch: str, qtype: str = "Q8_0", *, seed: int = 0, tie: bool = True, spec: Spec | None = None,
               embd_qtype: str | None = None, vocab: int | None = None, rope_freqs: np.ndarray | None = None) -> str:
    """A tiny GGUF of `arch` with 2-D weights in `qtype` (the embedding in embd_qtype, default qtype).
    vocab: pad the vocabulary with unused tokens to this size (e.g. Gemma 3's 262,144).
    rope_freqs: a [head_dim/2] rope_freqs.weight tensor, as llama.cpp's converter writes Llama 3.x scaling."""
    import gguf
    spec = spec or SPECS[arch]
    path = str(path)
    tokens, merges = tm.bpe_vocab_and_merges()
    vocab = max(vocab or 0, tm._ceil32(len(tokens)))
    types = ([gguf.TokenType.CONTROL] * len(tm.BPE_SPECIALS)
             + [gguf.TokenType.NORMAL] * (len(tokens) - len(tm.BPE_SPECIALS))
             + [gguf.TokenType.UNUSED] * (vocab - len(tokens)))
    # llama.cpp sets attributes of these by name in models named "phi3" (llama_vocab load: token_to_id.at)
    pad = ["<unk>", "<s>", "</s>"] if arch == "phi3" else []
    tokens = tokens + [pad[i - len(tokens)] if i - len(tokens) < len(pad) else f"[PAD{i}]" for i in range(len(tokens), vocab)]

    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny-{arch}-test")
    w.add_block_count(spec.layers)
    w.add_context_length(spec.max_pos)
    w.add_embedding_length(spec.hidden)
    w.add_feed_forward_length(spec.ffn)
    w.add_head_count(spec.heads)
    w.add_head_count_kv(spec.kv_heads)
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    w.add_rope_dimension_count(spec.extra.get("rope_dim", spec.head_dim))
    w.add_rope_freq_base(spec.theta)
    w.add_layer_norm_rms_eps(spec.eps)
    w.add_vocab_size(vocab)
    w.add_file_type(_file_type(qtype))
    if spec.window and arch == "phi3":
        w.add_sliding_window(spec.window)
    elif spec.window:
        w.add_sliding_window(spec.window)
        w.add_sliding_window_pattern(spec.pattern)
        w.add_rope_freq_base_swa(spec.theta_swa)
    if arch == "phi3":  # the converter's LongRoPE keys: attn_factor = sqrt(1 + ln(scale) / ln(original context))
        orig = spec.extra["orig_ctx"]
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(spec.max_pos / orig) / math.log(orig)))
        for kind, f in zip(("short", "long"), longrope_factors(spec)):
            w.add_tensor(f"rope_factors_{kind}.weight", f)
    tm.add_bpe_tokenizer(w, tokens, types, merges)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))

    tie = tie and arch != "phi3"  # llama.cpp's phi3 requires output.weight
    named = {gguf_name(hf, arch): a for hf, a in arch_weights(spec, vocab, seed=seed, tie=tie).items()}
    for i in range(spec.layers if arch == "phi3" else 0):  # llama.cpp's Phi-3 layout: fused q|k|v, gate|up
        b = f"blk.{i}."
        named[b + "attn_qkv.weight"] = np.concatenate([named.pop(b + f"attn_{x}.weight") for x in "qkv"])
        named[b + "ffn_up.weight"] = np.concatenate([named.pop(b + "ffn_gate.weight"), named.pop(b + "ffn_up.weight")])
    for name, a in named.items():
        if a.ndim == 1:
            w.add_tensor(name, a.astype(np.float32))
            continue
        if arch in ("llama", "smollm3") and name.endswith(("attn_q.weight", "attn_k.weight")):  # llama.cpp's Q/K permutation
            a = tm.permute_qk(a, spec.heads if name.endswith("attn_q.weight") else spec.kv_heads)
        data, raw = _quantize(a, (embd_qtype or qtype) if name == "token_embd.weight" else qtype)
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_hf_dir(path, arch: str, *, seed: int = 0, tie: bool = True, dtype: str = "float32",
                 spec: Spec | None = None, query_pre_attn_scalar: float = 24.0, new_style_config: bool = False) -> str:
    """A tiny HF checkpoint dir (config.json, model.safetensors, tokenizer.json + tokenizer_config.json).
    gemma3: model_type gemma3_text, norms stored as w - 1 (HF multiplies by 1 + w), query_pre_attn_scalar
    24 (not head_dim 32, so the scale must come from the config); new_style_config writes layer_types and
    rope_parameters (transformers >= 4.56) instead of sliding_window_pattern / rope_theta / rope_local_base_freq."""
    spec = spec or SPECS[arch]
    path = str(path)
    os.makedirs(path, exist_ok=True)
    tok_json = tm.trained_bpe_json()
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        f.write(tok_json)
    vocab = tm._ceil32(len(json.loads(tok_json)["model"]["vocab"]))
    tok_cfg = {"add_bos_token": False, "add_eos_token": False, "bos_token": "<|im_start|>",
               "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "chat_template": tm.CHATML_TEMPLATE, "model_max_length": spec.max_pos,
               "clean_up_tokenization_spaces": False, "tokenizer_class": "GPT2Tokenizer"}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=1)
    cfg = {"model_type": arch, "hidden_size": spec.hidden, "intermediate_size": spec.ffn,
           "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads, "num_key_value_heads": spec.kv_heads,
           "head_dim": spec.head_dim, "rms_norm_eps": spec.eps, "rope_theta": spec.theta, "vocab_size": vocab,
           "max_position_embeddings": spec.max_pos, "tie_word_embeddings": tie, "bos_token_id": 1,
           "eos_token_id": 2, "torch_dtype": dtype, "attention_bias": arch == "qwen2"}
    W = arch_weights(spec, vocab, seed=seed, tie=tie)
    if arch == "qwen3":
        cfg.update(architectures=["Qwen3ForCausalLM"], hidden_act="silu", use_sliding_window=False)
    elif arch == "gemma3":
        cfg.update(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
                   hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=query_pre_attn_scalar,
                   sliding_window=spec.window, final_logit_softcapping=None, attn_logit_softcapping=None)
        if new_style_config:
            del cfg["rope_theta"]
            cfg["layer_types"] = ["sliding_attention" if s else "full_attention" for s in swa_layers(spec)]
            cfg["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": spec.theta},
                                      "sliding_attention": {"rope_type": "default", "rope_theta": spec.theta_swa}}
        else:
            cfg.update(sliding_window_pattern=spec.pattern, rope_local_base_freq=spec.theta_swa, rope_scaling=None)
        W = {k: (v - np.float32(1.0) if k.endswith("norm.weight") else v) for k, v in W.items()}
    elif arch == "phi3":  # Phi-4-mini's config shape: fused projections, partial_rotary_factor, longrope
        short, long = longrope_factors(spec)
        cfg.update(architectures=["Phi3ForCausalLM"], hidden_act="silu", sliding_window=spec.window,
                   partial_rotary_factor=spec.extra["rope_dim"] / spec.head_dim,
                   original_max_position_embeddings=spec.extra["orig_ctx"],
                   rope_scaling={"type": "longrope", "short_factor": short.tolist(), "long_factor": long.tolist()})
        for i in range(spec.layers):
            p = f"model.layers.{i}."
            W[p + "self_attn.qkv_proj.weight"] = np.concatenate([W.pop(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
            W[p + "mlp.gate_up_proj.weight"] = np.concatenate([W.pop(p + "mlp.gate_proj.weight"), W.pop(p + "mlp.up_proj.weight")])
    elif arch == "smollm3":  # NoPE layers listed per layer (1: RoPE), as SmolLM3-3B's config.json does
        cfg.update(architectures=["SmolLM3ForCausalLM"], hidden_act="silu", no_rope_layer_interval=4,
                   no_rope_layers=[int((i + 1) % 4 != 0) for i in range(spec.layers)])
    else:
        cfg.update(architectures=["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"], hidden_act="silu")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    tm.write_safetensors(os.path.join(path, "model.safetensors"), W, dtype)
    return path


def attn_scale_gguf(spec: Spec) -> float:
    """What llama.cpp uses for a Gemma 3 GGUF (no query_pre_attn_scalar key): 1/sqrt(head_dim)."""
    return 1.0 / math.sqrt(spec.head_dim)
