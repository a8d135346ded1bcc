"""GGUF file -> ModelWeights. Parsing is gguf's GGUFReader (memory-mapped); everything it returns is checked
here so a bad file gives a ModelFormatError naming the file and the problem, never a crash or silent garbage."""
from __future__ import annotations

import dataclasses
import gc
import os
import struct
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGMLQuantizationType

from tinyvllm.model.config import ModelConfig
from tinyvllm.model.errors import ModelFormatError
from tinyvllm.model.weights import (BF16, F16, F32, FLOAT_DTYPES, QUANT_BLOCKS, GGMLType, ModelWeights,
                                    WeightTensor, row_bytes_for, validate_weights)

GGUF_MAGIC = b"GGUF"
_HEADER_BYTES = 24  # magic, version, tensor count, kv count
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, the smallest value (a u8 or bool)
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, data offset
_SUPPORTED = {int(t) for t in GGMLType}
# Below this size the reader's garbage is too small to matter, and a full collection (tens of ms in a
# process with a big heap) would dominate loading.
_COLLECT_ABOVE = 16 << 20


def _type_name(t: int) -> str:
    try:
        return GGMLQuantizationType(t).name
    except ValueError:
        return f"unknown type id {t}"


class _Truncated(Exception):
    pass


class _CheckedReader(GGUFReader):
    """GGUFReader with two hooks: every read is bounds-checked (a truncated header would otherwise yield
    short arrays, or loop over garbage counts), and tensor infos are validated before it builds views."""

    # GGUFReader does ~250k tiny slices of its np.memmap; np.memmap's per-slice Python overhead makes that
    # 3x slower than slicing a plain ndarray view of the same mapping (still zero-copy, mmap kept alive).
    @property
    def data(self):
        return self._buf

    @data.setter
    def data(self, value):
        self._buf = value.view(np.ndarray)

    def _get(self, offset, dtype, count=1, override_order=None):
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if end > len(self.data):
            raise _Truncated(f"file is truncated or corrupt: reading {end - int(offset)} bytes at offset "
                             f"{int(offset)} goes past the end of the file ({len(self.data)} bytes)")
        return super()._get(offset, dtype, count, override_order)

    # GGUFReader makes one numpy object per array element: ~700 bytes per token of a vocabulary (strings,
    # scores, types), which for Gemma 3's 262,144 tokens peaked at ~190 MB during load (the memory budget
    # pays for peaks). Numeric arrays are read here as one slice, string arrays as one packed blob.
    def _get_field_parts(self, orig_offs, raw_type):
        if raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        offs, n, itype = orig_offs + 12, int(alen[0]), int(raw_itype[0])
        head = [raw_itype, alen]
        if itype == GGUFValueType.STRING:
            buf = memoryview(self.data)
            lengths, starts = [], []
            for _ in range(n):
                if offs + 8 > len(buf):
                    raise _Truncated(f"file is truncated or corrupt: a string array runs past the end of the file")
                k = int.from_bytes(buf[offs:offs + 8], "little")
                starts.append(offs + 8)
                lengths.append(k)
                offs += 8 + k
            if offs > len(buf):
                raise _Truncated("file is truncated or corrupt: a string array runs past the end of the file")
            blob = b"".join(buf[i:i + k] for i, k in zip(starts, lengths))
            return offs - orig_offs, head + [_PackedStrings(blob, lengths)], [2], [GGUFValueType.ARRAY,
                                                                                  GGUFValueType.STRING]
        nptype = self.gguf_scalar_to_np.get(GGUFValueType(itype)) if itype in GGUFValueType._value2member_map_ else None
        if nptype is None or n == 0:  # nested arrays, empty arrays: GGUFReader's own way
            return super()._get_field_parts(orig_offs, raw_type)
        arr = self._get(offs, nptype, n)
        return 12 + int(arr.nbytes), head + [arr], [2], [GGUFValueType.ARRAY, GGUFValueType(itype)]

    def _build_tensors(self, start_offs, fields):
        size = len(self.data)
        for f in fields:
            _, name_data, n_dims, dims, raw_type, rel_off = f.parts
            name = bytes(name_data).decode("utf-8", "replace")
            ttype, shape, rel = int(raw_type[0]), tuple(int(d) for d in reversed(dims.tolist())), int(rel_off[0])
            if not 1 <= int(n_dims[0]) <= 4 or min(shape) <= 0:
                raise ModelFormatError(f"tensor {name!r} has invalid dims {shape}")
            if ttype not in _SUPPORTED:
                raise ModelFormatError(f"tensor {name!r} has unsupported type {_type_name(ttype)} "
                                       f"(supported: {', '.join(t.name for t in GGMLType)})")
            if rel % self.alignment:
                raise ModelFormatError(f"tensor {name!r} data offset {rel} is not {self.alignment}-byte aligned")
            cols = shape[-1]
            nbytes = int(np.prod(shape[:-1], dtype=object) if len(shape) > 1 else 1) * (
                cols * 2 if ttype == BF16 else row_bytes_for(ttype, cols))
            begin = int(start_offs) + rel
            if begin + nbytes > size:
                raise ModelFormatError(f"tensor {name!r} data [{begin}, {begin + nbytes}) extends past the end "
                                       f"of the file ({size} bytes): truncated or corrupt")
        super()._build_tensors(start_offs, fields)


