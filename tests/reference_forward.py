"""Independent float64 numpy reference ("oracle") for LLaMA-family, Qwen3 and Gemma 3 forward passes.

Deliberately shares no code with `tinyvllm`: weights are read with the `gguf` package
(GGUFReader + gguf.quants.dequantize) or with a tiny hand-written safetensors reader, then
everything runs as a plain float64 numpy forward, readable top to bottom like llama2.c.

RoPE layouts (the classic trap):
  * GGUF files of arch `llama` store Q/K rows permuted by llama.cpp's converter so that RoPE
    rotates *interleaved pairs* (x[2i], x[2i+1]).                     -> rope_style "interleaved"
  * HF checkpoints (and GGUF qwen2, which llama.cpp runs with NEOX rope and does not permute)
    rotate the *two halves* (x[i], x[i + d/2]).                          -> rope_style "half"
  Both use the angle pos * inv_freq[i], inv_freq[i] = theta^(-2i/d) (optionally rescaled).
  * qwen3 / gemma3 GGUF files are not permuted either (llama.cpp runs both with NEOX rope).
  * smollm3 GGUF files are permuted like llama's (llama.cpp's converter treats SmolLM3 as a LlamaModel).

Architecture facts used here (llama.cpp src/models/{qwen3,gemma3}.cpp, HF transformers modeling code):
  * qwen3: RMSNorm over each q and k head (weights [head_dim]) after the projections, before RoPE.
  * gemma3: x = embed * sqrt(hidden); per layer
        h = attn(rope(qnorm(q)), rope(knorm(k)), v) -> o_proj -> post_attention_norm;  x = x + h
        h = down(gelu_tanh(gate(ffn_norm(x))) * up(ffn_norm(x))) -> post_ffw_norm;      x = x + h
    scores scaled by query_pre_attn_scalar^-1/2 (HF; llama.cpp's GGUF reading: 1/sqrt(head_dim), or
    1/sqrt(hidden/heads) for the 62-layer 27B); sliding layers mask keys with pos_q - pos_k >= window and use
    their own RoPE base (rope_local_base_freq / rope.freq_base_swa, never rescaled); global layers use
    rope_theta with the rope scaling; every 6th layer is global unless the file says otherwise. HF stores
    norm weights w and multiplies by (1 + w); GGUF stores w + 1 (llama.cpp's converter adds the 1).
  * smollm3: the llama block, but layers with (i + 1) % 4 == 0 apply no RoPE to q and k at all
    (llama.cpp src/models/smollm3.cpp: n_no_rope_layer_step = 4, fixed; HF: config no_rope_layers, 1 = RoPE).
  * phi3 (llama.cpp src/models/phi3.cpp): the llama block with q, k, v in one attn_qkv matrix (rows q | k | v)
    and gate, up in one ffn_up matrix (rows gate | up: ggml_swiglu's silu(first half) * second half);
    NEOX rotation of the first rope.dimension_count values of each head only (partial RoPE), the
    rest passing through; LongRoPE: inv_freq divided by rope_factors_short, or rope_factors_long when
    the context n_ctx exceeds rope.scaling.original_context_length; cos and sin (the rotated values
    only) times rope.scaling.attn_factor; the file's sliding window is ignored, as llama.cpp does.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field, replace

import numpy as np

F64 = np.float64


# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    arch: str                 # "llama" | "qwen2"
    n_layers: int
    hidden: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    theta: float
    rope_style: str           # "interleaved" (GGUF llama) | "half" (HF, GGUF qwen2)
    rope_scaling: dict | None = None   # {"type": "linear"|"llama3", "factor": ..., ...}
    tied: bool = True
    bos_id: int | None = None
    eos_ids: list = field(default_factory=list)
    qk_norm: bool = False           # qwen3, gemma3
    gemma: bool = False             # embedding scale, post norms, GELU-tanh gate
    norm_offset: float = 0.0        # HF gemma3: RMSNorm multiplies by (norm_offset + w)
    attn_scale: float | None = None  # None: 1/sqrt(head_dim)
    softcap: float = 0.0            # final logit soft cap
    window: int = 0                 # sliding window of the layers flagged in swa
    swa: list = field(default_factory=list)
    theta_swa: float = 10000.0
    nope: list = field(default_factory=list)  # per layer: True = no RoPE (smollm3)
    rot: int = 0                    # rotated values per head (partial RoPE); 0: head_dim
    mscale: float = 1.0             # RoPE cos/sin magnitude (phi3 LongRoPE attn_factor)


# ----------------------------------------------------------------------------- Q/K permutation

def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf permutation (HF half-split rows -> GGUF interleaved rows):
    per head, rows viewed as [2, d/2] are transposed to [d/2, 2]. Works for weights and biases."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of permute_qk (GGUF interleaved rows -> HF half-split rows)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- RoPE frequencies

def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """inv_freq[i] = theta^(-2i/d), i < d/2, with optional linear or llama3 rescaling (HF semantics)."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=F64) / head_dim))
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling.get("factor", 1.0))
    if kind in (None, "default"):
        return inv
    if kind == "linear":                     # positions / factor  ==  inv_freq / factor
        return inv / factor
    if kind == "freq_factors":               # GGUF rope_freqs.weight: llama.cpp's form of the llama3 rescaling
        return inv / np.asarray(scaling["factors"], dtype=F64)
    if kind == "llama3":
        lo, hi = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        out = np.where(wavelen > old_ctx / lo, inv / factor, inv)        # low freqs: fully scaled
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)   # in between: blend
        return np.where(medium, (1 - smooth) * inv / factor + smooth * inv, out)
    raise NotImplementedError(f"rope scaling {kind!r}")


