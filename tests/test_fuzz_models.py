"""Hostile model files and chat templates (issue 16): every malformed file loads or raises ModelFormatError
naming the problem, never another exception, a hang, or an allocation its size does not justify.

The fuzz tests are Hypothesis runs with a fixed seed (derandomize=True): the same cases every run.
benchmarks/fuzz_models.py runs the same strategies at benchmark scale.

With TINYVLLM_FUZZ_NATIVE=1 the GGUF cases that load also go through the native engine (weights packed
into the C++ core, a prefill and a decode step): .ci/run does that with the ASan/UBSan build of the core,
where a memory error or undefined behaviour aborts the run."""
import collections
import json
import os
import struct
import tracemalloc
from functools import lru_cache
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from safetensors.numpy import save_file

import gguf_fuzz as gf
from tinyvllm.chat_template import TemplateError, render_chat_template
from tinyvllm.model import ModelFormatError, load_model
from tinyvllm.tokenizer import Tokenizer


NATIVE = os.environ.get("TINYVLLM_FUZZ_NATIVE", "") not in ("", "0")
_native_outcomes = collections.Counter()  # "ok" / "refused" per case the fuzz tests sent to the engine


def _check(path: Path) -> None:
    """The fuzz property: the file loads or is refused cleanly; with NATIVE, one that loads also runs in the
    native engine or is refused there cleanly."""
    if gf.check_model_file(path) == "ok" and NATIVE:
        _native_outcomes["ok" if gf.check_native_forward(path) == "ok" else "refused"] += 1


def _fuzz_settings(n):
    return settings(max_examples=n, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
                    suppress_health_check=list(HealthCheck))


@lru_cache(maxsize=1)
def _workdir() -> Path:
    import tempfile
    return Path(tempfile.mkdtemp(prefix="tinyvllm-fuzz-"))


# ---- GGUF, structure-aware ----------------------------------------------------------------------------
def test_fuzz_base_gguf_loads():
    """The unmutated case loads and tokenizes: the fuzz cases start from a file that works."""
    p = gf.write(_workdir() / "base.gguf", gf.serialize(gf.base_kvs(), gf.base_tensors()))
    assert gf.check_model_file(p) == "ok"


@_fuzz_settings(4200)
@given(gf.gguf_cases())
def test_fuzz_gguf_structure(case):
    _, data = case
    _check(gf.write(_workdir() / "s.gguf", data))


# ---- GGUF, a real tiny model mutated byte-wise ----------------------------------------------------------
@lru_cache(maxsize=1)
def _tiny_gguf() -> tuple[bytes, int]:
    from tiny_models import make_tiny_gguf
    p = make_tiny_gguf(_workdir() / "tiny.gguf", qtype="Q8_0")
    return Path(p).read_bytes(), int(gguf.GGUFReader(p).data_offset)


@_fuzz_settings(900)
@given(gf.byte_mutations(size=127_000, hot=16_000))
def test_fuzz_gguf_byte_mutations(muts):
    data, _ = _tiny_gguf()
    muts = [(o % len(data), b) for o, b in muts]
    _check(gf.write(_workdir() / "b.gguf", gf.apply_mutations(data, muts)))


def test_fuzz_cases_reach_the_native_engine():
    """The unmutated cases run in the native engine; with NATIVE, after the two GGUF fuzz tests above (pytest
    runs a file in order), hundreds of fuzz cases reached it, so the sanitizer run checks the core."""
    base = gf.write(_workdir() / "base-native.gguf", gf.serialize(gf.base_kvs(), gf.base_tensors()))
    assert gf.check_native_forward(base) == "ok"
    assert gf.check_native_forward(gf.write(_workdir() / "tiny-native.gguf", _tiny_gguf()[0])) == "ok"
    if NATIVE:
        print(f"fuzz cases through the native engine: {dict(_native_outcomes)}")
        assert _native_outcomes["ok"] >= 100, _native_outcomes