def _field_value(f):
    """A ReaderField -> plain Python (str / int / float / bool / list)."""
    t0 = f.types[0] if f.types else None
    if t0 == GGUFValueType.STRING:
        return bytes(f.parts[-1]).decode("utf-8", "surrogateescape")
    if t0 == GGUFValueType.ARRAY:
        if isinstance(f.parts[-1], _PackedStrings):  # read packed by _CheckedReader
            return f.parts[-1]
        if len(f.types) == 1:  # empty array: GGUFReader records no element type
            return []
        if len(f.types) > 2:  # nested arrays: rare, GGUFReader flattens them anyway
            return f.contents()
        if f.types[1] == GGUFValueType.STRING:  # decoded by _strings() once the reader is gone
            return _PackedStrings(b"".join(bytes(f.parts[i]) for i in f.data), [len(f.parts[i]) for i in f.data])
        # each element is its own 1-element array: one concatenate is much faster than per-item tolist()
        return np.concatenate([f.parts[i] for i in f.data]).tolist()
    return f.parts[-1].tolist()[0]


class _PackedStrings:
    """A string array kept as one bytes blob while the reader is alive. GGUFReader makes ~250k tiny
    objects; 100k token/merge strings made among them would pin their allocator arenas after the
    reader is freed (~30 MB resident). Decoded after it is gone, they pack into fresh arenas."""

    def __init__(self, blob: bytes, lengths: list[int]):
        self.blob, self.ends = blob, np.cumsum(np.asarray(lengths, dtype=np.int64)).tolist()

    def strings(self) -> list[str]:
        # surrogateescape keeps invalid UTF-8 byte tokens lossless: encode back with the same handler
        b, starts = self.blob, [0] + self.ends[:-1]
        return [b[i:j].decode("utf-8", "surrogateescape") for i, j in zip(starts, self.ends)]


def _to_weight(t) -> WeightTensor:
    ttype = int(t.tensor_type)
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF stores ne[] as [cols, rows, ...]
    data = t.data
    if ttype == BF16:  # bf16 is the top half of an f32: widen by shifting (copies; F32 is what we keep)
        data = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        ttype = F32
    if ttype in QUANT_BLOCKS:
        data = data.reshape(shape[:-1] + (row_bytes_for(ttype, shape[-1]),))  # a view of the mmap
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
    size = os.path.getsize(path)
    if size < _HEADER_BYTES:
        raise ModelFormatError(f"file too small to be GGUF ({size} bytes)")
    with open(path, "rb") as fh:
        header = fh.read(_HEADER_BYTES)
    magic = header[:4]
    if magic != GGUF_MAGIC:
        raise ModelFormatError(f"bad magic {magic!r}: not a GGUF file (expected {GGUF_MAGIC!r})")
    # Counts are checked against the file size before anything is parsed: a 1 KB file claiming 2^40
    # tensors fails here, at once, instead of after the reader has looped over (or allocated for) them.
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", header, 4)
    if version and not version & 0xFFFF:  # how GGUFReader tells a big-endian file: its version reads swapped
        raise ModelFormatError("big-endian GGUF files are not supported")
    need = _HEADER_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES + n_kv * _MIN_KV_BYTES
    if need > size:
        raise ModelFormatError(f"header claims {n_tensors} tensors and {n_kv} metadata entries, which need at "
                               f"least {need} bytes; the file has {size}: truncated or corrupt")
    try:
        reader = _CheckedReader(path, "r")
    except ModelFormatError:
        raise
    except _Truncated as e:
        raise ModelFormatError(str(e)) from None
    except Exception as e:  # GGUFReader raises ValueError/KeyError/IndexError/... on corrupt headers
        raise ModelFormatError(f"cannot parse GGUF header ({type(e).__name__}: {e})") from None
    if reader.byte_order != "I":
        raise ModelFormatError("big-endian GGUF files are not supported")

    try:
        md = {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    except Exception as e:
        raise ModelFormatError(f"cannot decode GGUF metadata ({type(e).__name__}: {e})") from None
    tensors = {t.name: _to_weight(t) for t in reader.tensors}
    del reader
    if size > _COLLECT_ABOVE:
        gc.collect()  # the reader's objects hold reference cycles: free them before the strings are made
    md = {k: v.strings() if isinstance(v, _PackedStrings) else v for k, v in md.items()}

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
    forward_tensors = validate_weights(cfg, tensors, where="GGUF")
    if "rope_freqs.weight" in tensors:  # llama.cpp's form of Llama-3 rope scaling: per-frequency divisors
        cfg.rope_scaling = {"rope_type": "freq_factors",
                            "factors": tensors["rope_freqs.weight"].dequantize().tolist()}
    tensors = forward_tensors
    return ModelWeights(config=cfg, tensors=tensors, metadata=md, source=str(md.get("general.name") or path.stem),
                        kind="gguf", path=path)
