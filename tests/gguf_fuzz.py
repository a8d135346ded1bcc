"""Structure-aware fuzzing of model files with Hypothesis: strategies that write GGUF files (and HF
directories) with lying headers, and the one check every case must pass (`check_model_file`).

Used by tests/test_fuzz_models.py (fixed-seed CI subset) and benchmarks/fuzz_models.py (long run).
The GGUF writer here is deliberately hand-rolled: gguf.GGUFWriter refuses to write the lies we need
(counts that do not match, string lengths past the end, shapes whose product overflows)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

from tinyvllm.chat_template import TemplateError
from tinyvllm.model import ModelFormatError, load_model
from tinyvllm.tokenizer import Tokenizer

# GGUF value type ids
U8, I8, U16, I16, U32, I32, F32V, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_SCALAR_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32V: "<f", BOOL: "<?",
               U64: "<Q", I64: "<q", F64: "<d"}
# ggml type ids: floats, legacy quants, K-quants (Q2_K..Q8_K), IQ types, and ids past the end
GGML_TYPE_IDS = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 23, 24, 25, 26, 28, 29, 30,
                 31, 34, 35, 39, 40, 41, 1000, 2**31, 2**32 - 1]

# The tiny llama every structured case starts from (it loads when nothing is mutated).
HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 32, 2, 1, 64, 1
_BYTE_TOKENS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [" ", "Ġ"]
VOCAB_TOKENS = ["<|im_start|>", "<|im_end|>"] + _BYTE_TOKENS + ["ab", "abc", "Ġa"] + [f"t{i}" for i in range(1)]
VOCAB = len(VOCAB_TOKENS)  # 32
MERGES = ["a b", "ab c", "Ġ a"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tensor_specs() -> list[tuple[str, tuple[int, ...]]]:
    hd = HIDDEN // HEADS
    specs = [("token_embd.weight", (VOCAB, HIDDEN)), ("output_norm.weight", (HIDDEN,))]
    for i in range(LAYERS):
        b = f"blk.{i}."
        specs += [(b + "attn_norm.weight", (HIDDEN,)), (b + "attn_q.weight", (HIDDEN, HIDDEN)),
                  (b + "attn_k.weight", (KV_HEADS * hd, HIDDEN)), (b + "attn_v.weight", (KV_HEADS * hd, HIDDEN)),
                  (b + "attn_output.weight", (HIDDEN, HIDDEN)), (b + "ffn_norm.weight", (HIDDEN,)),
                  (b + "ffn_gate.weight", (FFN, HIDDEN)), (b + "ffn_up.weight", (FFN, HIDDEN)),
                  (b + "ffn_down.weight", (HIDDEN, FFN))]
    return specs


def base_kvs() -> list[list]:
    """[key, type, value] of a loadable tiny llama; an ARRAY value is (item_type, [items])."""
    return [["general.architecture", STRING, "llama"], ["general.name", STRING, "fuzz-llama"],
            ["llama.block_count", U32, LAYERS], ["llama.context_length", U32, 64],
            ["llama.embedding_length", U32, HIDDEN], ["llama.feed_forward_length", U32, FFN],
            ["llama.attention.head_count", U32, HEADS], ["llama.attention.head_count_kv", U32, KV_HEADS],
            ["llama.rope.freq_base", F32V, 10000.0], ["llama.attention.layer_norm_rms_epsilon", F32V, 1e-5],
            ["llama.vocab_size", U32, VOCAB], ["general.alignment", U32, 32],
            ["tokenizer.ggml.model", STRING, "gpt2"], ["tokenizer.ggml.pre", STRING, "smollm"],
            ["tokenizer.ggml.tokens", ARRAY, (STRING, list(VOCAB_TOKENS))],
            ["tokenizer.ggml.token_type", ARRAY, (I32, [3, 3] + [1] * (VOCAB - 2))],
            ["tokenizer.ggml.merges", ARRAY, (STRING, list(MERGES))],
            ["tokenizer.ggml.bos_token_id", U32, 0], ["tokenizer.ggml.eos_token_id", U32, 1],
            ["tokenizer.chat_template", STRING, CHATML]]


def base_tensors() -> list[list]:
    """[name, dims (GGUF order: innermost first), ggml type, relative offset or None = computed]."""
    return [[n, list(reversed(s)), 0, None] for n, s in _tensor_specs()]


# ------------------------------------------------------------------------------------------ serializer
def _s(b: bytes, lie: int | None = None) -> bytes:
    return struct.pack("<Q", len(b) if lie is None else lie) + b


def _value(vtype: int, v, lies: dict) -> bytes:
    if vtype == STRING:
        return _s(v if isinstance(v, bytes) else str(v).encode("utf-8", "surrogatepass"), lies.pop("strlen", None))
    if vtype == ARRAY:
        itype, items = v if isinstance(v, tuple) else (U8, [])  # a mutation put a scalar under an array type
        out = struct.pack("<IQ", itype, lies.pop("arrlen", len(items)))
        return out + b"".join(_value(itype, x, lies) for x in items)
    fmt = _SCALAR_FMT.get(vtype)
    if fmt is None:  # an unknown type id: emit a few garbage bytes
        return b"\x01\x02\x03\x04"
    try:
        return struct.pack(fmt, v)
    except (struct.error, TypeError, OverflowError):
        return struct.pack(fmt, 0) if fmt not in ("<f", "<d") else struct.pack(fmt, 0.0)


def _nbytes(ttype: int, dims: list[int]) -> int:
    sizes = {0: (1, 4), 1: (1, 2), 30: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 34), 8: (32, 36),
             10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292)}
    bs, bb = sizes.get(ttype, (1, 1))
    n = 1
    for d in dims:
        n *= max(int(d), 0)
    return min(n // bs * bb, 1 << 20)


def serialize(kvs, tensors, *, version=3, n_tensors=None, n_kv=None, lies=None, alignment=32,
              data_fill=0.01, truncate=None) -> bytes:
    """GGUF bytes. `lies` maps ("kv", i) / ("tensor", i) to {"strlen": n, "arrlen": n, "namelen": n}."""
    lies = lies or {}
    out = bytearray(b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                          len(kvs) if n_kv is None else n_kv))
    for i, (key, vtype, v) in enumerate(kvs):
        lie = dict(lies.get(("kv", i), {}))
        out += _s(key.encode(), lie.pop("keylen", None)) + struct.pack("<I", vtype) + _value(vtype, v, lie)
    offs, rel = [], 0
    for name, dims, ttype, off in tensors:
        o = rel if off is None else off
        offs.append(o)
        rel = -(-(o + _nbytes(ttype, dims)) // alignment) * alignment if alignment > 0 else o
    for i, (name, dims, ttype, _) in enumerate(tensors):
        lie = lies.get(("tensor", i), {})
        out += _s(name.encode(), lie.get("namelen")) + struct.pack("<I", lie.get("ndims", len(dims)))
        out += b"".join(struct.pack("<Q", int(d) & (2**64 - 1)) for d in dims)
        out += struct.pack("<IQ", ttype & 0xFFFFFFFF, offs[i] & (2**64 - 1))
    if alignment > 0:
        out += b"\0" * (-len(out) % alignment)
    rng = np.random.default_rng(len(out))
    data_len = max([o + _nbytes(t[2], t[1]) for o, t in zip(offs, tensors) if 0 <= o < 1 << 20] or [0])
    data = (rng.standard_normal(max(data_len // 4, 0) + 1).astype(np.float32) * data_fill).tobytes()[:data_len]
    out += data
    return bytes(out if truncate is None else out[:truncate])


# ------------------------------------------------------------------------------------------ strategies
_BIG = st.sampled_from([0, 1, 2, 7, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**60, 2**63 - 1,
                        2**63, 2**64 - 1])
_ANY_VALUE_TYPE = st.integers(0, 14)
_KEYS = [k for k, _, _ in base_kvs()] + ["llama.rope.scaling.type", "llama.rope.scaling.factor",
                                         "llama.attention.key_length", "llama.rope.dimension_count",
                                         "tokenizer.ggml.scores", "tokenizer.ggml.add_bos_token",
                                         "tokenizer.ggml.unknown_token_id", "tokenizer.chat_template.tool_use"]


def _value_of(vtype):
    if vtype == STRING:
        return st.one_of(st.text(max_size=8), st.sampled_from(["llama", "gpt2", "qwen3", "gemma3", "none", "linear"]))
    if vtype == BOOL:
        return st.booleans()
    if vtype in (F32V, F64):
        return st.floats(allow_nan=True, allow_infinity=True, width=32 if vtype == F32V else 64)
    if vtype == ARRAY:
        return st.tuples(st.sampled_from([U8, I32, U32, F32V, STRING, BOOL, ARRAY, 13]),
                         st.lists(st.integers(-3, 40), max_size=4)).map(
            lambda t: (t[0], [str(x) for x in t[1]] if t[0] == STRING else
                       [(I32, [x]) for x in t[1]] if t[0] == ARRAY else t[1]))
    return st.one_of(st.integers(-2, 70), _BIG.map(lambda x: x))


@st.composite
def kv_mutation(draw, kvs):
    i = draw(st.integers(0, len(kvs) - 1))
    how = draw(st.sampled_from(["retype", "revalue", "drop", "dup", "newkey", "tokens", "types", "merges"]))
    if how == "retype":
        t = draw(_ANY_VALUE_TYPE)
        kvs[i] = [kvs[i][0], t, draw(_value_of(t)) if t <= 12 else 0]
    elif how == "revalue":
        t = kvs[i][1]
        kvs[i][2] = draw(_value_of(t)) if t != ARRAY else (kvs[i][2][0], draw(st.lists(
            st.integers(-5, 2 * VOCAB) if kvs[i][2][0] != STRING else st.text(max_size=6), max_size=40)))
    elif how == "drop":
        del kvs[i]
    elif how == "dup":
        kvs.append(list(kvs[i]))
    elif how == "newkey":
        t = draw(_ANY_VALUE_TYPE)
        kvs.append([draw(st.sampled_from(_KEYS)), t, draw(_value_of(t)) if t <= 12 else 0])
    else:  # corrupt the tokenizer arrays specifically: the `tokenizers` library must not leak its errors
        key = {"tokens": "tokenizer.ggml.tokens", "types": "tokenizer.ggml.token_type",
               "merges": "tokenizer.ggml.merges"}[how]
        j = next((j for j, kv in enumerate(kvs) if kv[0] == key), None)
        if j is not None and kvs[j][1] == ARRAY and isinstance(kvs[j][2], tuple):
            itype, items = kvs[j][2]
            items = list(items)
            if items and itype == STRING:
                k = draw(st.integers(0, len(items) - 1))
                items[k] = draw(st.one_of(st.text(max_size=6), st.sampled_from(["", " ", "zz qq", "a", "a  b"])))
            elif items:
                k = draw(st.integers(0, len(items) - 1))
                items[k] = draw(st.integers(-10, 10))
            if draw(st.booleans()):
                items = items[:draw(st.integers(0, len(items)))]
            kvs[j][2] = (itype, items)


@st.composite
def tensor_mutation(draw, tensors):
    i = draw(st.integers(0, len(tensors) - 1))
    how = draw(st.sampled_from(["dtype", "dims", "ndims", "overflow", "offset", "drop", "dup", "rename"]))
    t = tensors[i]
    if how == "dtype":
        t[2] = draw(st.sampled_from(GGML_TYPE_IDS))
    elif how == "dims":
        t[1] = draw(st.lists(st.one_of(st.integers(0, 300), _BIG), min_size=1, max_size=4))
    elif how == "ndims":
        t[1] = draw(st.lists(st.integers(1, 4), min_size=0, max_size=7))
    elif how == "overflow":  # each dim fits, the product does not fit in 64 bits
        t[1] = [2**32 + 1, 2**32 + 1, 3][:draw(st.integers(2, 3))]
    elif how == "offset":
        t[3] = draw(st.one_of(_BIG, st.integers(0, 4096)))
    elif how == "drop":
        del tensors[i]
    elif how == "dup":
        tensors.append(list(t))
    else:
        t[0] = draw(st.sampled_from(["blk.5.attn_q.weight", "output.weight", "rope_freqs.weight", "",
                                     "blk.0.attn_q.bias", "x" * 70]))


@st.composite
def gguf_cases(draw):
    """(description, GGUF bytes): the tiny llama with 0..4 structural mutations."""
    kvs, tensors = base_kvs(), base_tensors()
    kw, lies, what = {}, {}, []
    for _ in range(draw(st.integers(0, 4))):
        area = draw(st.sampled_from(["header", "kv", "kv", "tensor", "tensor", "lie", "align", "truncate"]))
        what.append(area)
        if area == "header":
            field = draw(st.sampled_from(["version", "n_tensors", "n_kv"]))
            kw[field] = draw(st.one_of(_BIG, st.integers(0, 40)))
            if field == "version":
                kw[field] &= 0xFFFFFFFF
        elif area == "kv" and kvs:
            draw(kv_mutation(kvs))
        elif area == "tensor" and tensors:
            draw(tensor_mutation(tensors))
        elif area == "lie" and kvs:
            side = draw(st.sampled_from(["kv", "tensor"])) if tensors else "kv"
            n = len(kvs) if side == "kv" else len(tensors)
            lies[(side, draw(st.integers(0, n - 1)))] = {
                draw(st.sampled_from(["strlen", "arrlen", "keylen", "namelen", "ndims"])): draw(_BIG)}
        elif area == "align":
            a = draw(st.sampled_from([0, 1, 3, 8, 31, 64, 2**31, 2**32 - 1]))
            for kv in kvs:
                if kv[0] == "general.alignment":
                    kv[2] = a
            kw["alignment"] = draw(st.sampled_from([a if 0 < a <= 256 else 32, 32, 1]))
        elif area == "truncate":
            kw["truncate"] = draw(st.integers(0, 4000))
    for k, v in list(lies.items()):
        for f in ("ndims",):
            if f in v and k[0] == "tensor":
                v[f] &= 0xFFFFFFFF
    return ",".join(what) or "valid", serialize(kvs, tensors, lies=lies, **kw)


@st.composite
def byte_mutations(draw, size: int, hot: int):
    """[(offset, bytes)]: overwrites, mostly inside the first `hot` bytes (header, metadata, tensor infos)."""
    muts = []
    for _ in range(draw(st.integers(1, 6))):
        off = draw(st.one_of(st.integers(0, hot - 1), st.integers(0, size - 1)))
        kind = draw(st.sampled_from(["byte", "u32", "u64", "flip"]))
        if kind == "byte":
            muts.append((off, bytes([draw(st.integers(0, 255))])))
        elif kind == "u32":
            muts.append((off, struct.pack("<I", draw(_BIG) & 0xFFFFFFFF)))
        elif kind == "u64":
            muts.append((off, struct.pack("<Q", draw(_BIG))))
        else:
            muts.append((off, None))
    return muts


def apply_mutations(data: bytes, muts) -> bytes:
    b = bytearray(data)
    for off, new in muts:
        if new is None:
            b[off] ^= 0xFF
        else:
            b[off:off + len(new)] = new
    return bytes(b[:len(data)])


# ------------------------------------------------------------------------------------------ the property
def check_model_file(path, *, build_tokenizer: bool = True) -> str:
    """Load `path` as LLM would up to the engine: weights, then the tokenizer (encode, decode, chat
    template). Returns "ok", the ModelFormatError's message, or the TemplateError's of a template that
    compiles but fails to render; anything else propagates (a finding)."""
    try:
        w = load_model(path)
        if build_tokenizer:
            tok = Tokenizer.from_gguf_metadata(w.metadata) if w.kind == "gguf" else Tokenizer.from_dir(w.path)
            ids = tok.encode("abc a zz <|im_end|>")
            tok.decode(ids)
            if tok.chat_template:  # it compiles (checked at load); rendering may still fail, cleanly
                try:
                    tok.apply_chat_template([{"role": "user", "content": "hi"}])
                except TemplateError as e:
                    return f"chat template: {e}"
    except ModelFormatError as e:
        msg = str(e)
        assert msg, "empty ModelFormatError message"
        return msg
    return "ok"


def check_native_forward(path) -> str:
    """For a file `check_model_file` passed: `LLM(path)` (the runner packs every weight into the C++ core,
    tv_model_set_tensor) and two generated tokens (a prefill and a decode step). Returns "ok", or the
    ModelFormatError / ValueError message of a budget or shape the engine refuses; anything else
    propagates (a finding). Run against the ASan/UBSan build of the core, a memory error aborts."""
    from tinyvllm import LLM, SamplingParams
    try:
        llm = LLM(str(path), threads=1, max_model_len=32, kv_cache_bytes="1MB", max_num_seqs=2)
        llm.generate(["abc a"], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True), use_tqdm=False)
    except (ModelFormatError, ValueError) as e:
        return f"engine: {e}"
    return "ok"


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------ HF directories
@st.composite
def safetensors_headers(draw):
    """Raw safetensors bytes: u64 header length (maybe lying), JSON header (maybe malformed), data."""
    good = {"model.norm.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    how = draw(st.sampled_from(["json", "len", "dtype", "shape", "offsets", "garbage", "meta"]))
    hdr = json.loads(json.dumps(good))
    t = hdr["model.norm.weight"]
    if how == "dtype":
        t["dtype"] = draw(st.sampled_from(["F64", "I8", "BF16", "F16", "Q4", "", 5, None]))
    elif how == "shape":
        t["shape"] = draw(st.one_of(st.lists(st.one_of(st.integers(-2, 10), _BIG), max_size=4),
                                    st.just("x"), st.just(None)))
    elif how == "offsets":
        t["data_offsets"] = draw(st.one_of(st.lists(st.one_of(st.integers(-2, 40), _BIG), max_size=3), st.just({})))
    elif how == "meta":
        hdr["__metadata__"] = draw(st.one_of(st.just({"format": "pt"}), st.just(3), st.just({"a": 1})))
    blob = json.dumps(hdr).encode()
    if how == "json":
        cut = draw(st.integers(0, len(blob)))
        blob = blob[:cut] + draw(st.binary(max_size=4))
    if how == "garbage":
        blob = draw(st.binary(max_size=40))
    n = len(blob) if how != "len" else draw(_BIG)
    return struct.pack("<Q", n & (2**64 - 1)) + blob + b"\0" * 16


HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4,
             "intermediate_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 1,
             "vocab_size": 8, "max_position_embeddings": 16, "rms_norm_eps": 1e-5}


@st.composite
def json_mutations(draw, base: dict):
    """Text of a JSON document: `base` with a field retyped / removed, or the text cut or garbled."""
    doc = json.loads(json.dumps(base))
    how = draw(st.sampled_from(["retype", "drop", "cut", "garbage", "nest"]))
    if how in ("retype", "drop") and doc:
        k = draw(st.sampled_from(sorted(doc)))
        if how == "drop":
            del doc[k]
        else:
            doc[k] = draw(st.one_of(st.none(), st.booleans(), st.integers(-3, 3), _BIG, st.text(max_size=4),
                                    st.lists(st.integers(0, 3), max_size=2), st.just({"a": 1}),
                                    st.floats(allow_nan=True)))
    text = json.dumps(doc)
    if how == "cut":
        text = text[:draw(st.integers(0, len(text)))]
    elif how == "garbage":
        text = draw(st.text(max_size=30))
    elif how == "nest":
        text = draw(st.sampled_from(["[]", "3", "null", "\"s\"", "[" * 5000 + "]" * 5000]))
    return text