def test_fuzz_byte_mutation_hot_region_covers_metadata():
    data, data_offset = _tiny_gguf()
    assert data_offset <= 16_000 < len(data)  # the hot region is the header, metadata and tensor infos


# ---- GGUF regressions: each names what it guards --------------------------------------------------------
def _peak_alloc(fn):
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_gguf_claiming_2_40_tensors_fails_fast_without_allocating(tmp_path):
    data = gf.serialize(gf.base_kvs()[:3], [], n_tensors=2**40)[:1024].ljust(1024, b"\0")
    p = gf.write(tmp_path / "many.gguf", data)
    with pytest.raises(ModelFormatError, match=r"claims 1099511627776 tensors"):
        load_model(p)
    peak = _peak_alloc(lambda: pytest.raises(ModelFormatError, load_model, p))
    assert peak < 1 << 20


@pytest.mark.parametrize("lie", ["strlen", "arrlen", "keylen"])
def test_gguf_2_60_byte_string_or_array_fails_without_allocating(tmp_path, lie):
    kvs = gf.base_kvs()
    i = next(i for i, kv in enumerate(kvs) if kv[0] == ("tokenizer.ggml.tokens" if lie == "arrlen" else
                                                         "general.name"))
    p = gf.write(tmp_path / "s.gguf", gf.serialize(kvs, gf.base_tensors(), lies={("kv", i): {lie: 2**60}}))
    peak = _peak_alloc(lambda: pytest.raises(ModelFormatError, load_model, p))
    with pytest.raises(ModelFormatError, match="truncated or corrupt"):
        load_model(p)
    assert peak < 8 << 20


def test_gguf_shape_product_overflowing_64_bits(tmp_path):
    t = gf.base_tensors()
    t[0][1] = [2**32 + 1, 2**32 + 1]  # each dim fits in 64 bits, the element count does not
    p = gf.write(tmp_path / "o.gguf", gf.serialize(gf.base_kvs(), t))
    with pytest.raises(ModelFormatError, match="token_embd.weight.*extends past the end of the file"):
        load_model(p)


@pytest.mark.parametrize("key,vtype,value,match", [
    ("llama.attention.head_count", gf.U32, 0, "bad GGUF metadata value"),
    ("llama.rope.freq_base", gf.STRING, "fast", "bad GGUF metadata value"),
    ("llama.block_count", gf.STRING, "many", "num_layers must be a positive integer"),
])
def test_gguf_metadata_value_of_wrong_type_or_range(tmp_path, key, vtype, value, match):
    kvs = [[k, vtype, value] if k == key else [k, t, v] for k, t, v in gf.base_kvs()]
    p = gf.write(tmp_path / "v.gguf", gf.serialize(kvs, gf.base_tensors()))
    with pytest.raises(ModelFormatError, match=match):
        load_model(p)


def test_gguf_big_endian_header_rejected(tmp_path):
    data = bytearray(gf.serialize(gf.base_kvs(), gf.base_tensors()))
    data[4:8] = struct.pack(">I", 3)
    p = gf.write(tmp_path / "be.gguf", bytes(data))
    with pytest.raises(ModelFormatError, match="big-endian"):
        load_model(p)


def _tokenizer_of(tmp_path, **replace):
    kvs = [[k, t, replace.get(k, v)] for k, t, v in gf.base_kvs()]
    p = gf.write(tmp_path / "t.gguf", gf.serialize(kvs, gf.base_tensors()))
    return Tokenizer.from_gguf_metadata(load_model(p).metadata)


def test_corrupted_gguf_merges_raise_model_format_error_not_tokenizers_error(tmp_path):
    # was: `Exception: Error while initializing BPE: Token `zz` out of vocabulary` from `tokenizers`
    with pytest.raises(ModelFormatError, match="tokenizer metadata is inconsistent.*out of vocabulary"):
        _tokenizer_of(tmp_path, **{"tokenizer.ggml.merges": (gf.STRING, ["a b", "zz qq"])})


