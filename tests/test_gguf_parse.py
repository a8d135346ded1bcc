"""The bulk GGUF parser (tinyvllm/model/gguf_parse.py) against the `gguf` package's reader: the same value
for every metadata field and the same tensor directory, on the reference model, on random well-formed
files and on the fuzz strategies' mutated files; and ModelFormatError (never another exception, never a
read past the end) for every malformed case."""
import math
import random
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType
from hypothesis import HealthCheck, Phase, given, settings

import gguf_fuzz as gf
from tinyvllm.model import ModelFormatError
from tinyvllm.model.gguf_parse import parse_gguf

REF = Path.home() / ".cache/tinyvllm/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"


class _BoundedReader(GGUFReader):
    """GGUFReader up to the tensor directory (what gguf_parse covers; tensor data are the loader's), failing
    on a read past the end (it would otherwise slice short arrays and go on)."""

    def _get(self, offset, dtype, count=1, override_order=None):
        if int(offset) + np.dtype(dtype).itemsize * int(count) > len(self.data):
            raise EOFError("read past the end")
        return super()._get(offset, dtype, count, override_order)

    def _build_tensors(self, start_offs, fields):
        self.directory = [(f.name, int(f.parts[4][0]), tuple(int(d) for d in f.parts[3]), int(f.parts[5][0]))
                          for f in fields]
        if len({d[0] for d in self.directory}) < len(self.directory):  # as GGUFReader's own check
            raise ValueError("duplicated tensor name")


def _contents(f):
    """ReaderField.contents(), with strings that are not UTF-8 decoded as gguf_parse does."""
    try:
        return f.contents()
    except UnicodeDecodeError:
        dec = lambda i: bytes(f.parts[i]).decode("utf-8", "surrogateescape")  # noqa: E731
        return dec(len(f.parts) - 1) if f.types[0] == GGUFValueType.STRING else [dec(i) for i in f.data]


def _same(a, b) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def _reader_view(path):
    r = _BoundedReader(path)
    md = {k: _contents(f) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return r, md, r.directory


def _assert_matches_reader(path):
    r, md, tensors = _reader_view(path)
    c = parse_gguf(path)
    assert list(c.metadata) == list(md)
    for k, v in md.items():
        assert _same(c.metadata[k], v), (k, c.metadata[k], v)
    assert [(t.name, t.ggml_type, t.dims, t.offset) for t in c.tensors] == tensors
    assert c.alignment == r.alignment and c.data_offset == r.data_offset
    return c


@pytest.mark.skipif(not REF.exists(), reason="reference model not downloaded")
def test_reference_model_matches_gguf_reader():
    c = _assert_matches_reader(REF)
    assert len(c.metadata["tokenizer.ggml.tokens"]) == 49152 and len(c.metadata["tokenizer.ggml.merges"]) == 48900
    assert len(c.tensors) == 272


# ---- random well-formed files ------------------------------------------------------------------------
_NUMERIC = {gf.U8: (0, 255), gf.I8: (-128, 127), gf.U16: (0, 65535), gf.I16: (-32768, 32767),
            gf.U32: (0, 2**32 - 1), gf.I32: (-2**31, 2**31 - 1), gf.U64: (0, 2**64 - 1), gf.I64: (-2**63, 2**63 - 1)}


def _random_string(rng: random.Random) -> str:
    pools = ["abc xyz", "Ġ▁ĊĉÄ", "日本語テキスト", "\n\t \0", "😀🚀", "ab  c"]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(rng.choice([0, 1, 2, 5, 17])))


def _random_scalar(rng: random.Random, t: int):
    if t in _NUMERIC:
        return rng.randint(*_NUMERIC[t])
    if t == gf.BOOL:
        return rng.random() < 0.5
    if t in (gf.F32V, gf.F64):
        return rng.choice([0.0, -0.0, 1.5, float("inf"), float("nan"), rng.uniform(-1e6, 1e6), 1e-40])
    return _random_string(rng)


