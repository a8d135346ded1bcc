"""Every malformed model must fail with a ModelFormatError that says what is wrong, never crash."""
import json
import os
import subprocess
import sys
import threading

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

from tinyvllm.model import ModelFormatError, ModelNotFoundError, load_model


def _copy_prefix(src, dst, n):
    with open(src, "rb") as f:
        dst.write_bytes(f.read(n))
    return dst


def _patch(path, offset, data: bytes):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _tensor_info_offsets(path, name):
    """(file offset of the tensor's type id, of its data offset) inside its tensor-info record."""
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    type_at = t.field.offset + sum(int(p.nbytes) for p in t.field.parts[:4])
    return type_at, type_at + 4


# ---- GGUF ---------------------------------------------------------------------------------------------
def _truncations(ref_path):
    size = os.path.getsize(ref_path)
    return {"10B": 10, "1KB": 1024, "in-vocab": 600_000, "tensor-data-middle": size // 2, "last-byte": size - 1}


@pytest.mark.parametrize("where", ["10B", "1KB", "in-vocab", "tensor-data-middle", "last-byte"])
def test_truncated_reference_gguf(tmp_path, reference_gguf_path, where):
    p = _copy_prefix(reference_gguf_path, tmp_path / f"cut_{where}.gguf", _truncations(reference_gguf_path)[where])
    with pytest.raises(ModelFormatError, match=r"cut_.*(too small|truncated)"):
        load_model(p)


def test_empty_file(tmp_path):
    (tmp_path / "e.gguf").write_bytes(b"")
    with pytest.raises(ModelFormatError, match="too small"):
        load_model(tmp_path / "e.gguf")


def test_bad_magic(tmp_path, tiny_kit):
    p, _ = tiny_kit.write_gguf(tmp_path / "m.gguf")
    _patch(p, 0, b"GGML")
    with pytest.raises(ModelFormatError, match=r"m\.gguf: bad magic b'GGML'"):
        load_model(p)


def test_tensor_offset_past_end(tmp_path, tiny_kit):
    p, _ = tiny_kit.write_gguf(tmp_path / "m.gguf")
    _, off_at = _tensor_info_offsets(p, "blk.1.ffn_up.weight")
    _patch(p, off_at, np.uint64(1 << 40).tobytes())
    with pytest.raises(ModelFormatError, match=r"'blk\.1\.ffn_up\.weight' data .* past the end"):
        load_model(p)


def test_tensor_offset_misaligned(tmp_path, tiny_kit):
    p, _ = tiny_kit.write_gguf(tmp_path / "m.gguf")
    _, off_at = _tensor_info_offsets(p, "blk.0.attn_q.weight")
    _patch(p, off_at, np.uint64(3).tobytes())
    with pytest.raises(ModelFormatError, match="not 32-byte aligned"):
        load_model(p)


def test_unknown_type_id(tmp_path, tiny_kit):
    p, _ = tiny_kit.write_gguf(tmp_path / "m.gguf")
    type_at, _ = _tensor_info_offsets(p, "blk.0.attn_k.weight")
    _patch(p, type_at, np.uint32(99).tobytes())
    with pytest.raises(ModelFormatError, match=r"'blk\.0\.attn_k\.weight' has unsupported type unknown type id 99"):
        load_model(p)


def test_unsupported_quant_type(tmp_path, tiny_kit):
    iq2 = np.zeros((1, 66), np.uint8)  # one IQ2_XXS super-block: 256 values in 66 bytes
    p, _ = tiny_kit.write_gguf(tmp_path / "m.gguf", extra={"blk.0.extra.weight": (iq2, gguf.GGMLQuantizationType.IQ2_XXS)})
    with pytest.raises(ModelFormatError, match=r"'blk\.0\.extra\.weight' has unsupported type IQ2_XXS "
                                               r"\(supported: F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, "
                                               r"Q4_K, Q5_K, Q6_K, IQ4_NL, BF16\)"):
        load_model(p)


def test_wrong_shape(tmp_path, tiny_kit):
    p, _ = tiny_kit.write_gguf(tmp_path / "m.gguf", shapes={"blk.1.attn_q.weight": (64, 32)})
    with pytest.raises(ModelFormatError, match=r"'blk\.1\.attn_q\.weight' has shape \[64, 32\], expected \[64, 64\]"):
        load_model(p)


def test_missing_tensor(tmp_path, tiny_kit):
    p, _ = tiny_kit.write_gguf(tmp_path / "m.gguf", skip_tensors={"blk.1.ffn_down.weight"})
    with pytest.raises(ModelFormatError, match=r"missing tensor 'blk\.1\.ffn_down\.weight'"):
        load_model(p)


def test_unexpected_layer_tensor(tmp_path, tiny_kit):
    bias = np.zeros(64, np.float32)  # an o_proj bias would be silently dropped by the runner: refuse it
    p, _ = tiny_kit.write_gguf(tmp_path / "m.gguf", extra={"blk.0.attn_output.bias": (bias, None)})
    with pytest.raises(ModelFormatError, match=r"unexpected tensor 'blk\.0\.attn_output\.bias'"):
        load_model(p)


@pytest.mark.parametrize("key", ["llama.block_count", "llama.embedding_length", "llama.attention.head_count",
                                 "llama.attention.layer_norm_rms_epsilon", "llama.context_length"])
def test_missing_metadata_key(tmp_path, tiny_kit, key):
    p, _ = tiny_kit.write_gguf(tmp_path / "m.gguf", drop_keys={key})
    with pytest.raises(ModelFormatError, match=rf"m\.gguf: GGUF metadata is missing required key '{key}'"):
        load_model(p)


def test_unsupported_architecture(tmp_path, tiny_kit):
    p, _ = tiny_kit.write_gguf(tmp_path / "m.gguf", arch="gpt2")
    with pytest.raises(ModelFormatError, match="unsupported architecture 'gpt2'"):
        load_model(p)


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"hello world, this is not a model at all")
    with pytest.raises(ModelFormatError, match="bad magic"):
        load_model(tmp_path / "x.bin")


