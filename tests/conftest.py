import importlib.util
import os
import shutil
import sys

import numpy as np
import pytest


def pytest_report_header(config):
    """Which native kernel path runs the suite (TINYVLLM_KERNEL forces one; an unusable name must not
    silently fall back to another path)."""
    from tinyvllm import _native
    path = _native.ffi.string(_native.lib.tv_kernel_path()).decode()
    forced = os.environ.get("TINYVLLM_KERNEL")
    if forced and forced not in (path, "auto"):
        raise pytest.UsageError(f"TINYVLLM_KERNEL={forced} asked for, but the kernel path is {path}")
    return f"tinyvllm native library {_native.LIB_PATH}, kernel path {path}"


def pytest_configure(config):
    config.addinivalue_line("markers", "network: needs network access (PyPI); CI has it")
    config.addinivalue_line("markers", "requires_feature(name, covers, modules=(), programs=(), min_python=None): "
                            "a test of an optional feature; see pytest_runtest_setup below")


# ---- optional features: skipped locally, a failure where TINYVLLM_REQUIRE_FEATURES=1 (CI) ------------------
# A test of an optional feature is marked @pytest.mark.requires_feature("tinygrad", covers="...",
# modules=("tinygrad",), programs=("clang",), min_python=(3, 11)). When a module or program is missing the test
# FAILS under TINYVLLM_REQUIRE_FEATURES=1 (a green CI run must have run it) and is skipped otherwise; either
# way the reason and the end-of-run summary say what went untested. A Python older than min_python cannot
# have the feature at all: skipped even under the flag, and listed as not covered.
REQUIRE_FEATURES = os.environ.get("TINYVLLM_REQUIRE_FEATURES", "") not in ("", "0")
_NOT_COVERED: dict[str, str] = {}  # feature -> why its tests did not run, and what they would have covered


def missing_requirements(modules=(), programs=()) -> list[str]:
    return ([f"Python module {m}" for m in modules if importlib.util.find_spec(m) is None] +
            [f"program {p} on PATH" for p in programs if shutil.which(p) is None])


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    for mark in item.iter_markers("requires_feature"):
        name, covers = mark.args[0], mark.kwargs["covers"]
        min_python = mark.kwargs.get("min_python")
        if min_python and sys.version_info < tuple(min_python):
            why = f"{name} needs Python >= {'.'.join(map(str, min_python))} (this is {sys.version.split()[0]})"
            _NOT_COVERED[name] = f"{why}; not covered: {covers}"
            pytest.skip(_NOT_COVERED[name])
        missing = missing_requirements(mark.kwargs.get("modules", ()), mark.kwargs.get("programs", ()))
        if missing:
            why = f"{name}: missing {', '.join(missing)}; not covered: {covers}"
            if REQUIRE_FEATURES:
                pytest.fail(f"TINYVLLM_REQUIRE_FEATURES is set and {why}", pytrace=False)
            _NOT_COVERED[name] = why
            pytest.skip(why)


def pytest_terminal_summary(terminalreporter):
    if _NOT_COVERED:
        terminalreporter.section("optional features NOT covered by this run")
        for why in _NOT_COVERED.values():
            terminalreporter.write_line(why)


@pytest.fixture(scope="session")
def reference_gguf_path():
    """The reference SmolLM2-135M Q4_1 GGUF, fetched once into $TINYVLLM_CACHE (or the user cache)."""
    import os
    from tinyvllm.model import resolve_model
    return resolve_model(os.environ.get("TINYVLLM_REF_GGUF") or "smollm2-135m", progress=False)


# ---- tiny model writers for the model-loading tests -------------------------------------------------------
TINY = dict(vocab=64, hidden=64, ff=96, layers=2, heads=4, kv_heads=2, head_dim=16)


