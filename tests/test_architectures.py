"""llama, qwen2, qwen3, gemma3, smollm3 and phi3 through the whole engine (native runner) vs the independent float64
reference (tests/reference_forward.py), on tiny random-weight GGUF files and HF directories written by
tests/tiny_arch_models.py; smollm3 and phi3 also vs llama.cpp (llama-cpp-python 0.3.36 knows both) on the same file. gemma3 also through every serving path that touches its sliding-window
layers: chunked prefill, paged decode far past the window, prefix-cache hits, preemption + recompute."""
import dataclasses
import json

import numpy as np
import pytest

import tiny_arch_models as ta
from reference_forward import ReferenceModel
from tinyvllm import LLM, SamplingParams
from tinyvllm.model import ModelFormatError

NEAR_TIE = 0.02  # a reference top-2 logit gap below this may flip under quantized activations
PROMPT_IDS = [int(t) for t in np.random.default_rng(7).integers(3, 350, 40)]  # 40 tokens: 5x the window


def cosines(got, ref):
    return np.sum(got * ref, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))


def prefill_logits(llm, ids):
    runner, n = llm.engine.runner, len(ids)
    table = np.arange(-(-n // runner.block_size), dtype=np.int32)[None]
    return runner.forward(ids, np.arange(n), np.zeros(n), table, np.arange(n))


def teacher_forced(ref, prompt_ids, out_ids, label):
    """Each engine token must be the reference's argmax given the same prefix, except at near-ties
    (top-2 gap < NEAR_TIE), which are returned and printed so the run records them."""
    logits = ref.prefill_logits(list(prompt_ids) + list(out_ids))[len(prompt_ids) - 1:-1]
    ties = []
    for step, (row, tok) in enumerate(zip(logits, out_ids)):
        best = int(np.argmax(row))
        if tok != best:
            gap = float(row[best] - row[tok])
            assert gap < NEAR_TIE, f"{label}: step {step} chose {tok}, reference {best} (gap {gap:.4f})"
            ties.append({"label": label, "step": step, "engine": tok, "reference": best, "gap": gap})
            print(f"near-tie recorded: {ties[-1]}")
    return ties


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("arch-gguf")


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0"])
@pytest.mark.parametrize("arch", ta.ARCHS)
def test_gguf_matches_reference(gguf_dir, arch, qtype):
    """Prefill logits at every position (cosine > 0.999) and 24 greedy tokens (teacher-forced)."""
    path = ta.write_gguf(gguf_dir / f"{arch}-{qtype}.gguf", arch, qtype)
    llm, ref = LLM(path, threads=2), ReferenceModel.from_gguf(path)
    got, want = prefill_logits(llm, PROMPT_IDS), ref.prefill_logits(PROMPT_IDS)
    cos = cosines(got, want)
    print(f"{arch} {qtype}: worst cosine {cos.min():.7f}, max |diff| {np.abs(got - want).max():.4f}")
    assert cos.min() > 0.999
    out = llm.generate({"prompt_token_ids": PROMPT_IDS[:12]},
                       SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0].token_ids
    assert len(teacher_forced(ref, PROMPT_IDS[:12], out, f"{arch} {qtype}")) <= 1


def test_llama3_rope_freqs_gguf_matches_reference(gguf_dir):
    """Llama 3.x as llama.cpp converts it: the llama3 rope rescaling stored as per-frequency divisors in
    rope_freqs.weight. The divisors must reach the forward (logits differ from the unscaled file) and
    match the reference, which applies them once."""
    spec = ta.SPECS["llama"]
    factors = np.linspace(1.0, 8.0, spec.head_dim // 2)  # high frequencies kept, low ones slowed 8x
    scaled = ta.write_gguf(gguf_dir / "llama3-rope.gguf", "llama", "Q8_0", rope_freqs=factors)
    plain = ta.write_gguf(gguf_dir / "llama-plain.gguf", "llama", "Q8_0")
    llm = LLM(scaled, threads=2)
    got, want = prefill_logits(llm, PROMPT_IDS), ReferenceModel.from_gguf(scaled).prefill_logits(PROMPT_IDS)
    assert cosines(got, want).min() > 0.999
    unscaled = ReferenceModel.from_gguf(plain).prefill_logits(PROMPT_IDS)
    assert cosines(want, unscaled).min() < 0.99  # the factors change the answer: the check above can fail
    out = llm.generate({"prompt_token_ids": PROMPT_IDS[:12]},
                       SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0].token_ids
    assert len(teacher_forced(ReferenceModel.from_gguf(scaled), PROMPT_IDS[:12], out, "llama3 rope_freqs")) <= 1


def test_gguf_config_reading(gguf_dir):
    """What the loader reads from the tiny files: the features each architecture switches on."""
    from tinyvllm.model import load_model
    q3 = load_model(ta.write_gguf(gguf_dir / "q3.gguf", "qwen3", "F32")).config
    assert q3.qk_norm and not q3.post_norms and q3.head_dim == 32 and q3.q_size == 128 and not q3.rope_interleaved
    g3 = load_model(ta.write_gguf(gguf_dir / "g3.gguf", "gemma3", "F32")).config
    assert g3.post_norms and g3.ffn_act == "gelu_tanh" and g3.embed_scale == pytest.approx(8.0)
    assert g3.sliding_window == 8 and g3.swa_layers == (True, True, False) and g3.rope_theta_swa == 10000.0
    assert g3.attn_scale == pytest.approx(32 ** -0.5) and g3.tie_word_embeddings


@pytest.mark.parametrize("arch,dtype,new_style", [("qwen3", "float32", False), ("qwen3", "bfloat16", False),
                                                  ("smollm3", "float32", False), ("phi3", "float32", False),
                                                  ("gemma3", "float32", False), ("gemma3", "float32", True),
                                                  ("gemma3", "bfloat16", False)])
def test_hf_dir_matches_reference(tmp_path, arch, dtype, new_style):
    path = ta.write_hf_dir(tmp_path / "m", arch, dtype=dtype, new_style_config=new_style)
    llm, ref = LLM(path, threads=2), ReferenceModel.from_hf_dir(path)
    if arch == "gemma3":
        cfg = llm.engine.config
        assert cfg.attn_scale == pytest.approx(24 ** -0.5) and cfg.swa_layers == (True, True, False)
    got, want = prefill_logits(llm, PROMPT_IDS), ref.prefill_logits(PROMPT_IDS)
    assert cosines(got, want).min() > 0.999
    prompt = "the cat sat on the mat"
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    ids = out.outputs[0].token_ids
    assert not teacher_forced(ref, out.prompt_token_ids, ids, f"{arch} hf {dtype}")  # float weights: no flips
    assert ids == ref.greedy(out.prompt_token_ids, 24, eos_ids=[])[0]


def llamacpp_greedy(path, prompt_ids, n, n_ctx=256):
    """llama.cpp's own greedy continuation (argmax of its logits, token by token) of prompt_ids, and its
    logits at every prompt position."""
    from llama_cpp_plain import Llama
    lc = Llama(str(path), n_ctx=n_ctx, n_threads=2, n_threads_batch=2, logits_all=True, verbose=False)
    lc.eval(list(prompt_ids))
    prompt_logits = np.array(lc.scores[:len(prompt_ids)], dtype=np.float64)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(lc.scores[lc.n_tokens - 1])))
        lc.eval([out[-1]])
    return out, prompt_logits


@pytest.mark.parametrize("arch,n_ctx", [("smollm3", 256), ("phi3", 256), ("phi3", 512)])
def test_gguf_matches_llamacpp(gguf_dir, arch, n_ctx):
    """llama.cpp reads the same tiny F32 file (its own reading of the architecture): its logits match the
    float64 reference at every position, and its greedy tokens equal ours (F32 weights: no quantized
    activations on either side, so no near-ties to excuse). phi3 at a context of 256 (= its original
    context: LongRoPE's short factors) and 512 (the long ones), in llama.cpp and in the engine alike."""
    path = ta.write_gguf(gguf_dir / f"{arch}-llamacpp.gguf", arch, "F32")
    theirs, lc_logits = llamacpp_greedy(path, PROMPT_IDS, 24, n_ctx)
    assert cosines(lc_logits, ReferenceModel.from_gguf(path, n_ctx=n_ctx).prefill_logits(PROMPT_IDS)).min() > 0.999
    llm = LLM(path, threads=2, max_model_len=n_ctx)
    assert cosines(prefill_logits(llm, PROMPT_IDS), lc_logits).min() > 0.999  # greedy paths alone may agree by luck
    ours = llm.generate({"prompt_token_ids": PROMPT_IDS}, SamplingParams(
        temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0].token_ids
    assert ours == theirs


def test_smollm3_nope_layers(gguf_dir, tmp_path):
    """What the loaders read (every 4th layer without RoPE, llama's permuted Q/K in GGUF; no_rope_layers
    in HF), and that the NoPE layer matters: rotating it too changes the reference's logits from position
    1 on (position 0's rotation is the identity), so the reference checks above can fail."""
    from tinyvllm.model import load_model
    path = ta.write_gguf(gguf_dir / "smollm3-nope.gguf", "smollm3", "F32")
    cfg = load_model(path).config
    assert cfg.nope_layers == (False, False, False, True) and cfg.rope_interleaved
    hf = load_model(ta.write_hf_dir(tmp_path / "s3", "smollm3")).config
    assert hf.nope_layers == (False, False, False, True) and not hf.rope_interleaved
    ref = ReferenceModel.from_gguf(path)
    roped = ReferenceModel(dataclasses.replace(ref.cfg, nope=[]), ref.embed, ref.norm, ref.out, ref.layers)
    diff = np.abs(ref.prefill_logits(PROMPT_IDS[:12]) - roped.prefill_logits(PROMPT_IDS[:12])).max(axis=1)
    assert diff[0] < 1e-12 and diff[1:].min() > 1e-3


def test_phi3_reading(gguf_dir):
    """What the loader makes of a Phi-3 file: fused q|k|v and gate|up split into row views of the same
    (quantized) bytes, partial RoPE, the attn_factor, LongRoPE factors chosen by the served context, the
    file's sliding window left off as llama.cpp does. Each feature changes the reference's logits, so
    the reference and llama.cpp checks above can fail on any of them."""
    from tinyvllm.model import load_model
    spec = ta.SPECS["phi3"]
    w = load_model(ta.write_gguf(gguf_dir / "phi3-q4.gguf", "phi3", "Q4_0"))
    cfg = w.config
    assert (cfg.rope_dim, cfg.sliding_window, cfg.rope_interleaved) == (12, 0, False)
    assert cfg.rope_mscale == pytest.approx(1.25 ** 0.5) and cfg.rope_scaling["rope_type"] == "longrope"
    q, k, v = (w.tensors[f"blk.1.attn_{x}.weight"] for x in "qkv")
    gate, up = w.tensors["blk.1.ffn_gate.weight"], w.tensors["blk.1.ffn_up.weight"]
    assert (q.shape, k.shape, gate.shape, up.shape) == ((64, 64), (32, 64), (spec.ffn, 64), (spec.ffn, 64))
    for a, b in ((q, k), (k, v), (gate, up)):  # consecutive views of the mapped file: no copy, no dequantizing
        assert b.data.ctypes.data == a.data.ctypes.data + a.data.nbytes and a.data.base is not None
    short, long = ta.longrope_factors(spec)
    base = 1.0 / 10000.0 ** (np.arange(0, 12, 2) / 12)
    for n, f in ((256, short), (257, long)):
        cfg.serve_len = n
        np.testing.assert_allclose(cfg.rope_inv_freq(), base / f, rtol=1e-6)
    path = ta.write_gguf(gguf_dir / "phi3-f32.gguf", "phi3", "F32")
    ref = ReferenceModel.from_gguf(path, n_ctx=256)
    want = ref.prefill_logits(PROMPT_IDS)
    variant = lambda **change: ReferenceModel(dataclasses.replace(ref.cfg, **change), ref.embed, ref.norm, ref.out,
                                              ref.layers).prefill_logits(PROMPT_IDS)
    for change in (dict(mscale=1.0), dict(window=8, swa=[True] * spec.layers)):
        assert cosines(want, variant(**change)).min() < 0.999, change
    assert cosines(variant(rope_scaling=None), variant(rope_scaling=None, rot=16)).min() < 0.999  # partial RoPE
    assert cosines(want, ReferenceModel.from_gguf(path, n_ctx=512).prefill_logits(PROMPT_IDS)).min() < 0.999


def test_reference_window_is_exercised(gguf_dir):
    """The test models really depend on the window: without it the reference's logits change exactly
    from the first position that has a key out of the window (position 8) on."""
    ref = ReferenceModel.from_gguf(ta.write_gguf(gguf_dir / "g3w.gguf", "gemma3", "F32"))
    full = ReferenceModel(dataclasses.replace(ref.cfg, window=10**9), ref.embed, ref.norm, ref.out, ref.layers)
    a, b = ref.prefill_logits(PROMPT_IDS[:20]), full.prefill_logits(PROMPT_IDS[:20])
    diff = np.abs(a - b).max(axis=1)
    assert diff[:8].max() < 1e-12 and diff[8:].min() > 1e-3


# ---- gemma3 through the serving paths -----------------------------------------------------------------
SYSTEM = [int(t) for t in np.random.default_rng(3).integers(3, 350, 37)]  # shared prefix: > 2 blocks of 16
PROMPTS = [SYSTEM + [int(t) for t in np.random.default_rng(10 + i).integers(3, 350, n)]
           for i, n in enumerate([3, 9, 1, 14])] + [[int(t) for t in np.random.default_rng(20 + i).integers(3, 350, n)]
                                                   for i, n in enumerate([5, 23])]
LENGTHS = [30, 12, 40, 20, 45, 16]  # decode well past the window of 8


@pytest.fixture(scope="module")
def gemma3(gguf_dir):
    path = ta.write_gguf(gguf_dir / "gemma3-serving.gguf", "gemma3", "Q8_0")
    return path, ReferenceModel.from_gguf(path)


def run(llm, prompts=PROMPTS):
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=n) for n in LENGTHS[:len(prompts)]]
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