def apply_rope(x: np.ndarray, pos: np.ndarray, inv_freq: np.ndarray, style: str, mscale: float = 1.0) -> np.ndarray:
    """x: [T, H, d]; pos: [T] absolute positions. Returns the rotated copy. Only the first 2 * len(inv_freq)
    values of each head rotate (partial RoPE); the rest are copied."""
    rot = 2 * len(inv_freq)
    if rot < x.shape[-1]:
        return np.concatenate([apply_rope(x[..., :rot], pos, inv_freq, style, mscale), x[..., rot:]], axis=-1)
    ang = pos.astype(F64)[:, None] * inv_freq[None, :]                 # [T, d/2]
    cos, sin = mscale * np.cos(ang)[:, None, :], mscale * np.sin(ang)[:, None, :]  # [T, 1, d/2]
    out = np.empty_like(x)
    if style == "interleaved":
        a, b = x[..., 0::2], x[..., 1::2]
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    elif style == "half":
        h = x.shape[-1] // 2
        a, b = x[..., :h], x[..., h:]
        out[..., :h], out[..., h:] = a * cos - b * sin, a * sin + b * cos
    else:
        raise ValueError(style)
    return out


# ----------------------------------------------------------------------------- small helpers

def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Minimal safetensors reader (F32/F16/BF16/F64) -> float64 arrays. BF16 = upper half of f32."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        raw, dt = data[a:b], info["dtype"]
        if dt == "BF16":
            arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, {"F32": np.float32, "F16": np.float16, "F64": np.float64}[dt])
        out[name] = arr.reshape(info["shape"]).astype(F64)
    return out


class _SingleThreadBLAS:
    """Run numpy's OpenBLAS on one thread while the oracle computes (restored afterwards). The forward is
    memory-bound float64 matvec; with 2 BLAS threads and another busy process on a 2-core machine it ran
    3-5x slower than on 1 thread. No-op when the library or its symbols cannot be found."""

    _lib = _get = _set = None
    _looked = False

    @classmethod
    def _find(cls):
        cls._looked = True
        try:
            import ctypes
            path = next(line.split()[-1] for line in open("/proc/self/maps") if "openblas" in line.lower())
            lib = ctypes.CDLL(path)
            for pre in ("scipy_openblas_", "openblas_"):
                for suf in ("64_", "_64_", ""):
                    if hasattr(lib, f"{pre}set_num_threads{suf}") and hasattr(lib, f"{pre}get_num_threads{suf}"):
                        cls._set = getattr(lib, f"{pre}set_num_threads{suf}")
                        cls._get = getattr(lib, f"{pre}get_num_threads{suf}")
                        cls._lib = lib
                        return
        except (OSError, StopIteration, AttributeError):
            pass

    def __enter__(self):
        if not self._looked:
            self._find()
        self.prev = self._get() if self._get else None
        if self.prev is not None and self.prev != 1:
            self._set(1)
        return self

    def __exit__(self, *exc):
        if self.prev is not None and self.prev != 1:
            self._set(self.prev)