def test_corrupted_gguf_merges_of_wrong_type_raise_model_format_error(tmp_path):
    # was: "failed to extract enum PyMerges" (merges that are not strings)
    with pytest.raises(ModelFormatError, match="merges is not an array of strings"):
        _tokenizer_of(tmp_path, **{"tokenizer.ggml.merges": (gf.I32, [1, 2, 3])})


@pytest.mark.parametrize("key,value,match", [
    ("tokenizer.ggml.token_type", (gf.I32, [1, 1]), "token_type has 2 entries for 34 tokens"),
    ("tokenizer.ggml.tokens", (gf.I32, [1, 2]), "tokens is missing or not a non-empty array of strings"),
    ("tokenizer.ggml.eos_token_id", 999, "eos_token_id 999 is not a token id"),
    ("tokenizer.ggml.model", "bert", "unsupported GGUF tokenizer.ggml.model 'bert'"),
])
def test_corrupted_gguf_tokenizer_arrays_name_the_problem(tmp_path, key, value, match):
    with pytest.raises(ModelFormatError, match=match):
        _tokenizer_of(tmp_path, **{key: value})


# ---- HF directories: safetensors headers, config.json, tokenizer.json ----------------------------------
def _hf_dir(tmp: Path) -> Path:
    d = tmp / "hf"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(gf.HF_CONFIG))
    for f in ("model.safetensors", "tokenizer.json"):
        (d / f).unlink(missing_ok=True)
    return d


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tiny_models import trained_bpe_json
    return trained_bpe_json()


def _check_hf(d: Path, *, tokenizer: bool):
    try:
        w = load_model(d)
        assert w.kind == "hf"
    except ModelFormatError as e:
        assert str(e)
    if tokenizer:
        try:
            Tokenizer.from_dir(d).encode("hello world")
        except ModelFormatError as e:
            assert str(e)


@_fuzz_settings(250)
@given(gf.safetensors_headers())
def test_fuzz_safetensors_header(raw):
    d = _hf_dir(_workdir())
    (d / "model.safetensors").write_bytes(raw)
    _check_hf(d, tokenizer=False)


@_fuzz_settings(250)
@given(gf.json_mutations(gf.HF_CONFIG))
def test_fuzz_config_json(text):
    d = _hf_dir(_workdir())
    (d / "config.json").write_text(text)
    save_file({"model.norm.weight": np.ones(4, np.float32)}, str(d / "model.safetensors"))
    _check_hf(d, tokenizer=False)


@_fuzz_settings(200)
@given(gf.json_mutations({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2},
                                                      "merges": ["a b"]}, "added_tokens": [],
                          "pre_tokenizer": None, "decoder": None, "normalizer": None, "post_processor": None}))
def test_fuzz_tokenizer_json(text):
    d = _hf_dir(_workdir())
    (d / "tokenizer.json").write_text(text)
    _check_hf(d, tokenizer=True)


def test_hf_tokenizer_json_fuzz_base_is_valid(tmp_path):
    (tmp_path / "tokenizer.json").write_text(_tokenizer_json())
    assert Tokenizer.from_dir(tmp_path).encode("hello")


def test_safetensors_header_claiming_2_60_bytes_fails_without_allocating(tmp_path):
    d = _hf_dir(tmp_path)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 2**60) + b"{}")
    peak = _peak_alloc(lambda: pytest.raises(ModelFormatError, load_model, d))
    with pytest.raises(ModelFormatError, match="header claims 1152921504606846976 bytes"):
        load_model(d)
    assert peak < 1 << 20


# ---- chat templates: untrusted code under limits ---------------------------------------------------------
_MSGS = [{"role": "user", "content": "hi"}]


def test_chat_template_that_loops_for_ever_is_stopped():
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(TemplateError, match="took longer than 0.3 s"):
        render_chat_template(loop, _MSGS, time_limit=0.3)


def test_chat_template_rendering_gigabytes_is_stopped():
    big = "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}"  # 10 GB of output
    with pytest.raises(TemplateError, match="output passed 1000000 characters"):
        render_chat_template(big, _MSGS, max_chars=1_000_000)