def _random_value(rng: random.Random, depth=0):
    t = rng.choice([*_NUMERIC, gf.BOOL, gf.F32V, gf.F64, gf.STRING, gf.ARRAY, gf.ARRAY, gf.ARRAY])
    if t != gf.ARRAY:
        return t, _random_scalar(rng, t)
    n = rng.choice([0, 1, 2, 7, 300])
    it = rng.choice([*_NUMERIC, gf.BOOL, gf.F32V, gf.F64, gf.STRING] + ([gf.ARRAY] if depth == 0 else []))
    if it == gf.ARRAY:  # nested: inner arrays of one numeric type, the first not empty (gguf flattens them)
        inner = rng.choice(list(_NUMERIC))
        return t, (it, [(inner, [_random_scalar(rng, inner) for _ in range(rng.randint(1 if i == 0 else 0, 3))])
                        for i in range(max(n, 1) if n < 50 else 3)])
    return t, (it, [_random_scalar(rng, it) for _ in range(n)])


@pytest.mark.parametrize("seed", range(40))
def test_random_files_match_gguf_reader(tmp_path, seed):
    rng = random.Random(seed)
    kvs = [[f"k{i}.{_random_string(rng)}", *_random_value(rng)] for i in range(rng.randint(0, 30))]
    if seed % 3 == 0:
        kvs.append(["general.alignment", gf.U32, rng.choice([1, 8, 32, 64])])
    tensors = gf.base_tensors()[:rng.randint(0, 5)]
    align = next((kv[2] for kv in kvs if kv[0] == "general.alignment"), 32)
    p = gf.write(tmp_path / "r.gguf", gf.serialize(kvs, tensors, alignment=align))
    _assert_matches_reader(p)


def _settings(n):
    return settings(max_examples=n, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
                    suppress_health_check=list(HealthCheck))


def _differential(path):
    """Where gguf's reader parses the file, gguf_parse gives the same; where it fails, ModelFormatError."""
    try:
        r = _BoundedReader(path)
        ok = r.byte_order == "I"  # gguf_parse rejects big-endian files by design
    except Exception:  # noqa: BLE001 (the reader fails on corrupt files with any exception)
        ok = False
    if ok:
        _assert_matches_reader(path)
    else:
        with pytest.raises(ModelFormatError):
            parse_gguf(path)


@_settings(500)
@given(gf.gguf_cases())
def test_fuzz_structure_matches_gguf_reader(tmp_path_factory, case):
    _differential(gf.write(tmp_path_factory.getbasetemp() / "s.gguf", case[1]))


@_settings(300)
@given(gf.byte_mutations(size=4000, hot=1500))
def test_fuzz_byte_mutations_match_gguf_reader(tmp_path_factory, muts):
    data = gf.serialize(gf.base_kvs(), gf.base_tensors())
    muts = [(o % len(data), b) for o, b in muts]
    _differential(gf.write(tmp_path_factory.getbasetemp() / "b.gguf", gf.apply_mutations(data, muts)))


# ---- malformed files: ModelFormatError, naming the problem ---------------------------------------------
def test_every_truncation_of_the_header_raises(tmp_path):
    data = gf.serialize(gf.base_kvs(), gf.base_tensors())
    end = parse_gguf(gf.write(tmp_path / "full.gguf", data)).data_offset
    for cut in range(0, end - 31):  # the last bytes before the data are alignment padding
        p = gf.write(tmp_path / "cut.gguf", data[:cut])
        with pytest.raises(ModelFormatError):
            parse_gguf(p)


def _kvs_with(key, vtype, value):
    return [kv for kv in gf.base_kvs() if kv[0] != key] + [[key, vtype, value]]