def tiny_hf_tensors(seed=0, tie=False, bias=False):
    """Random float32 tensors with HF names for the TINY shapes."""
    rng = np.random.default_rng(seed)
    t = TINY
    q, kv = t["heads"] * t["head_dim"], t["kv_heads"] * t["head_dim"]
    r = lambda *s: rng.standard_normal(s).astype(np.float32)
    W = {"model.embed_tokens.weight": r(t["vocab"], t["hidden"]), "model.norm.weight": r(t["hidden"])}
    for i in range(t["layers"]):
        p = f"model.layers.{i}."
        W.update({p + "input_layernorm.weight": r(t["hidden"]), p + "post_attention_layernorm.weight": r(t["hidden"]),
                  p + "self_attn.q_proj.weight": r(q, t["hidden"]), p + "self_attn.k_proj.weight": r(kv, t["hidden"]),
                  p + "self_attn.v_proj.weight": r(kv, t["hidden"]), p + "self_attn.o_proj.weight": r(t["hidden"], q),
                  p + "mlp.gate_proj.weight": r(t["ff"], t["hidden"]), p + "mlp.up_proj.weight": r(t["ff"], t["hidden"]),
                  p + "mlp.down_proj.weight": r(t["hidden"], t["ff"]),
                  p + "self_attn.rotary_emb.inv_freq": r(t["head_dim"] // 2)})  # must be ignored
        if bias:
            W.update({p + "self_attn.q_proj.bias": r(q), p + "self_attn.k_proj.bias": r(kv),
                      p + "self_attn.v_proj.bias": r(kv)})
    if not tie:
        W["lm_head.weight"] = r(t["vocab"], t["hidden"])
    return W


def tiny_hf_config(arch="llama", tie=False, **over):
    t = TINY
    cfg = {"model_type": arch, "vocab_size": t["vocab"], "hidden_size": t["hidden"], "intermediate_size": t["ff"],
           "num_hidden_layers": t["layers"], "num_attention_heads": t["heads"], "num_key_value_heads": t["kv_heads"],
           "rms_norm_eps": 1e-6, "rope_theta": 500000.0, "max_position_embeddings": 256,
           "tie_word_embeddings": tie, "bos_token_id": 1, "eos_token_id": [2, 3]}
    cfg.update(over)
    return cfg


GGUF_HF_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight", "attn_norm.weight": "input_layernorm.weight",
                 "ffn_norm.weight": "post_attention_layernorm.weight", "attn_q": "self_attn.q_proj",
                 "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                 "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def gguf_to_hf_name(name):
    if name in GGUF_HF_NAMES:
        return GGUF_HF_NAMES[name]
    _, i, rest = name.split(".", 2)
    if rest in GGUF_HF_NAMES:
        return f"model.layers.{i}.{GGUF_HF_NAMES[rest]}"
    mod, kind = rest.split(".")
    return f"model.layers.{i}.{GGUF_HF_NAMES[mod]}.{kind}"


def write_tiny_gguf(path, *, arch="llama", qtype="F32", tie=True, bias=False, seed=0, drop_keys=(),
                    skip_tensors=(), shapes=None, extra=None):
    """A tiny GGUF via gguf.GGUFWriter. 2-D weights stored as `qtype` (F32/F16/Q4_0/Q4_1/Q8_0), norms F32.
    `shapes` overrides a tensor's (rows, cols); `extra` adds name -> (array, raw_dtype or None)."""
    import gguf
    t = TINY
    W = tiny_hf_tensors(seed, tie=tie, bias=bias)
    w = gguf.GGUFWriter(str(path), arch)
    kv = {"block_count": t["layers"], "context_length": 256, "embedding_length": t["hidden"],
          "feed_forward_length": t["ff"], "attention.head_count": t["heads"],
          "attention.head_count_kv": t["kv_heads"], "rope.freq_base": 10000.0,
          "attention.layer_norm_rms_epsilon": 1e-5, "rope.dimension_count": t["head_dim"], "vocab_size": t["vocab"]}
    for k, v in kv.items():
        if f"{arch}.{k}" in drop_keys:
            continue
        (w.add_float32 if isinstance(v, float) else w.add_uint32)(f"{arch}.{k}", v)
    w.add_token_list([f"t{i}" for i in range(t["vocab"])])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = ["token_embd.weight", "output_norm.weight"] + ([] if tie else ["output.weight"])
    for i in range(t["layers"]):
        names += [f"blk.{i}.{n}.weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                    "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")]
        names += [f"blk.{i}.attn_{n}.bias" for n in "qkv"] if bias else []
    qt = gguf.GGMLQuantizationType[qtype]
    for name in names:
        if name in skip_tensors:
            continue
        a = W[gguf_to_hf_name(name)]
        if shapes and name in shapes:
            a = np.random.default_rng(1).standard_normal(shapes[name]).astype(np.float32)
        if a.ndim == 1 or qt == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, a)
        elif qt == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qt), raw_dtype=qt)
    for name, (a, raw) in (extra or {}).items():
        w.add_tensor(name, a, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, W


@pytest.fixture
def tiny_kit():
    """The tiny-model writers above, for test modules (they should not import conftest directly)."""
    import types
    return types.SimpleNamespace(TINY=TINY, hf_tensors=tiny_hf_tensors, hf_config=tiny_hf_config,
                                 write_gguf=write_tiny_gguf, gguf_to_hf_name=gguf_to_hf_name)


# ---- independent float64 oracle (tests/reference_forward.py), loaded once per session -------------------
@pytest.fixture(scope="session")
def reference_model(reference_gguf_path):
    """ReferenceModel (float64, dequantized once) of the reference GGUF."""
    from reference_forward import ReferenceModel
    return ReferenceModel.from_gguf(str(reference_gguf_path))
