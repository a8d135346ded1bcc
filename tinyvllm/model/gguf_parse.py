"""GGUF container parsing in bulk: the metadata and tensor directory of a memory-mapped file, without an
object per array element (the `gguf` package's reader makes a numpy array for each: seconds for a 262K
vocabulary). Numeric arrays are one np.frombuffer, string arrays one pass that reads each length and
decodes its slice. Values come out as plain Python, as `gguf.ReaderField.contents()` gives them (tests compare the two),
except that strings that are not UTF-8 decode with "surrogateescape" (byte tokens stay lossless).
Every read is bounds-checked: a corrupt or truncated file raises ModelFormatError, never reads past
the mapping, and never allocates for a count the file cannot hold.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinyvllm.model.errors import ModelFormatError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALAR = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f",
           BOOL: "<B", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}
_SCALAR_STRUCT = {t: struct.Struct(f) for t, f in _SCALAR.items()}
_NUMPY = {UINT8: "<u1", INT8: "<i1", UINT16: "<u2", INT16: "<i2", UINT32: "<u4", INT32: "<i4", FLOAT32: "<f4",
          BOOL: "<u1", UINT64: "<u8", INT64: "<i8", FLOAT64: "<f8"}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    dims: tuple[int, ...]  # GGUF order: ne[0] (the row length) first
    offset: int  # from the start of the data section


@dataclass
class GGUFContents:
    version: int
    metadata: dict  # key -> str | int | float | bool | list
    tensors: list[TensorInfo]
    alignment: int
    data_offset: int  # where the data section starts in the file
    buffer: mmap.mmap  # the whole file, read-only; tensor views keep it alive


class _Cursor:
    """Little-endian reads from the mapping, each checked against its end."""

    def __init__(self, buf, pos: int = 0):
        self.buf, self.pos, self.size = buf, pos, len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ModelFormatError(f"file is truncated or corrupt: {what} of {n} bytes at offset {self.pos} goes "
                                   f"past the end of the file ({self.size} bytes)")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def raw_string(self, what: str) -> bytes:
        n = self.u64(what)
        self.need(n, what)
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def name(self, what: str) -> str:
        b = self.raw_string(what)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFormatError(f"{what} {b[:64]!r} is not valid UTF-8") from None

    def value(self, vtype: int, what: str):
        st = _SCALAR_STRUCT.get(vtype)
        if st is not None:
            self.need(st.size, what)
            (v,) = st.unpack_from(self.buf, self.pos)
            self.pos += st.size
            return v != 0 if vtype == BOOL else v
        if vtype == STRING:
            return self.raw_string(what).decode("utf-8", "surrogateescape")
        if vtype == ARRAY:
            return self.array(what)
        raise ModelFormatError(f"{what} has unknown value type {vtype}")

    def array(self, what: str) -> list:
        itype, n = self.u32(what), self.u64(what)
        if itype == STRING:
            return self.strings(n, what)
        dt = _NUMPY.get(itype)
        if dt is not None:
            size = np.dtype(dt).itemsize
            self.need(n * size, what)
            a = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos)
            self.pos += n * size
            return (a != 0).tolist() if itype == BOOL else a.tolist()
        if itype == ARRAY:  # nested arrays come out flattened, as gguf's contents() gives them
            self.need(n * 12, what)  # each inner array has at least its type and count
            return [x for _ in range(n) for x in self.array(what)]
        raise ModelFormatError(f"{what} is an array of unknown value type {itype}")

    def strings(self, n: int, what: str) -> list[str]:
        self.need(n * 8, what)  # each string has at least its length: no list for a count the file lacks
        buf, pos, end, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        out: list[str] = []
        append = out.append
        for _ in range(n):  # one pass: read a length, decode that slice
            if pos + 8 > end:
                self.pos = pos
                self.need(8, what)
            (m,) = unpack(buf, pos)
            pos += 8
            append(buf[pos:pos + m].decode("utf-8", "surrogateescape"))
            pos += m
        if pos > end:  # the last string runs past the end of the file (its slice came out short)
            self.need(pos - self.pos, what)
        self.pos = pos
        return out


def parse_gguf(path) -> GGUFContents:
    """Parse the header, metadata and tensor directory of a GGUF file (tensor data is not read)."""
    with open(Path(path), "rb") as fh:
        try:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise ModelFormatError("file too small to be GGUF (0 bytes)") from None
    c = _Cursor(buf)
    c.need(24, "the header")
    if buf[:4] != GGUF_MAGIC:
        raise ModelFormatError(f"bad magic {bytes(buf[:4])!r}: not a GGUF file (expected {GGUF_MAGIC!r})")
    c.pos = 4
    version = c.u32("version")
    if version and not version & 0xFFFF:
        raise ModelFormatError("big-endian GGUF files are not supported")
    if version not in SUPPORTED_VERSIONS:
        raise ModelFormatError(f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors, n_kv = c.u64("tensor count"), c.u64("metadata count")
    # at least: a key length, a type and a 1-byte value per entry; name length, n_dims, a dim, type, offset per tensor
    need = 24 + n_kv * 13 + n_tensors * 32
    if need > len(buf):
        raise ModelFormatError(f"header claims {n_tensors} tensors and {n_kv} metadata entries, which need at "
                               f"least {need} bytes; the file has {len(buf)}: truncated or corrupt")
    metadata: dict = {}
    for _ in range(n_kv):
        key = c.name("metadata key")
        vtype = c.u32(f"the type of {key!r}")
        if key in metadata:
            raise ModelFormatError(f"duplicate metadata key {key!r}")
        metadata[key] = c.value(vtype, f"metadata {key!r}")
        if key == "general.alignment" and vtype != UINT32:
            raise ModelFormatError("general.alignment is not a uint32")
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if alignment == 0 or alignment & (alignment - 1):
        raise ModelFormatError(f"general.alignment {alignment} is not a power of two")
    c.need(n_tensors * 32, "the tensor directory")  # name length, n_dims, one dim, type, offset
    tensors, names = [], set()
    for _ in range(n_tensors):
        name = c.name("tensor name")
        n_dims = c.u32(f"tensor {name!r}")  # the loader checks the range (ggml allows 1 to 4)
        c.need(8 * n_dims + 12, f"tensor {name!r}")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, c.pos)
        c.pos += 8 * n_dims
        ggml_type, offset = c.u32(f"tensor {name!r}"), c.u64(f"tensor {name!r}")
        if name in names:
            raise ModelFormatError(f"duplicate tensor {name!r}")
        names.add(name)
        tensors.append(TensorInfo(name, ggml_type, dims, offset))
    data_offset = -(-c.pos // alignment) * alignment
    return GGUFContents(version, metadata, tensors, alignment, data_offset, buf)
