"""WeightTensor (GGML dtype id + raw numpy data), ModelWeights, and the shape checks both loaders share."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import numpy as np

from tinyvllm.model.config import ModelConfig
from tinyvllm.model.errors import ModelFormatError


# GGML's dtype ids of the formats we run (native/src/formats.h defines their blocks) and, for the quantized
# ones, (values per block, bytes per block); blocks run along a row (the in_features axis). BF16 only exists
# on disk: it is converted to F32 at load. Written out rather than read from the `gguf` package, whose import
# (~60 ms) every load would pay; tests/test_gguf_parse.py checks them against it.
_GGML_FORMATS = {"F32": (0, None), "F16": (1, None), "Q4_0": (2, (32, 18)), "Q4_1": (3, (32, 20)),
                 "Q5_0": (6, (32, 22)), "Q5_1": (7, (32, 24)), "Q8_0": (8, (32, 34)), "Q2_K": (10, (256, 84)),
                 "Q3_K": (11, (256, 110)), "Q4_K": (12, (256, 144)), "Q5_K": (13, (256, 176)),
                 "Q6_K": (14, (256, 210)), "IQ4_NL": (20, (32, 18)), "BF16": (30, None)}
GGMLType = IntEnum("GGMLType", {n: i for n, (i, _) in _GGML_FORMATS.items()})


F32, F16, Q4_0, Q4_1, Q8_0, BF16 = (int(GGMLType[n]) for n in ("F32", "F16", "Q4_0", "Q4_1", "Q8_0", "BF16"))
QUANT_BLOCKS = {i: block for i, block in _GGML_FORMATS.values() if block is not None}
FLOAT_DTYPES = {F32: np.dtype(np.float32), F16: np.dtype(np.float16)}


def row_bytes_for(dtype: int, cols: int) -> int:
    if dtype in QUANT_BLOCKS:
        bs, bb = QUANT_BLOCKS[dtype]
        if cols % bs:
            raise ModelFormatError(f"{GGMLType(dtype).name} row length {cols} is not a multiple of {bs}")
        return cols // bs * bb
    if dtype not in FLOAT_DTYPES:
        raise ModelFormatError(f"unsupported tensor dtype id {dtype}")
    return cols * FLOAT_DTYPES[dtype].itemsize


@dataclass
class WeightTensor:
    """One weight. `data` is C-contiguous: float32/float16 of `shape` for F32/F16, or for quantized types
    uint8 of shape[:-1] + (row_bytes,) holding the GGML blocks unchanged (a view of the mmapped file)."""
    name: str
    dtype: int
    shape: tuple
    data: np.ndarray

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        want = self.shape[:-1] + (row_bytes_for(self.dtype, self.shape[-1]),)
        if self.dtype in QUANT_BLOCKS:
            ok = self.data.dtype == np.uint8 and self.data.shape == want
        else:
            ok = self.data.dtype == FLOAT_DTYPES.get(self.dtype) and self.data.shape == self.shape
        if not ok or not self.data.flags.c_contiguous:
            raise ModelFormatError(f"tensor {self.name}: data {self.data.dtype}{list(self.data.shape)} does not "
                                   f"match {GGMLType(self.dtype).name}{list(self.shape)}")

    @property
    def row_bytes(self) -> int:
        return row_bytes_for(self.dtype, self.shape[-1])

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def dequantize(self) -> np.ndarray:
        """float32 array of `shape` (a fresh array)."""
        if self.dtype not in QUANT_BLOCKS:
            return self.data.astype(np.float32)  # astype copies, so callers may mutate the result
        # the gguf package's own decoder: independent of our native kernels, which are tested against it
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize
        return dequantize(self.data, GGMLQuantizationType(self.dtype)).astype(np.float32, copy=False).reshape(self.shape)

    def __repr__(self):
        return f"WeightTensor({self.name!r}, {GGMLType(self.dtype).name}, {self.shape})"


@dataclass
class ModelWeights:
    config: ModelConfig
    tensors: dict[str, WeightTensor]
    metadata: dict = field(default_factory=dict)  # GGUF key/values as plain Python values; {} for HF
    source: str = ""   # human-readable model name (GGUF general.name, HF dir name)
    kind: str = "gguf"  # "gguf" | "hf"
    path: Path | None = None

    def __getitem__(self, name: str) -> WeightTensor:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    @property
    def lm_head(self) -> WeightTensor:
        """The output projection: output.weight, or the embedding when the embeddings are tied."""
        t = self.tensors.get("output.weight")
        return t if t is not None else self.tensors["token_embd.weight"]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def expected_shapes(cfg: ModelConfig) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(required, optional) tensor name -> (rows, cols) for a llama/qwen2/qwen3/gemma3 decoder."""
    h, ff, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    req = {"token_embd.weight": (cfg.vocab_size, h), "output_norm.weight": (h,)}
    opt = {f"{n}.weight": (cfg.rope_dim // 2,) for n in ("rope_freqs", "rope_factors_short", "rope_factors_long")}
    (opt if cfg.tie_word_embeddings else req)["output.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        b = f"blk.{i}."
        req.update({b + "attn_norm.weight": (h,), b + "attn_q.weight": (q, h), b + "attn_k.weight": (kv, h),
                    b + "attn_v.weight": (kv, h), b + "attn_output.weight": (h, q), b + "ffn_norm.weight": (h,),
                    b + "ffn_gate.weight": (ff, h), b + "ffn_up.weight": (ff, h), b + "ffn_down.weight": (h, ff)})
        if cfg.attention_bias:
            req.update({b + "attn_q.bias": (q,), b + "attn_k.bias": (kv,), b + "attn_v.bias": (kv,)})
        if cfg.qk_norm:
            req.update({b + "attn_q_norm.weight": (cfg.head_dim,), b + "attn_k_norm.weight": (cfg.head_dim,)})
        if cfg.post_norms:
            req.update({b + "post_attention_norm.weight": (h,), b + "post_ffw_norm.weight": (h,)})
    return req, opt


_BLOCK_RE = re.compile(r"blk\.\d+\.")


def split_fused(cfg: ModelConfig, tensors: dict[str, WeightTensor]) -> dict[str, WeightTensor]:
    """Phi-3's fused blk.N.attn_qkv ([q; k; v] rows) and ffn_up ([gate; up] rows) as the separate tensors
    the forward takes. Rows are split, not values: a quantized row's blocks run along it, so each part is
    a view of the same bytes (no dequantizing, no copy)."""
    def split(name, parts):
        t, start = tensors.pop(name), 0
        if t.shape[0] != sum(n for _, n in parts):
            raise ModelFormatError(f"tensor {name!r} has {t.shape[0]} rows, expected {sum(n for _, n in parts)}")
        for part, n in parts:
            tensors[part] = WeightTensor(part, t.dtype, (n,) + t.shape[1:], t.data[start:start + n])
            start += n
    tensors = dict(tensors)
    # the layers the file names, not range(num_layers): a damaged header may claim 2^40 layers
    layers = {n.split(".")[1] for n in tensors if _BLOCK_RE.match(n)}
    for i in sorted(int(d) for d in layers if len(d) < 10 and int(d) < cfg.num_layers):
        b = f"blk.{i}."
        if b + "attn_qkv.weight" in tensors:
            split(b + "attn_qkv.weight", [(b + "attn_q.weight", cfg.q_size), (b + "attn_k.weight", cfg.kv_size),
                                          (b + "attn_v.weight", cfg.kv_size)])
        if b + "ffn_gate.weight" not in tensors and b + "ffn_up.weight" in tensors and cfg.arch == "phi3":
            split(b + "ffn_up.weight", [(b + "ffn_gate.weight", cfg.intermediate_size),
                                        (b + "ffn_up.weight", cfg.intermediate_size)])
    return tensors


def validate_weights(cfg: ModelConfig, tensors: dict[str, WeightTensor], where: str = "model") -> dict[str, WeightTensor]:
    """Every expected tensor exists with its expected shape; no per-layer tensor we would silently ignore
    (an o_proj bias, an mlp bias, a q/k norm, a layer past num_layers: all change the math).
    Returns the tensors the forward pass reads: the others (rope_freqs, which the config holds, and
    unknown global tensors) never reach a runner."""
    if cfg.num_layers > len(tensors):  # checked before listing the expected names: 2^40 layers would never end
        raise ModelFormatError(f"{where}: the config claims {cfg.num_layers} layers but the model has only "
                               f"{len(tensors)} tensors")
    req, opt = expected_shapes(cfg)
    for name, shape in req.items():
        if name not in tensors:
            raise ModelFormatError(f"{where}: missing tensor {name!r}")
    for name, t in tensors.items():
        shape = req.get(name) or opt.get(name)
        if shape is None:
            if _BLOCK_RE.match(name):
                raise ModelFormatError(f"{where}: unexpected tensor {name!r} (not supported for arch {cfg.arch} "
                                       f"with {cfg.num_layers} layers)")
            continue  # unknown global tensors are harmless
        if t.shape != shape:
            raise ModelFormatError(f"{where}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
        if len(shape) == 1 and t.dtype != GGMLType.F32:  # loaders widen F16/BF16 ones; runners take only F32
            raise ModelFormatError(f"{where}: tensor {name!r} (a norm or bias) is stored as "
                                   f"{GGMLType(t.dtype).name}; norms and "
                                   "biases must be F32, F16 or BF16")
    return {name: t for name, t in tensors.items() if name in req or name == "output.weight"}