# ---- HF -------------------------------------------------------------------------------------------------
def _hf_dir(d, tiny_kit, cfg=None, tensors=None):
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg or tiny_kit.hf_config()))
    save_file(tensors or tiny_kit.hf_tensors(), str(d / "model.safetensors"))
    return d


def test_hf_config_missing_key(tmp_path, tiny_kit):
    cfg = tiny_kit.hf_config()
    del cfg["num_hidden_layers"]
    with pytest.raises(ModelFormatError, match=r"config\.json: config\.json is missing required key 'num_hidden_layers'"):
        load_model(_hf_dir(tmp_path / "hf", tiny_kit, cfg=cfg))


def test_hf_config_not_json(tmp_path, tiny_kit):
    d = _hf_dir(tmp_path / "hf", tiny_kit)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="invalid JSON"):
        load_model(d)


def test_hf_wrong_shape(tmp_path, tiny_kit):
    W = tiny_kit.hf_tensors()
    W["model.layers.1.mlp.up_proj.weight"] = np.zeros((96, 32), np.float32)
    with pytest.raises(ModelFormatError, match=r"'blk\.1\.ffn_up\.weight' has shape \[96, 32\], expected \[96, 64\]"):
        load_model(_hf_dir(tmp_path / "hf", tiny_kit, tensors=W))


def test_hf_missing_tensor(tmp_path, tiny_kit):
    W = tiny_kit.hf_tensors()
    del W["model.layers.0.self_attn.v_proj.weight"]
    with pytest.raises(ModelFormatError, match=r"missing tensor 'blk\.0\.attn_v\.weight'"):
        load_model(_hf_dir(tmp_path / "hf", tiny_kit, tensors=W))


def test_hf_missing_shard(tmp_path, tiny_kit):
    d = _hf_dir(tmp_path / "hf", tiny_kit)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelFormatError, match="shard model-00002-of-00002.safetensors is missing"):
        load_model(d)


