"""GGUF file -> ModelWeights. Parsing is gguf_parse (memory-mapped, metadata arrays in bulk); everything it
returns is checked here so a bad file gives a ModelFormatError naming the file and the problem, never a crash
or silent garbage. Tensors stay views of the mapping."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from tinyvllm.model.config import ModelConfig
from tinyvllm.model.errors import ModelFormatError
from tinyvllm.model.gguf_parse import TensorInfo, parse_gguf
from tinyvllm.model.weights import (BF16, F16, F32, FLOAT_DTYPES, QUANT_BLOCKS, GGMLType, ModelWeights,
                                    WeightTensor, row_bytes_for, split_fused, validate_weights)

_SUPPORTED = {int(t) for t in GGMLType}


def _type_name(t: int) -> str:
    from gguf import GGMLQuantizationType  # only on this error path: the package takes ~60 ms to import
    try:
        return GGMLQuantizationType(t).name
    except ValueError:
        return f"unknown type id {t}"


def _check_tensor(t: TensorInfo, data_offset: int, alignment: int, size: int) -> tuple[tuple[int, ...], int, int]:
    """(shape in row-major order, first byte, byte count) of a tensor that fits in the file."""
    shape = tuple(reversed(t.dims))  # GGUF stores ne[] as [cols, rows, ...]
    if not 1 <= len(shape) <= 4 or min(shape) <= 0:
        raise ModelFormatError(f"tensor {t.name!r} has invalid dims {shape}")
    if t.ggml_type not in _SUPPORTED:
        raise ModelFormatError(f"tensor {t.name!r} has unsupported type {_type_name(t.ggml_type)} "
                               f"(supported: {', '.join(x.name for x in GGMLType)})")
    if t.offset % alignment:
        raise ModelFormatError(f"tensor {t.name!r} data offset {t.offset} is not {alignment}-byte aligned")
    cols, rows = shape[-1], 1
    for d in shape[:-1]:
        rows *= d
    nbytes = rows * (cols * 2 if t.ggml_type == BF16 else row_bytes_for(t.ggml_type, cols))
    begin = data_offset + t.offset
    if begin + nbytes > size:
        raise ModelFormatError(f"tensor {t.name!r} data [{begin}, {begin + nbytes}) extends past the end "
                               f"of the file ({size} bytes): truncated or corrupt")
    return shape, begin, nbytes


def _to_weight(t: TensorInfo, shape, file_bytes: np.ndarray, begin: int, nbytes: int) -> WeightTensor:
    ttype = t.ggml_type
    data = file_bytes[begin:begin + nbytes]  # a view of the mapping
    if ttype == BF16:  # bf16 is the top half of an f32: widen by shifting (copies; F32 is what we keep)
        data = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
        ttype = F32
    elif ttype in QUANT_BLOCKS:
        data = data.reshape(shape[:-1] + (row_bytes_for(ttype, shape[-1]),))
    else:
        data = data.view(FLOAT_DTYPES[ttype]).reshape(shape)
        if ttype == F16 and len(shape) == 1:  # norms / biases: always hand the runner F32
            data, ttype = data.astype(np.float32), F32
    return WeightTensor(t.name, ttype, shape, np.ascontiguousarray(data))


def load_gguf(path) -> ModelWeights:
    path = Path(path)
    try:
        return _load(path)
    except ModelFormatError as e:
        raise ModelFormatError(f"{path}: {e}") from None


def _load(path: Path) -> ModelWeights:
    contents = parse_gguf(path)  # checks the header and every count against the file size first
    size = len(contents.buffer)
    md = {k: v for k, v in contents.metadata.items() if not k.startswith("GGUF.")}
    file_bytes = np.ndarray((len(contents.buffer),), np.uint8, buffer=contents.buffer)  # read-only, base: the mmap
    tensors = {}
    for t in contents.tensors:
        shape, begin, nbytes = _check_tensor(t, contents.data_offset, contents.alignment, size)
        tensors[t.name] = _to_weight(t, shape, file_bytes, begin, nbytes)

    try:
        cfg = ModelConfig.from_gguf_metadata(md)
    except ModelFormatError:
        raise
    except (TypeError, ValueError, ArithmeticError, AttributeError, KeyError, IndexError) as e:
        # a value of the wrong type or range (a string block_count, zero heads, a NaN...)
        raise ModelFormatError(f"bad GGUF metadata value ({type(e).__name__}: {e})") from None
    # What the file holds decides these: no output.weight means the embedding is reused (tied); llama-arch
    # models converted from checkpoints with q/k/v biases keep them as blk.N.attn_q.bias.
    cfg = dataclasses.replace(cfg, tie_word_embeddings="output.weight" not in tensors,
                              attention_bias=cfg.attention_bias or "blk.0.attn_q.bias" in tensors)
    tensors = split_fused(cfg, tensors)
    forward_tensors = validate_weights(cfg, tensors, where="GGUF")
    if "rope_freqs.weight" in tensors:  # llama.cpp's form of Llama-3 rope scaling: per-frequency divisors
        cfg.rope_scaling = {"rope_type": "freq_factors",
                            "factors": tensors["rope_freqs.weight"].dequantize().tolist()}
    elif {"rope_factors_short.weight", "rope_factors_long.weight"} & tensors.keys():  # Phi-3 LongRoPE (one set: both)
        short, long = (tensors.get(f"rope_factors_{k}.weight") for k in ("short", "long"))
        cfg.rope_scaling = {"rope_type": "longrope", "short_factor": (short or long).dequantize().tolist(),
                            "long_factor": (long or short).dequantize().tolist(), "original_max_position_embeddings":
                            int(md.get(f"{md['general.architecture']}.rope.scaling.original_context_length",
                                       cfg.max_position_embeddings))}
    tensors = forward_tensors
    return ModelWeights(config=cfg, tensors=tensors, metadata=md, source=str(md.get("general.name") or path.stem),
                        kind="gguf", path=path)