@pytest.mark.parametrize("kvs,lies,match", [
    (gf.base_kvs() + [["x.unknown", 13, 0]], None, "'x.unknown' has unknown value type 13"),
    (gf.base_kvs() + [["x.arr", gf.ARRAY, (13, [1, 2])]], None, "'x.arr' is an array of unknown value type 13"),
    (gf.base_kvs() + [gf.base_kvs()[1]], None, "duplicate metadata key 'general.name'"),
    (_kvs_with("general.alignment", gf.U64, 32), None, "general.alignment is not a uint32"),
    (_kvs_with("general.alignment", gf.U32, 48), None, "general.alignment 48 is not a power of two"),
    (_kvs_with("general.alignment", gf.U32, 0), None, "general.alignment 0 is not a power of two"),
    (gf.base_kvs(), {("kv", 14): {"arrlen": 2**60}}, "truncated or corrupt"),
    (gf.base_kvs(), {("kv", 1): {"strlen": 2**64 - 1}}, "truncated or corrupt"),
    (gf.base_kvs(), {("tensor", 0): {"ndims": 2**31}}, "truncated or corrupt"),
])
def test_malformed_metadata(tmp_path, kvs, lies, match):
    p = gf.write(tmp_path / "m.gguf", gf.serialize(kvs, gf.base_tensors(), lies=lies))
    with pytest.raises(ModelFormatError, match=match):
        parse_gguf(p)


def test_duplicate_tensor_bad_utf8_key_version_and_endianness(tmp_path):
    t = gf.base_tensors()
    p = gf.write(tmp_path / "d.gguf", gf.serialize(gf.base_kvs(), t + [list(t[0])]))
    with pytest.raises(ModelFormatError, match="duplicate tensor 'token_embd.weight'"):
        parse_gguf(p)
    data = bytearray(gf.serialize([["ab", gf.U8, 1]], []))
    data[24 + 8] = 0xFF  # the key's first byte
    with pytest.raises(ModelFormatError, match="metadata key .* is not valid UTF-8"):
        parse_gguf(gf.write(tmp_path / "k.gguf", bytes(data)))
    with pytest.raises(ModelFormatError, match="unsupported GGUF version 1"):
        parse_gguf(gf.write(tmp_path / "v.gguf", gf.serialize([], [], version=1)))
    data = bytearray(gf.serialize([], []))
    data[4:8] = struct.pack(">I", 3)
    with pytest.raises(ModelFormatError, match="big-endian"):
        parse_gguf(gf.write(tmp_path / "be.gguf", bytes(data)))
    with pytest.raises(ModelFormatError, match="bad magic"):
        parse_gguf(gf.write(tmp_path / "m.gguf", b"GGML" + bytes(40)))


def test_invalid_utf8_string_values_round_trip(tmp_path):
    raw = [b"\xff\xfe", b"ok", b"\xc3", b"\xe2\x82\xac"]  # byte tokens of a real vocabulary are often not UTF-8
    p = gf.write(tmp_path / "u.gguf", gf.serialize([["s", gf.STRING, b"\x80x"], ["a", gf.ARRAY, (gf.STRING, raw)]], []))
    md = parse_gguf(p).metadata
    assert md["s"].encode("utf-8", "surrogateescape") == b"\x80x"
    assert [s.encode("utf-8", "surrogateescape") for s in md["a"]] == raw


def test_ggml_format_table_matches_gguf_package():
    """model/weights.py writes GGML's type ids and block sizes out (importing `gguf` costs every load
    ~60 ms): they must be the gguf package's."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from tinyvllm.model.weights import QUANT_BLOCKS, GGMLType
    for t in GGMLType:
        assert int(GGMLQuantizationType[t.name]) == int(t), t.name
        if t.name not in ("F32", "F16", "BF16"):
            assert QUANT_BLOCKS[int(t)] == GGML_QUANT_SIZES[GGMLQuantizationType[t.name]], t.name
    assert set(QUANT_BLOCKS) == {int(t) for t in GGMLType} - {int(GGMLType[n]) for n in ("F32", "F16", "BF16")}