# ----------------------------------------------------------------------------- KV cache

class KVCache:
    """Per-layer growing K/V arrays ([S, n_kv_heads, head_dim]); `len(cache)` = positions cached."""

    def __init__(self, n_layers: int):
        self.k: list = [None] * n_layers
        self.v: list = [None] * n_layers

    def __len__(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[0]

    def append(self, layer: int, k: np.ndarray, v: np.ndarray):
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k, v
        else:
            self.k[layer] = np.concatenate([self.k[layer], k])
            self.v[layer] = np.concatenate([self.v[layer], v])
        return self.k[layer], self.v[layer]


# ----------------------------------------------------------------------------- the model

_GGUF_LAYER_NAMES = {  # our name -> GGUF tensor suffix
    "attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight",
    "wv": "attn_v.weight", "wo": "attn_output.weight", "bq": "attn_q.bias", "bk": "attn_k.bias",
    "bv": "attn_v.bias", "ffn_norm": "ffn_norm.weight", "w_gate": "ffn_gate.weight",
    "w_up": "ffn_up.weight", "w_down": "ffn_down.weight", "q_norm": "attn_q_norm.weight",
    "k_norm": "attn_k_norm.weight", "post_attn_norm": "post_attention_norm.weight", "post_ffn_norm": "post_ffw_norm.weight",
}
_HF_LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight",
    "bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias",
    "ffn_norm": "post_attention_layernorm.weight", "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight",
    "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
}
_HF_GEMMA3_LAYER_NAMES = {**_HF_LAYER_NAMES, "post_attn_norm": "post_attention_layernorm.weight",
                          "ffn_norm": "pre_feedforward_layernorm.weight",
                          "post_ffn_norm": "post_feedforward_layernorm.weight"}


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _swa_flags(n_layers: int, pattern) -> list:
    """Gemma 3 layer kinds: a list of bools as given, or a period whose last layer is global."""
    if isinstance(pattern, (list, tuple)):
        return [bool(b) for b in pattern]
    n = int(pattern)
    return [n == 0 or (i + 1) % n != 0 for i in range(n_layers)]