@pytest.fixture(scope="module")
def gemma3_alone(gemma3):
    """Each request alone, whole prompt in one step, no prefix cache: checked against the reference."""
    path, ref = gemma3
    llm = LLM(path, threads=2, enable_prefix_caching=False)
    outs = [run(llm, [p])[0] if i == 0 else
            llm.generate({"prompt_token_ids": p}, SamplingParams(temperature=0, ignore_eos=True, max_tokens=n))[0]
            .outputs[0].token_ids for i, (p, n) in enumerate(zip(PROMPTS, LENGTHS))]
    ties = []
    for i, (p, o) in enumerate(zip(PROMPTS, outs)):
        ties += teacher_forced(ref, p, o, f"gemma3 request {i}")
    assert len(ties) <= 2, ties
    return outs


@pytest.mark.parametrize("chunk,prefix,kv_blocks,block_size", [
    (2048, False, None, 16), (5, False, None, 16), (2048, True, None, 16), (7, True, None, 16),
    (7, True, 12, 16), (2048, False, 12, 16), (6, True, 40, 4), (2048, True, None, 4)])
def test_gemma3_serving_paths_equal_alone(gemma3, gemma3_alone, chunk, prefix, kv_blocks, block_size):
    """6 concurrent requests: chunked prefill with chunks shorter than the window, prefix caching on/off,
    a KV pool small enough to force preemption (recompute), blocks smaller than the window (4) and
    larger (16). Every path gives each request the tokens it gets alone."""
    path, _ = gemma3
    kv = None if kv_blocks is None else kv_blocks * ta.SPECS["gemma3"].layers * 2 * block_size * 32 * 2
    llm = LLM(path, threads=2, max_num_batched_tokens=chunk, enable_prefix_caching=prefix, kv_cache_bytes=kv,
              block_size=block_size)
    assert run(llm) == gemma3_alone
    eng = llm.engine
    if kv_blocks:
        assert eng.scheduler.blocks.num_blocks == kv_blocks and eng.scheduler.num_preemptions > 0
    stats = eng.scheduler.blocks.prefix_cache_stats
    if prefix and chunk < 2048:
        assert stats["hit_tokens"] > 0
    if not prefix:
        assert stats["hit_tokens"] == 0
    assert eng.scheduler.blocks.num_free_blocks == eng.scheduler.blocks.num_blocks and eng.scheduler.blocks.num_seqs == 0