def test_hf_corrupt_safetensors(tmp_path, tiny_kit):
    d = _hf_dir(tmp_path / "hf", tiny_kit)
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[:5000])
    with pytest.raises(ModelFormatError, match="model.safetensors"):
        load_model(d)


def test_hf_unsupported_dtype(tmp_path, tiny_kit):
    W = tiny_kit.hf_tensors()
    W["model.norm.weight"] = W["model.norm.weight"].astype(np.float64)
    with pytest.raises(ModelFormatError, match="'model.norm.weight' has unsupported dtype F64"):
        load_model(_hf_dir(tmp_path / "hf", tiny_kit, tensors=W))


def test_dir_without_model(tmp_path):
    with pytest.raises(ModelFormatError, match="neither a .gguf file nor a directory with config.json"):
        load_model(tmp_path)


def test_nonexistent_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="model path does not exist: .*nope.gguf"):
        load_model(tmp_path / "nope.gguf")


# ---- all of the above in a fresh interpreter: errors, not crashes ---------------------------------------
def test_malformed_files_do_not_crash_the_process(tmp_path, reference_gguf_path, tiny_kit):
    cases = [_copy_prefix(reference_gguf_path, tmp_path / f"cut{n}.gguf", n)
             for n in _truncations(reference_gguf_path).values()]
    p, _ = tiny_kit.write_gguf(tmp_path / "off.gguf")
    _patch(p, _tensor_info_offsets(p, "token_embd.weight")[1], np.uint64(1 << 60).tobytes())
    cases.append(p)
    p, _ = tiny_kit.write_gguf(tmp_path / "type.gguf")
    _patch(p, _tensor_info_offsets(p, "token_embd.weight")[0], np.uint32(12345).tobytes())
    cases.append(p)
    p, _ = tiny_kit.write_gguf(tmp_path / "garbage.gguf")
    data = bytearray(p.read_bytes())  # random bytes over the kv section: counts and lengths become nonsense
    data[24:400] = np.random.default_rng(0).integers(0, 256, 376, dtype=np.uint8).tobytes()
    p.write_bytes(bytes(data))
    cases.append(p)
    script = (
        "import sys\nfrom tinyvllm.model import load_model, ModelFormatError\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n        load_model(p)\n    except ModelFormatError as e:\n        print('ERR', str(e)[:200])\n"
        "    else:\n        print('LOADED', p)\n")
    import tinyvllm
    pkg_root = os.path.dirname(os.path.dirname(tinyvllm.__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([pkg_root, *sys.path]))
    r = subprocess.run([sys.executable, "-c", script, *map(str, cases)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == len(cases) and all(line.startswith("ERR") for line in lines), r.stdout
    print(r.stdout)


def test_fused_split_walks_the_files_layers_not_the_claimed_count():
    """A header claiming 2^40 layers once made the Phi-3 fused-tensor split loop over every claimed layer
    before validation could refuse the count (the CI fuzz subset hung there). The split now visits only
    the layers the file names; validation then rejects the count."""
    from types import SimpleNamespace
    from tinyvllm.model.weights import WeightTensor, split_fused
    cfg = SimpleNamespace(num_layers=2**40, q_size=4, kv_size=2, intermediate_size=3, arch="phi3")
    qkv = WeightTensor("blk.0.attn_qkv.weight", 0, (8, 4), np.zeros((8, 4), np.float32))
    up = WeightTensor("blk.0.ffn_up.weight", 0, (6, 4), np.zeros((6, 4), np.float32))
    tensors = {"blk.0.attn_qkv.weight": qkv, "blk.0.ffn_up.weight": up,
               "blk.99999999999999.ffn_up.weight": up}  # a name past any real layer count
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=split_fused(cfg, tensors)), daemon=True)
    worker.start()
    worker.join(timeout=30)  # the old loop would run for days: fail, don't hang the suite
    assert "out" in result, "split_fused walked the claimed layer count"
    out = result["out"]
    assert [out[f"blk.0.attn_{p}.weight"].shape[0] for p in "qkv"] == [4, 2, 2]
    assert out["blk.0.ffn_gate.weight"].shape[0] == out["blk.0.ffn_up.weight"].shape[0] == 3