@pytest.mark.parametrize("bomb", ["{{ 'x' * 10**12 }}", "{{ ['x'] * 10**12 }}", "{{ 2 ** 100000000 }}",
                                  "{{ '%999999999999d' % 1 }}", "{{ 'x'|center(10**12) }}",
                                  "{{ 'x'|indent(10**12) }}"])
def test_chat_template_size_bombs_fail_before_allocating(bomb):
    peak = _peak_alloc(lambda: pytest.raises(TemplateError, render_chat_template, bomb, _MSGS))
    assert peak < 64 << 20


def test_chat_template_limits_leave_normal_templates_alone():
    out = render_chat_template(gf.CHATML, _MSGS * 3, time_limit=5.0)
    assert out.count("<|im_start|>user\nhi<|im_end|>") == 3 and out.endswith("<|im_start|>assistant\n")
    assert render_chat_template("{{ 'ab' * 3 }}|{{ '%5d' % 42 }}|{{ 2 ** 10 }}", _MSGS) == "ababab|   42|1024"


# ---- found by the fuzzer through the native engine (benchmarks/fuzz_models.py --forward, ASan build) -------
def test_quantized_norm_is_model_format_error_not_native_error(tmp_path, monkeypatch):
    """A GGUF whose norm is stored quantized loaded in Python and then failed inside the native runner
    (NativeError 'norms and biases must be F32'): now the loader's check names it."""
    import gguf
    from tiny_models import make_tiny_gguf
    from tinyvllm import LLM
    q8 = gguf.GGMLQuantizationType.Q8_0
    add_tensor = gguf.GGUFWriter.add_tensor

    def quantized_norm(self, name, tensor, *args, **kwargs):
        if name == "output_norm.weight":
            return add_tensor(self, name, gguf.quants.quantize(tensor, q8), raw_dtype=q8)
        return add_tensor(self, name, tensor, *args, **kwargs)
    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", quantized_norm)
    path = make_tiny_gguf(tmp_path / "qnorm.gguf")
    monkeypatch.undo()
    problem = r"'output_norm\.weight' \(a norm or bias\) is stored as Q8_0; norms and biases must be F32, F16 or BF16"
    with pytest.raises(ModelFormatError, match=problem):
        load_model(path)
    with pytest.raises(ModelFormatError, match=problem):
        LLM(path, threads=1, max_model_len=32)


def test_small_gguf_alignment_gives_the_native_core_aligned_tensors(tmp_path, monkeypatch):
    """general.alignment = 2 (legal: a power of two) put F32 norms at odd multiples of 2 in the mmapped
    file; the native core read them misaligned (UBSan: load of misaligned address in rmsnorm). Such
    tensors are copied to aligned memory, and the model answers as the normally aligned file does."""
    import gguf
    from tiny_models import make_tiny_gguf
    from tinyvllm import LLM, SamplingParams
    init = gguf.GGUFWriter.__init__
    normal = make_tiny_gguf(tmp_path / "normal.gguf")
    for pad in ("", "x", "xx", "xxx"):  # a metadata string that moves the data section to 2 mod 4
        def aligned_2(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.add_custom_alignment(2)
            self.add_string("test.pad", pad)
        monkeypatch.setattr(gguf.GGUFWriter, "__init__", aligned_2)
        odd = make_tiny_gguf(tmp_path / f"odd{len(pad)}.gguf")
        monkeypatch.undo()
        offsets = [int(t.data_offset) for t in gguf.GGUFReader(odd).tensors]
        if any(o % 4 for o in offsets):
            break
    assert any(o % 4 for o in offsets), offsets  # the file really has misaligned tensors
    params = SamplingParams(max_tokens=4, temperature=0)
    llm = LLM(odd, threads=1, max_model_len=32)
    assert all(a.ctypes.data % 16 == 0 for a in llm.engine.runner._keep)
    want = LLM(normal, threads=1, max_model_len=32).generate(["abc a"], params)[0].outputs[0].token_ids
    assert llm.generate(["abc a"], params)[0].outputs[0].token_ids == want