def test_gemma3_prefix_hit_equals_recompute(gemma3):
    """A second identical request is served mostly from the prefix cache (its sliding layers read cached
    keys that are partly out of the window) and must give the same tokens."""
    path, _ = gemma3
    llm = LLM(path, threads=2)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    first = llm.generate({"prompt_token_ids": PROMPTS[3]}, params)[0]
    before = llm.engine.scheduler.blocks.prefix_cache_stats["hit_tokens"]
    second = llm.generate({"prompt_token_ids": PROMPTS[3]}, params)[0]
    assert llm.engine.scheduler.blocks.prefix_cache_stats["hit_tokens"] - before == (len(PROMPTS[3]) - 1) // 16 * 16 > 0
    assert second.outputs[0].token_ids == first.outputs[0].token_ids


@pytest.mark.parametrize("arch", ["gemma3", "smollm3", "phi3"])
def test_decode_logits_bit_identical_to_prefill(gguf_dir, arch):
    """Batch invariance with sliding layers, NoPE layers, partial RoPE + LongRoPE: the logits of position p
    decoded one token at a time equal those of one prefill over all positions, bit for bit."""
    path = ta.write_gguf(gguf_dir / f"{arch}-serving.gguf", arch, "Q8_0")
    llm = LLM(path, threads=2)
    r, ids = llm.engine.runner, PROMPT_IDS[:30]
    full = prefill_logits(llm, ids)
    table = np.array([[5, 1, 3, 0]], dtype=np.int32)  # another physical layout
    inc = [r.forward(ids[:11], np.arange(11), np.zeros(11), table, [10])[0]]
    for p in range(11, 30):
        inc.append(r.forward([ids[p]], [p], [0], table, [0])[0])
    np.testing.assert_array_equal(np.stack(inc), full[10:])


