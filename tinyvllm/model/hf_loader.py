"""Hugging Face checkpoint dir (config.json + *.safetensors, optionally sharded) -> ModelWeights with GGUF
tensor names. Weights keep HF's half-split RoPE layout (config.rope_interleaved=False)."""
from __future__ import annotations

import dataclasses
import json
import re
import struct
from pathlib import Path

import numpy as np
from safetensors import safe_open

from tinyvllm.model.config import ModelConfig
from tinyvllm.model.errors import ModelFormatError
from tinyvllm.model.weights import F16, F32, ModelWeights, WeightTensor, split_fused, validate_weights

_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}
_LAYER_QK_NORM = {"self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}
# Gemma 3 has four norms per block: HF's post_attention_layernorm is the attention output's norm there
# (LLaMA's is the FFN input norm).
_LAYER_GEMMA3 = {**_LAYER, **_LAYER_QK_NORM, "post_attention_layernorm.weight": "post_attention_norm.weight",
                 "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                 "post_feedforward_layernorm.weight": "post_ffw_norm.weight"}
_LAYER_BY_ARCH = {"qwen3": {**_LAYER, **_LAYER_QK_NORM}, "gemma3": _LAYER_GEMMA3,  # phi3: fused, split_fused splits
                  "phi3": {**_LAYER, "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+?)(?:\.(weight|bias))?$")


def hf_to_gguf_name(name: str, arch: str = "llama") -> str | None:
    """HF tensor name -> GGUF name, or None for tensors we ignore (e.g. rotary_emb.inv_freq)."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _LAYER_RE.match(name)
    if not m:
        return None
    i, mod, kind = m.groups()
    layer = _LAYER_BY_ARCH.get(arch, _LAYER)
    if f"{mod}.{kind}" in layer:
        return f"blk.{i}.{layer[f'{mod}.{kind}']}"
    if mod in layer:
        return f"blk.{i}.{layer[mod]}.{kind}"
    if f"{mod}.{kind}" in _LAYER_GEMMA3 or mod.endswith("_norm"):
        return f"blk.{i}.{mod}.{kind}"  # a norm this arch does not have: kept, so validation names it
    return None


def _safetensors_header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, header dict). The format: u64 little-endian length, then JSON."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelFormatError(f"{path}: too small to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        size = path.stat().st_size
        if n > size - 8:  # checked before reading: read(n) would allocate n bytes up front
            raise ModelFormatError(f"{path}: safetensors header claims {n} bytes, the file has {size}: "
                                   "truncated or corrupt")
        blob = f.read(n)
    if len(blob) != n:
        raise ModelFormatError(f"{path}: truncated safetensors header")
    try:
        header = json.loads(blob)
    except (ValueError, RecursionError) as e:
        raise ModelFormatError(f"{path}: bad safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: safetensors header is not a JSON object")
    return 8 + n, header


def _read_shard(path: Path, arch: str = "llama") -> dict[str, np.ndarray]:
    """All tensors of one shard as numpy (F32/F16 as stored, BF16 widened to F32)."""
    data_start, header = _safetensors_header(path)
    out = {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                dtype = header[name]["dtype"]
                if dtype in ("F32", "F16"):
                    out[name] = f.get_tensor(name)
                elif dtype == "BF16":
                    # numpy has no bfloat16, so safetensors' numpy backend refuses it: read the raw bytes at
                    # the header's offsets and widen (bf16 is the top half of an f32).
                    shape = header[name]["shape"]
                    b, e = header[name]["data_offsets"]
                    n = int(np.prod(shape, dtype=np.int64))
                    if e - b != 2 * n:
                        raise ModelFormatError(f"{path}: tensor {name!r} byte range does not match its shape")
                    raw = np.fromfile(path, dtype="<u2", count=n, offset=data_start + b)
                    if raw.size != n:
                        raise ModelFormatError(f"{path}: tensor {name!r} is truncated")
                    out[name] = (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
                elif hf_to_gguf_name(name, arch) is not None:
                    raise ModelFormatError(f"{path}: tensor {name!r} has unsupported dtype {dtype} "
                                           "(supported: F32, F16, BF16)")
    except ModelFormatError:
        raise
    except Exception as e:  # safetensors raises its own SafetensorError on corrupt files
        raise ModelFormatError(f"{path}: cannot read safetensors ({type(e).__name__}: {e})") from None
    return out


def _shard_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ModelFormatError(f"{index}: bad index file ({e})") from None
        files = [d / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise ModelFormatError(f"{index}: shard {f.name} is missing")
        return files
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{d}: no *.safetensors files (need config.json + model.safetensors)")
    return files


def load_hf_dir(path) -> ModelWeights:
    d = Path(path)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ModelFormatError(f"{d}: no config.json (not a Hugging Face model directory)")
    try:
        raw_cfg = json.loads(cfg_path.read_text())
    except (ValueError, RecursionError) as e:
        raise ModelFormatError(f"{cfg_path}: invalid JSON ({e})") from None
    if not isinstance(raw_cfg, dict):
        raise ModelFormatError(f"{cfg_path}: not a JSON object")
    try:
        cfg = ModelConfig.from_hf_dict(raw_cfg)
    except ModelFormatError as e:
        raise ModelFormatError(f"{cfg_path}: {e}") from None
    except (TypeError, ValueError, ArithmeticError, AttributeError, KeyError, IndexError) as e:
        raise ModelFormatError(f"{cfg_path}: bad value ({type(e).__name__}: {e})") from None

    tensors: dict[str, WeightTensor] = {}
    for shard in _shard_files(d):
        for hf_name, arr in _read_shard(shard, cfg.arch).items():
            name = hf_to_gguf_name(hf_name, cfg.arch)
            if name is None:
                continue
            if name in tensors:
                raise ModelFormatError(f"{d}: tensor {hf_name!r} appears in more than one shard")
            if arr.ndim == 1 or arr.dtype != np.float16:  # 1-D (norms, biases) always F32 for the runner
                arr = arr.astype(np.float32, copy=False)
            if cfg.arch == "gemma3" and name.endswith("norm.weight"):
                arr = arr + np.float32(1.0)  # Gemma3RMSNorm scales by (1 + w): store w + 1 as GGUF does
            tensors[name] = WeightTensor(name, F16 if arr.dtype == np.float16 else F32, arr.shape,
                                         np.ascontiguousarray(arr))
    # HF semantics: with tie_word_embeddings the lm_head *is* the embedding (a stored copy is redundant);
    # a checkpoint without lm_head is tied whatever the flag says.
    if cfg.tie_word_embeddings or "output.weight" not in tensors:
        tensors.pop("output.weight", None)
        cfg = dataclasses.replace(cfg, tie_word_embeddings=True)
    tensors = validate_weights(cfg, split_fused(cfg, tensors), where=str(d))
    return ModelWeights(config=cfg, tensors=tensors, metadata={}, source=d.name, kind="hf", path=d)
