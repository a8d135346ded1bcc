"""ModelConfig: one config for GGUF metadata and HF config.json (llama / mistral / qwen2 / qwen3 / gemma3 / smollm3 /
phi3)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tinyvllm.model.errors import ModelFormatError

# "mistral" is llama with (optionally) sliding-window attention on every layer (from_hf_dict sets it).
_ARCH_ALIASES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3",
                 "gemma3_text": "gemma3",  # gemma3_text: HF's text-only Gemma 3 (Gemma3ForCausalLM)
                 "smollm3": "smollm3",  # llama with NoPE layers (nope_layers)
                 "phi3": "phi3"}  # fused qkv / gate_up (split at load), LongRoPE factors
# llama.cpp's default for Gemma 3 when the file gives no pattern: every 6th layer is global.
GEMMA3_SWA_PATTERN = 6
# SmolLM3: every 4th layer has no RoPE. llama.cpp hard-codes this step (no GGUF key holds it); HF's
# config says it as no_rope_layer_interval or lists no_rope_layers (1: the layer uses RoPE).
SMOLLM3_NOPE_STEP = 4


def swa_pattern_layers(n_layers: int, pattern: int) -> tuple[bool, ...]:
    """Sliding-window flags from a period: in each group of `pattern` layers the last one is global
    (llama.cpp set_swa_pattern; HF Gemma 3's `(i + 1) % pattern != 0`). 0: every layer slides."""
    return tuple(pattern == 0 or i % pattern < pattern - 1 for i in range(n_layers))


def nope_step_layers(n_layers: int, step: int) -> tuple[bool, ...]:
    """No-RoPE flags from a step: layer i skips RoPE when (i + 1) % step == 0 (llama.cpp, HF SmolLM3)."""
    return tuple(step > 0 and (i + 1) % step == 0 for i in range(n_layers))


def _arch(name: Any) -> str:
    arch = _ARCH_ALIASES.get(str(name).lower())
    if arch is None:
        raise ModelFormatError(f"unsupported architecture {name!r} (supported: {', '.join(sorted(_ARCH_ALIASES))})")
    return arch


def _hf_special_ids(cfg: dict) -> dict:
    eos, bos = cfg.get("eos_token_id"), cfg.get("bos_token_id")
    eos_ids = tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    return dict(bos_token_id=bos if isinstance(bos, int) else None, eos_token_id=eos_ids[0] if eos_ids else None,
                eos_token_ids=eos_ids)


def _normalize_rope_scaling(rs: Any) -> dict | None:
    """HF-style rope scaling dict -> {"rope_type": ..., ...} or None; unsupported kinds are errors
    (silently ignoring them would give plausible but wrong logits)."""
    if not rs:
        return None
    if not isinstance(rs, dict):
        raise ModelFormatError(f"rope_scaling must be a dict, got {rs!r}")
    rs = dict(rs)
    kind = rs.pop("rope_type", None) or rs.pop("type", None) or "default"
    kind = {"su": "longrope"}.get(kind, kind)  # early Phi-3 128k configs call LongRoPE "su"
    rs.pop("type", None)
    rs.pop("rope_theta", None)  # newer HF "rope_parameters" puts theta in the same dict
    if kind == "default":
        return None
    need = {"linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
            "freq_factors": ("factors",),
            "longrope": ("short_factor", "long_factor", "original_max_position_embeddings")}.get(kind)
    if need is None:
        raise ModelFormatError(f"unsupported rope scaling type {kind!r} (supported: linear, llama3, longrope)")
    for k in need:
        if k not in rs:
            raise ModelFormatError(f"rope scaling {kind!r} is missing {k!r}")
    return {"rope_type": kind, **rs}


@dataclass
class ModelConfig:
    arch: str                      # "llama" | "qwen2" | "qwen3" | "gemma3" (mistral is stored as llama)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False   # q/k/v projections have biases (qwen2)
    rope_interleaved: bool = False  # True: rotate (x[2i], x[2i+1]) (llama GGUF); False: (x[i], x[i+d/2])
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default=())  # all stop ids when the config lists several
    # Beyond LLaMA (set by the constructors from the architecture and its config):
    qk_norm: bool = False          # RMSNorm per q/k head before RoPE (qwen3, gemma3)
    post_norms: bool = False       # RMSNorm of the attention / FFN outputs before the residual add (gemma3)
    ffn_act: str = "silu"          # "silu" | "gelu_tanh" (gemma3)
    embed_scale: float = 1.0       # token embeddings x this (gemma3: sqrt(hidden))
    attn_scale: float | None = None  # attention logit scale; None: 1/sqrt(head_dim)
    final_logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap)
    sliding_window: int = 0        # > 0: the layers flagged in swa_layers see the last sliding_window positions
    swa_layers: tuple[bool, ...] = field(default=())
    rope_theta_swa: float | None = None  # RoPE base of the sliding layers (no scaling); None: rope_theta
    nope_layers: tuple[bool, ...] = field(default=())  # True: the layer applies no RoPE (smollm3); (): all rotate
    rope_dim: int = 0              # values rotated per q/k head (partial RoPE); 0: head_dim
    rope_mscale: float = 1.0       # RoPE's cos/sin x this (LongRoPE's attention factor)
    serve_len: int | None = None   # the context the engine serves (max_model_len): LongRoPE picks its factors by it

    def __post_init__(self):
        self.arch = _arch(self.arch)
        self.rope_scaling = _normalize_rope_scaling(self.rope_scaling)
        if self.eos_token_id is not None and not self.eos_token_ids:
            self.eos_token_ids = (self.eos_token_id,)
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "max_position_embeddings"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ModelFormatError(f"config {k} must be a positive integer, got {v!r}")
            setattr(self, k, int(v))
        if self.num_heads % self.num_kv_heads:
            raise ModelFormatError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        self.rope_dim = int(self.rope_dim or self.head_dim)
        if self.head_dim % 2 or self.rope_dim % 2 or not 0 < self.rope_dim <= self.head_dim:
            raise ModelFormatError(f"head_dim {self.head_dim} and rope dimension {self.rope_dim} must be even, "
                                   "the rope dimension at most head_dim")
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0 and 0 < self.rope_mscale < math.inf):
            raise ModelFormatError(f"bad rms_norm_eps {self.rms_norm_eps} / rope_theta {self.rope_theta} / "
                                   f"rope attention factor {self.rope_mscale}")
        self.rms_norm_eps, self.rope_theta = float(self.rms_norm_eps), float(self.rope_theta)
        if self.ffn_act not in ("silu", "gelu_tanh"):
            raise ModelFormatError(f"unsupported FFN activation {self.ffn_act!r} (supported: silu, gelu_tanh)")
        self.sliding_window = int(self.sliding_window or 0)
        if self.sliding_window < 0:
            raise ModelFormatError(f"sliding_window must be >= 0, got {self.sliding_window}")
        self.swa_layers = tuple(bool(b) for b in self.swa_layers) if self.sliding_window else ()
        if self.sliding_window and len(self.swa_layers) != self.num_layers:
            raise ModelFormatError(f"sliding-window layer pattern has {len(self.swa_layers)} entries, "
                                   f"expected one per layer ({self.num_layers})")
        self.nope_layers = tuple(bool(b) for b in self.nope_layers) if any(self.nope_layers) else ()
        if self.nope_layers and len(self.nope_layers) != self.num_layers:
            raise ModelFormatError(f"no-RoPE layer list has {len(self.nope_layers)} entries, "
                                   f"expected {self.num_layers}")

    def rope_inv_freq(self) -> np.ndarray:
        """float32 [head_dim//2]: theta^(-2i/d), with the configured frequency scaling applied.
        Computed in float64 and rounded once so every backend sees the same table."""
        d = self.rope_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        rs = self.rope_scaling
        kind = rs["rope_type"] if rs else None
        if kind == "linear":
            inv = inv / float(rs["factor"])
        elif kind == "llama3":
            # Llama 3.1: keep high frequencies, divide low ones by factor, blend smoothly in between.
            factor, lo, hi = float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
            old_ctx = float(rs["original_max_position_embeddings"])
            wavelen = 2 * math.pi / inv
            smooth = np.clip((old_ctx / wavelen - lo) / (hi - lo), 0.0, 1.0)
            inv = np.where(wavelen < old_ctx / hi, inv,
                           np.where(wavelen > old_ctx / lo, inv / factor, (1 - smooth) * inv / factor + smooth * inv))
        elif kind == "freq_factors":
            # llama.cpp stores Llama-3 scaling as a per-frequency divisor tensor (rope_freqs.weight).
            f = np.asarray(rs["factors"], dtype=np.float64)
            if f.shape != inv.shape:
                raise ModelFormatError(f"rope freq factors have shape {f.shape}, expected {inv.shape}")
            inv = inv / f
        elif kind == "longrope":
            # Phi-3: per-frequency divisors, the long set when the served context exceeds the original one
            # (llama.cpp get_rope_factors: n_ctx_per_seq > n_ctx_orig_yarn; HF Phi3: seq_len > original)
            long = (self.serve_len or self.max_position_embeddings) > int(rs["original_max_position_embeddings"])
            f = np.asarray(rs["long_factor" if long else "short_factor"], dtype=np.float64)
            if f.shape != inv.shape:
                raise ModelFormatError(f"LongRoPE factors have shape {f.shape}, expected {inv.shape}")
            inv = inv / f
        return inv.astype(np.float32)

    def rope_inv_freq_swa(self) -> np.ndarray:
        """float32 [head_dim//2] of the sliding-window layers: their own base, never rescaled (Gemma 3's
        local layers keep rope_local_base_freq; scaling applies to the global layers only)."""
        d, theta = self.rope_dim, self.rope_theta_swa or self.rope_theta
        return (1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))).astype(np.float32)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    # ---- constructors -------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, cfg: dict) -> "ModelConfig":
        """From a Hugging Face config.json dict. HF checkpoints keep the half-split RoPE layout."""
        def req(k):
            if cfg.get(k) is None:
                raise ModelFormatError(f"config.json is missing required key {k!r}")
            return cfg[k]

        arch = req("model_type")
        if _arch(arch) == "gemma3":  # reject unsupported before complaining about other keys
            return cls._from_hf_gemma3(cfg, req)
        if cfg.get("mlp_bias"):
            raise ModelFormatError("config.json: mlp_bias=true is not supported")
        hidden, heads = int(req("hidden_size")), int(req("num_attention_heads"))
        params = cfg.get("rope_parameters") or {}  # transformers >= 4.56 moved theta + scaling here
        rope_scaling = cfg.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
        theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
        mscale = 1.0
        if rope_scaling and (rope_scaling.get("rope_type") or rope_scaling.get("type")) in ("longrope", "su"):
            orig = int(rope_scaling.get("original_max_position_embeddings") or req("original_max_position_embeddings"))
            scale = (cfg.get("max_position_embeddings") or orig) / orig  # HF's attention factor: magnitude of cos/sin
            mscale = rope_scaling.get("attention_factor") or (
                math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0)
            rope_scaling = {**rope_scaling, "original_max_position_embeddings": orig}
        window = int(cfg.get("sliding_window") or 0) if str(arch).lower() == "mistral" else 0
        layers = int(req("num_hidden_layers"))
        nope = ()
        if _arch(arch) == "smollm3":
            step = int(cfg.get("no_rope_layer_interval") or SMOLLM3_NOPE_STEP)
            nope = (tuple(not u for u in cfg["no_rope_layers"]) if cfg.get("no_rope_layers")
                    else nope_step_layers(layers, step))
        if window and rope_scaling:  # the sliding layers' RoPE table is never rescaled (rope_inv_freq_swa)
            raise ModelFormatError("config.json: mistral sliding_window together with rope_scaling is not supported")
        return cls(
            sliding_window=window, swa_layers=(True,) * int(req("num_hidden_layers")) if window else (),
            arch=arch, vocab_size=req("vocab_size"), hidden_size=hidden, intermediate_size=req("intermediate_size"),
            num_layers=req("num_hidden_layers"), num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=req("rms_norm_eps"), rope_theta=theta, rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings") or 2048,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=_arch(arch) == "qwen2" or bool(cfg.get("attention_bias", False)),
            rope_interleaved=False, qk_norm=_arch(arch) == "qwen3", nope_layers=nope, rope_mscale=mscale,
            rope_dim=int((cfg.get("head_dim") or hidden // heads) * float(cfg.get("partial_rotary_factor") or 1.0)),
            **_hf_special_ids(cfg))

    @classmethod
    def _from_hf_gemma3(cls, cfg: dict, req) -> "ModelConfig":
        """HF Gemma 3 text config (Gemma3ForCausalLM). Norm weights are stored as w with the model using
        (1 + w): the HF loader adds the 1, as llama.cpp's converter does, so every backend sees GGUF's w + 1."""
        if "text_config" in cfg:
            raise ModelFormatError("multimodal Gemma 3 checkpoints (model_type 'gemma3' with a text_config) are not "
                                   "supported: use a text-only one (model_type 'gemma3_text', Gemma3ForCausalLM) or a GGUF")
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        if act != "gelu_pytorch_tanh":
            raise ModelFormatError(f"gemma3: unsupported hidden_activation {act!r} (supported: gelu_pytorch_tanh)")
        if cfg.get("attn_logit_softcapping"):
            raise ModelFormatError("gemma3: attn_logit_softcapping is not supported")
        if cfg.get("use_bidirectional_attention"):
            raise ModelFormatError("gemma3: use_bidirectional_attention (embedding models) is not supported")
        hidden, heads, layers = int(req("hidden_size")), int(req("num_attention_heads")), int(req("num_hidden_layers"))
        head_dim = int(cfg.get("head_dim") or 256)
        # transformers >= 4.56: rope_parameters per layer kind; before: rope_theta + rope_scaling + rope_local_base_freq
        params = cfg.get("rope_parameters") or {}
        full, local = params.get("full_attention"), params.get("sliding_attention")
        if full is None and params.get("rope_theta") is not None:
            full = params
        theta = (full or {}).get("rope_theta", cfg.get("rope_theta", 1_000_000.0))
        rope_scaling = cfg.get("rope_scaling") or (full if full and full.get("rope_type", "default") != "default" else None)
        if local and local.get("rope_type", "default") != "default":
            raise ModelFormatError(f"gemma3: rope scaling on the sliding layers ({local}) is not supported")
        theta_swa = (local or {}).get("rope_theta", cfg.get("rope_local_base_freq", 10000.0))
        window = int(cfg.get("sliding_window") or 0)
        if cfg.get("layer_types"):
            kinds = list(cfg["layer_types"])
            bad = set(kinds) - {"sliding_attention", "full_attention"}
            if bad or len(kinds) != layers:
                raise ModelFormatError(f"gemma3: layer_types must list sliding_attention/full_attention per layer, got {kinds}")
            swa = tuple(k == "sliding_attention" for k in kinds)
        else:
            swa = swa_pattern_layers(layers, int(cfg.get("sliding_window_pattern", GEMMA3_SWA_PATTERN)))
        if not window or not any(swa):
            window, swa = 0, ()
        qpas = float(cfg.get("query_pre_attn_scalar") or head_dim)
        return cls(
            arch="gemma3", vocab_size=req("vocab_size"), hidden_size=hidden, intermediate_size=req("intermediate_size"),
            num_layers=layers, num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps") or 1e-6, rope_theta=theta, rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings") or 131072,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            attention_bias=bool(cfg.get("attention_bias", False)), rope_interleaved=False, **_hf_special_ids(cfg),
            qk_norm=True, post_norms=True, ffn_act="gelu_tanh", embed_scale=math.sqrt(hidden),
            attn_scale=qpas ** -0.5, final_logit_softcap=float(cfg.get("final_logit_softcapping") or 0.0),
            sliding_window=window, swa_layers=swa, rope_theta_swa=theta_swa)

    @classmethod
    def from_gguf_metadata(cls, md: dict) -> "ModelConfig":
        """From GGUF key/value metadata (plain Python values). llama.cpp's convert script permutes Q/K rows
        of llama-arch models for interleaved rotation, but not qwen2's (NeoX rotation)."""
        def req(k):
            if k not in md:
                raise ModelFormatError(f"GGUF metadata is missing required key {k!r}")
            return md[k]

        name = req("general.architecture")
        arch = _arch(name)
        p = f"{name}."  # keys are prefixed with the file's own arch string, e.g. "mistral.block_count"
        hidden, heads = int(req(p + "embedding_length")), int(req(p + "attention.head_count"))
        head_dim = int(md.get(p + "attention.key_length", hidden // heads))
        if int(md.get(p + "attention.value_length", head_dim)) != head_dim:
            raise ModelFormatError("GGUF: attention.key_length != attention.value_length is not supported")
        rot = int(md.get(p + "rope.dimension_count", head_dim))  # < head_dim: partial RoPE (Phi-4-mini's 96 of 128)
        if rot != head_dim and arch != "phi3":  # llama.cpp asserts n_rot == head_dim in the other graphs
            raise ModelFormatError(f"GGUF: partial rotary (rope.dimension_count {rot} != head_dim {head_dim}) "
                                   f"is not supported for {arch} (only phi3)")
        if p + "vocab_size" in md:
            vocab = md[p + "vocab_size"]
        elif "tokenizer.ggml.tokens" in md:
            vocab = len(md["tokenizer.ggml.tokens"])
        else:
            raise ModelFormatError(f"GGUF metadata is missing required key {p + 'vocab_size'!r} "
                                   "(and has no tokenizer.ggml.tokens)")
        kind = md.get(p + "rope.scaling.type", "none")
        rope_scaling = None
        if kind == "linear":
            rope_scaling = {"rope_type": "linear", "factor": float(req(p + "rope.scaling.factor"))}
        elif kind not in ("none", ""):
            raise ModelFormatError(f"GGUF: unsupported rope scaling type {kind!r}")
        head_kv = md.get(p + "attention.head_count_kv", heads)
        if isinstance(head_kv, list):  # per-layer list (some newer archs); we need it uniform
            if len(set(head_kv)) != 1:
                raise ModelFormatError("GGUF: per-layer head_count_kv is not supported")
            head_kv = head_kv[0]
        eos = md.get("tokenizer.ggml.eos_token_id")
        extra = {}
        if arch == "qwen3":
            extra = dict(qk_norm=True)
        elif arch == "smollm3":  # llama.cpp: LLM_ARCH_SMOLLM3, n_no_rope_layer_step = 4 whatever the file says
            extra = dict(nope_layers=nope_step_layers(int(req(p + "block_count")), SMOLLM3_NOPE_STEP))
        elif arch == "phi3":
            # llama.cpp (src/models/phi3.cpp): NEOX RoPE, cos/sin x rope.scaling.attn_factor; LongRoPE factors come
            # from rope_factors_short/long tensors (the loader adds them). attention.sliding_window is read and
            # then switched off by llama.cpp ("Phi SWA is currently disabled"): every layer attends fully here too.
            extra = dict(rope_mscale=float(md.get(p + "rope.scaling.attn_factor", 1.0) or 1.0))
        elif arch == "gemma3":
            # llama.cpp's reading (src/models/gemma3.cpp): sliding window from attention.sliding_window, layer
            # pattern from attention.sliding_window_pattern (a period or one bool per layer; default 6), local
            # RoPE base rope.freq_base_swa (default 10000), attention scale 1/sqrt(head_dim) except for the
            # 62-layer 27B (1/sqrt(hidden/heads), its query_pre_attn_scalar: GGUF does not store that key).
            layers = int(req(p + "block_count"))
            window = int(md.get(p + "attention.sliding_window", 0) or 0)
            pat = md.get(p + "attention.sliding_window_pattern", GEMMA3_SWA_PATTERN)
            if isinstance(pat, list):
                if len(pat) != layers:
                    raise ModelFormatError(f"GGUF: {p}attention.sliding_window_pattern has {len(pat)} entries for "
                                           f"{layers} layers")
                swa = tuple(bool(b) for b in pat)
            else:
                swa = swa_pattern_layers(layers, int(pat))
            if not window or not any(swa):
                window, swa = 0, ()
            extra = dict(qk_norm=True, post_norms=True, ffn_act="gelu_tanh", embed_scale=math.sqrt(hidden),
                         attn_scale=(hidden / heads if layers == 62 else head_dim) ** -0.5,
                         final_logit_softcap=float(md.get(p + "final_logit_softcapping", 0.0) or 0.0),
                         sliding_window=window, swa_layers=swa,
                         rope_theta_swa=float(md.get(p + "rope.freq_base_swa", 10000.0)))
        return cls(
            arch=arch, vocab_size=vocab, hidden_size=hidden, intermediate_size=req(p + "feed_forward_length"),
            num_layers=req(p + "block_count"), num_heads=heads, num_kv_heads=head_kv, head_dim=head_dim,
            rms_norm_eps=req(p + "attention.layer_norm_rms_epsilon"),
            rope_theta=md.get(p + "rope.freq_base", 10000.0), rope_scaling=rope_scaling,
            max_position_embeddings=req(p + "context_length"),
            tie_word_embeddings=False,  # decided by the loader: no output.weight => tied
            attention_bias=arch == "qwen2",
            rope_interleaved=arch in ("llama", "smollm3"),  # both converted by llama.cpp's LlamaModel (Q/K permuted)
            bos_token_id=md.get("tokenizer.ggml.bos_token_id"), eos_token_id=eos, rope_dim=rot, **extra,
        )