# ---- bad input ------------------------------------------------------------------------------------------
def test_unsupported_arch_names_supported(tmp_path):
    import gguf
    path = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(path), "phi2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ModelFormatError, match="unsupported architecture 'phi2'.*gemma3.*qwen3"):
        LLM(str(path))
    d = tmp_path / "hf"
    ta.write_hf_dir(d, "qwen3")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "falcon"}))
    with pytest.raises(ModelFormatError, match="unsupported architecture 'falcon'.*gemma3"):
        LLM(str(d))


def test_gemma3_bad_files(tmp_path):
    import gguf
    # a multimodal Gemma 3 config, an unknown activation, a missing post norm, a norm qwen3 does not have
    d = ta.write_hf_dir(tmp_path / "g", "gemma3")
    cfg = json.loads(open(f"{d}/config.json").read())
    open(f"{d}/config.json", "w").write(json.dumps({"model_type": "gemma3", "text_config": cfg}))
    with pytest.raises(ModelFormatError, match="multimodal Gemma 3"):
        LLM(d)
    open(f"{d}/config.json", "w").write(json.dumps({**cfg, "hidden_activation": "relu"}))
    with pytest.raises(ModelFormatError, match="hidden_activation"):
        LLM(d)
    path = ta.write_gguf(tmp_path / "g.gguf", "gemma3", "F32")
    r = gguf.GGUFReader(path)
    w = gguf.GGUFWriter(str(tmp_path / "g2.gguf"), "gemma3")
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        v = f.contents()
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_array(k, v)
        else:
            w.add_key_value(k, v, f.types[0])
    for t in r.tensors:
        if t.name != "blk.1.post_ffw_norm.weight":
            w.add_tensor(t.name, np.array(t.data), raw_shape=list(reversed([int(x) for x in t.shape])),
                         raw_dtype=t.tensor_type)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ModelFormatError, match="missing tensor 'blk.1.post_ffw_norm.weight'"):
        LLM(str(tmp_path / "g2.gguf"))