class ReferenceModel:
    """Float64 LLaMA/Qwen2 forward. Weights: `embed` [V, D], `norm` [D], `out` [V, D] (is `embed` when
    tied), `layers[i]` dict of attn_norm, wq/wk/wv/wo, bq/bk/bv (or None), ffn_norm, w_gate/w_up/w_down,
    all matrices laid out [out_features, in_features] so y = W @ x."""

    def __init__(self, cfg: Config, embed, norm, out, layers, metadata=None):
        self.cfg, self.embed, self.norm, self.out, self.layers = cfg, embed, norm, out, layers
        self.metadata = metadata or {}
        self.inv_freq = rope_inv_freq(cfg.rot or cfg.head_dim, cfg.theta, cfg.rope_scaling)
        self.inv_freq_swa = rope_inv_freq(cfg.rot or cfg.head_dim, cfg.theta_swa, None)

    # ---- constructors

    @classmethod
    def from_gguf(cls, path: str, n_ctx: int = 512) -> "ReferenceModel":
        """n_ctx: the context the model serves (phi3's LongRoPE factor choice)."""
        import gguf
        r = gguf.GGUFReader(path)
        meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
        arch = meta["general.architecture"]
        if arch not in ("llama", "qwen2", "qwen3", "gemma3", "smollm3", "phi3"):
            raise NotImplementedError(arch)
        g = lambda key, default=None: meta.get(f"{arch}.{key}", default)
        W = {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=F64).reshape(
            [int(n) for n in reversed(t.shape)]) for t in r.tensors}
        n_heads, hidden = int(g("attention.head_count")), int(g("embedding_length"))
        head_dim = int(g("attention.key_length", hidden // n_heads))
        scaling = None
        if g("rope.scaling.type") == "linear":
            scaling = {"type": "linear", "factor": float(g("rope.scaling.factor"))}
        if "rope_freqs.weight" in W:     # llama3-style: per-frequency divisors baked into a tensor
            scaling = {"type": "freq_factors", "factors": W["rope_freqs.weight"]}
        eos = meta.get("tokenizer.ggml.eos_token_id")
        n_layers = int(g("block_count"))
        extra = {}
        if arch == "qwen3":
            extra = dict(qk_norm=True)
        elif arch == "smollm3":
            extra = dict(nope=[(i + 1) % 4 == 0 for i in range(n_layers)])
        elif arch == "phi3":
            n_kv = int(g("attention.head_count_kv", n_heads))
            for i in range(n_layers):
                b = f"blk.{i}."
                if b + "attn_qkv.weight" in W:
                    W[b + "attn_q.weight"], W[b + "attn_k.weight"], W[b + "attn_v.weight"] = np.split(
                        W.pop(b + "attn_qkv.weight"), [n_heads * head_dim, (n_heads + n_kv) * head_dim])
                if b + "ffn_gate.weight" not in W:
                    W[b + "ffn_gate.weight"], W[b + "ffn_up.weight"] = np.split(W[b + "ffn_up.weight"], 2)
            extra = dict(mscale=float(g("rope.scaling.attn_factor", 1.0)))
            if "rope_factors_short.weight" in W:
                orig = int(g("rope.scaling.original_context_length", g("context_length")))
                which = "long" if n_ctx > orig else "short"
                scaling = {"type": "freq_factors", "factors": W[f"rope_factors_{which}.weight"]}
        elif arch == "gemma3":
            window = int(g("attention.sliding_window", 0) or 0)
            swa = _swa_flags(n_layers, g("attention.sliding_window_pattern", 6)) if window else []
            extra = dict(qk_norm=True, gemma=True, window=window, swa=swa,
                         theta_swa=float(g("rope.freq_base_swa", 10000.0)),
                         softcap=float(g("final_logit_softcapping", 0.0) or 0.0),
                         attn_scale=1.0 / math.sqrt(hidden / n_heads if n_layers == 62 else head_dim))
        cfg = Config(
            arch=arch, n_layers=n_layers, hidden=hidden, ffn=int(g("feed_forward_length")),
            n_heads=n_heads, n_kv_heads=int(g("attention.head_count_kv", n_heads)), head_dim=head_dim,
            vocab=W["token_embd.weight"].shape[0], eps=float(g("attention.layer_norm_rms_epsilon")),
            theta=float(g("rope.freq_base", 10000.0)),
            rope_style="interleaved" if arch in ("llama", "smollm3") else "half", rope_scaling=scaling,
            tied="output.weight" not in W, bos_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_ids=[] if eos is None else [int(eos)], rot=int(g("rope.dimension_count", head_dim)), **extra)
        layers = [{k: W.get(f"blk.{i}.{s}") for k, s in _GGUF_LAYER_NAMES.items()} for i in range(cfg.n_layers)]
        embed = W["token_embd.weight"]
        return cls(cfg, embed, W["output_norm.weight"], W.get("output.weight", embed), layers, meta)

    @classmethod
    def from_hf_dir(cls, path: str, n_ctx: int = 512) -> "ReferenceModel":
        """n_ctx: the context served (phi3's LongRoPE choice: HF's modeling code picks by the current length;
        a server fixes it by its context, as llama.cpp does)."""
        with open(os.path.join(path, "config.json")) as f:
            c = json.load(f)
        W: dict = {}
        index = os.path.join(path, "model.safetensors.index.json")
        files = (sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index)
                 else ["model.safetensors"])
        for fn in files:
            W.update(read_safetensors(os.path.join(path, fn)))
        mt = c.get("model_type", "")
        arch = ("gemma3" if mt.startswith("gemma3") else mt if mt in ("qwen3", "smollm3", "phi3") else
                "qwen2" if "qwen2" in mt else "llama")
        n_heads, hidden = c["num_attention_heads"], c["hidden_size"]
        eos = c.get("eos_token_id")
        extra, names = {}, _HF_LAYER_NAMES
        if arch == "qwen3":
            extra = dict(qk_norm=True)
        elif arch == "smollm3":
            uses = c.get("no_rope_layers") or [int((i + 1) % c.get("no_rope_layer_interval", 4) != 0)
                                               for i in range(c["num_hidden_layers"])]
            extra = dict(nope=[not u for u in uses])
        elif arch == "phi3":  # HF Phi3: qkv_proj rows q | k | v, gate_up_proj rows gate | up; LongRoPE in rope_scaling
            hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
            nq, nkv = c["num_attention_heads"] * hd, c.get("num_key_value_heads", c["num_attention_heads"]) * hd
            for i in range(c["num_hidden_layers"]):
                p = f"model.layers.{i}."
                qkv = W.pop(p + "self_attn.qkv_proj.weight")
                W[p + "self_attn.q_proj.weight"], W[p + "self_attn.k_proj.weight"], W[p + "self_attn.v_proj.weight"] = \
                    np.split(qkv, [nq, nq + nkv])
                W[p + "mlp.gate_proj.weight"], W[p + "mlp.up_proj.weight"] = np.split(W.pop(p + "mlp.gate_up_proj.weight"), 2)
            rs, orig = c.get("rope_scaling"), c.get("original_max_position_embeddings")
            scale = c["max_position_embeddings"] / orig if orig else 1.0
            extra = dict(rot=int(hd * c.get("partial_rotary_factor", 1.0)),
                         mscale=math.sqrt(1 + math.log(scale) / math.log(orig)) if rs and scale > 1 else 1.0)
            if rs:
                c = {**c, "rope_scaling": {"type": "freq_factors",
                                           "factors": rs["long_factor" if n_ctx > orig else "short_factor"]}}
        elif arch == "gemma3":
            names = _HF_GEMMA3_LAYER_NAMES
            n_layers, hd = c["num_hidden_layers"], c.get("head_dim") or 256
            window = int(c.get("sliding_window") or 0)
            kinds = c.get("layer_types")
            swa = ([k == "sliding_attention" for k in kinds] if kinds else
                   _swa_flags(n_layers, c.get("sliding_window_pattern", 6)))
            rp = c.get("rope_parameters") or {}   # transformers >= 4.56: per layer kind
            if "full_attention" in rp:
                c = {**c, "rope_theta": rp["full_attention"]["rope_theta"]}
            extra = dict(qk_norm=True, gemma=True, norm_offset=1.0, window=window, swa=swa if window else [],
                         theta_swa=float(rp.get("sliding_attention", {}).get(
                             "rope_theta", c.get("rope_local_base_freq", 10000.0))),
                         softcap=float(c.get("final_logit_softcapping") or 0.0),
                         attn_scale=float(c.get("query_pre_attn_scalar") or hd) ** -0.5)
        cfg = Config(
            arch=arch, n_layers=c["num_hidden_layers"], hidden=hidden, ffn=c["intermediate_size"],
            n_heads=n_heads, n_kv_heads=c.get("num_key_value_heads", n_heads),
            head_dim=c.get("head_dim") or hidden // n_heads, vocab=W["model.embed_tokens.weight"].shape[0],
            eps=c.get("rms_norm_eps", 1e-6), theta=c.get("rope_theta", 10000.0), rope_style="half",
            rope_scaling=c.get("rope_scaling"), tied="lm_head.weight" not in W,
            bos_id=c.get("bos_token_id"), eos_ids=[] if eos is None else (eos if isinstance(eos, list) else [eos]),
            **extra)
        layers = [{k: W.get(f"model.layers.{i}.{s}") for k, s in names.items()} for i in range(cfg.n_layers)]
        embed = W["model.embed_tokens.weight"]
        return cls(cfg, embed, W["model.norm.weight"], W.get("lm_head.weight", embed), layers, {"config": c})

    def unpermuted(self) -> "ReferenceModel":
        """Same weights with GGUF-permuted Q/K rows restored to HF order, using half-split RoPE."""
        assert self.cfg.rope_style == "interleaved"
        c = self.cfg
        fix = {"wq": c.n_heads, "bq": c.n_heads, "wk": c.n_kv_heads, "bk": c.n_kv_heads}
        layers = [{k: (unpermute_qk(v, fix[k]) if k in fix and v is not None else v) for k, v in L.items()}
                  for L in self.layers]
        return ReferenceModel(replace(c, rope_style="half"), self.embed, self.norm, self.out, layers, self.metadata)

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layers)

    # ---- forward

    def forward(self, tokens, start_pos: int = 0, cache: KVCache | None = None) -> np.ndarray:
        """Logits float64 [len(tokens), vocab] for `tokens` at positions start_pos.. (cache holds the
        earlier positions; pass None for a one-shot pass with no history)."""
        with _SingleThreadBLAS():
            return self._forward(tokens, start_pos, cache)

    def _forward(self, tokens, start_pos: int, cache: KVCache | None) -> np.ndarray:
        c = self.cfg
        cache = cache if cache is not None else self.new_cache()
        assert len(cache) == start_pos, (len(cache), start_pos)
        T, H, KVH, hd = len(tokens), c.n_heads, c.n_kv_heads, c.head_dim
        pos = np.arange(start_pos, start_pos + T)
        x = self.embed[np.asarray(tokens, dtype=np.int64)]                  # [T, D]
        if c.gemma:
            x = x * math.sqrt(c.hidden)
        norm = lambda v, w: rmsnorm(v, c.norm_offset + w, c.eps)
        # causal mask: query t (absolute start_pos+t) sees keys 0..start_pos+t
        S = start_pos + T
        mask = np.where(np.arange(S)[None, :] <= pos[:, None], 0.0, -np.inf)  # [T, S]
        # sliding layers: also keys with pos_q - pos_k >= window are out
        mask_swa = np.where(pos[:, None] - np.arange(S)[None, :] < c.window, mask, -np.inf) if c.window else mask
        scale = c.attn_scale if c.attn_scale is not None else 1.0 / math.sqrt(hd)
        for i, L in enumerate(self.layers):
            swa = bool(c.window) and c.swa[i]
            inv_freq = self.inv_freq_swa if swa else self.inv_freq
            # --- attention
            h = norm(x, L["attn_norm"])
            q, k, v = h @ L["wq"].T, h @ L["wk"].T, h @ L["wv"].T
            if L["bq"] is not None:
                q, k, v = q + L["bq"], k + L["bk"], v + L["bv"]
            q, k = q.reshape(T, H, hd), k.reshape(T, KVH, hd)
            if c.qk_norm:
                q, k = norm(q, L["q_norm"]), norm(k, L["k_norm"])
            if not (c.nope and c.nope[i]):
                q = apply_rope(q, pos, inv_freq, c.rope_style, c.mscale)
                k = apply_rope(k, pos, inv_freq, c.rope_style, c.mscale)
            K, V = cache.append(i, k, v.reshape(T, KVH, hd))                # [S, KVH, hd]
            att = np.empty((T, H, hd), dtype=F64)
            group = H // KVH
            for hh in range(H):
                kv = hh // group                                             # GQA: query head -> kv head
                scores = q[:, hh, :] @ K[:, kv, :].T * scale + (mask_swa if swa else mask)  # [T, S]
                att[:, hh, :] = softmax(scores) @ V[:, kv, :]
            o = att.reshape(T, H * hd) @ L["wo"].T
            x = x + (norm(o, L["post_attn_norm"]) if c.gemma else o)
            # --- gated MLP: SwiGLU, or GELU(tanh) for gemma3
            h = norm(x, L["ffn_norm"])
            act = gelu_tanh if c.gemma else silu
            o = (act(h @ L["w_gate"].T) * (h @ L["w_up"].T)) @ L["w_down"].T
            x = x + (norm(o, L["post_ffn_norm"]) if c.gemma else o)
        logits = norm(x, self.norm) @ self.out.T
        return c.softcap * np.tanh(logits / c.softcap) if c.softcap else logits

    def prefill_logits(self, tokens) -> np.ndarray:
        return self.forward(list(tokens), 0, None)

    def greedy(self, prompt_ids, n_tokens: int, eos_ids=None):
        """Greedy decode up to n_tokens new tokens (stops after emitting an eos id).
        Returns (tokens, gaps): gaps[i] = top-1 minus top-2 logit at step i."""
        eos = set(self.cfg.eos_ids if eos_ids is None else eos_ids)
        cache = self.new_cache()
        logits = self.forward(list(prompt_ids), 0, cache)[-1]
        out, gaps = [], []
        for _ in range(n_tokens):
            top2 = np.partition(logits, -2)[-2:]
            tok = int(np.argmax(logits))
            out.append(tok)
            gaps.append(float(top2[1] - top2[0]))
            if tok in eos or len(out) == n_tokens:
                break
            logits = self.forward([tok], len(cache), cache)[-1]
        return out, gaps