@pytest.mark.parametrize("arch", ["qwen3", "gemma3", "smollm3", "phi3"])
def test_tinygrad_runner_refuses_new_archs(gguf_dir, arch):
    """device='tinygrad' implements the LLaMA block only: qwen3/gemma3 are refused up front, naming what
    it runs and where these run (checked before tinygrad is imported, so this runs without it)."""
    from tinyvllm.model import load_model
    from tinyvllm.runner.tinygrad_runner import TinygradModelRunner
    weights = load_model(ta.write_gguf(gguf_dir / f"tg-{arch}.gguf", arch, "F32"))
    with pytest.raises(NotImplementedError, match=f"runs llama, qwen2 models; '{arch}' runs on device='cpu'"):
        TinygradModelRunner(weights, num_blocks=4)


_BUDGET_CHILD = r"""
import json, sys
import numpy, cffi, gguf, tokenizers, sentencepiece, jinja2, safetensors  # the interpreter's share
from tinyvllm import LLM, SamplingParams
from tinyvllm.engine.memory import rss_bytes

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

rss_bytes()
base = status("VmRSS")
llm = LLM(sys.argv[1], threads=2, memory_budget=sys.argv[2], max_num_seqs=16, max_num_batched_tokens=128)
e = llm.engine
for i in range(16):
    e.add_request(None, {"prompt_token_ids": list(range(3 + i, 40 + i))},
                  SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
done = 0
while e.has_unfinished_requests():
    done += sum(o.finished and len(o.outputs[0].token_ids) == 24 for o in e.step())
print(json.dumps(dict(grown=status("VmHWM") - base, done=done, vocab=e.config.vocab_size)))
"""


def test_gemma3_vocab_262144_within_memory_budget(gguf_dir):
    """Gemma 3's 262,144-token vocabulary: 16 sequences sample from [16, 262144] logits, and the process's
    peak resident growth (loading included: GGUFReader's per-element objects once peaked at 281 MB here,
    before string and numeric arrays were read packed) stays under the budget."""
    import subprocess
    import sys
    from tinyvllm.engine.memory import parse_bytes
    path = ta.write_gguf(gguf_dir / "gemma3-262k.gguf", "gemma3", "Q8_0", vocab=262144)
    # 190 MB: the plan reserves 4 logits rows of 262,144 per sequence slot (sampled rows, prompt-logprob
    # rows, the sampler's copies): 64 MiB of the budget at 16 sequences
    r = subprocess.run([sys.executable, "-c", _BUDGET_CHILD, path, "190MB"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["vocab"] == 262144 and m["done"] == 16, m
    assert m["grown"] <= parse_bytes("190MB"), f"peak resident growth {m['grown'] / 2**20:.1f} MiB > 190MB"
