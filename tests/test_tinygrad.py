"""The tinygrad runner (device="tinygrad", tinygrad's CPU device here) against the native path and the
float64 oracle: greedy tokens with paging, batching and chunked prefill; JIT replay without
recompiling; copy-on-write blocks; preemption; and tinyvllm without tinygrad installed."""
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

import tiny_models as tm
from child_process import child_env, python_cmd
from reference_forward import ReferenceModel
from test_generate import CHATS, RAW, teacher_forced_check
from tinyvllm import LLM, SamplingParams

# tinygrad is an optional extra (pip install tinyvllm[gpu], Python >= 3.11) and its CPU device compiles with
# clang; without them only the last test (which blocks tinygrad anyway) runs, and the run says so (conftest.py:
# under TINYVLLM_REQUIRE_FEATURES=1 they fail instead).
_CPU_DEVICE = os.environ.get("DEV", "CPU").upper() in ("CPU", "CPU:CLANG")
needs_tinygrad = pytest.mark.requires_feature(
    "tinygrad", covers="device='tinygrad' (the tinygrad runner: greedy vs native and float64, JIT replay, "
    "copy-on-write blocks, preemption)", modules=("tinygrad",), programs=("clang",) if _CPU_DEVICE else (),
    min_python=(3, 11))

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
# chunked prefill (prompts are 30-60 tokens), four sequences per step, a small paged pool
ENGINE = dict(threads=2, max_num_batched_tokens=32, max_num_seqs=4, kv_cache_bytes=48 * 2**20)


@pytest.fixture(scope="module")
def tg_llm(reference_gguf_path):
    llm = LLM(str(reference_gguf_path), device="tinygrad", **ENGINE)
    # one graph for every step of this test: each extra bucket costs ~30 s of tracing on 2 busy cores
    llm.engine.runner.min_tokens, llm.engine.runner.min_rows = ENGINE["max_num_batched_tokens"], ENGINE["max_num_seqs"]
    return llm


@needs_tinygrad
def test_reference_model_greedy_matches_native_and_float64(tg_llm, reference_gguf_path, reference_model):
    from tinygrad.codegen import to_program_cache  # every kernel tinygrad lowers and compiles lands here
    native = LLM(str(reference_gguf_path), **ENGINE)
    prompts = [tg_llm._chat_prompt(c) for c in CHATS] + [{"prompt_token_ids": tg_llm.tokenizer.encode(p)} for p in RAW]
    assert max(len(p["prompt_token_ids"]) for p in prompts) > ENGINE["max_num_batched_tokens"]  # really chunked
    got, want = tg_llm.generate(prompts, GREEDY), native.generate(prompts, GREEDY)
    ties = []
    for p, g in zip(prompts, got):
        assert len(g.outputs[0].token_ids) == GREEDY.max_tokens
        ties += teacher_forced_check(reference_model, p["prompt_token_ids"], g.outputs[0].token_ids, repr(p)[:40])
    assert not ties  # fp32 activations on tinygrad: not even a near-tie flip on these prompts
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    # the whole run, prefill chunks and decodes, was one captured graph; the chat below compiles nothing
    assert list(tg_llm.engine.runner.jits) == [(32, 8, 4)]
    compiled = len(to_program_cache)
    answer = tg_llm.chat(CHATS[0], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    assert answer.text == "The capital of France is Paris." and answer.finish_reason == "stop"
    assert len(to_program_cache) == compiled


@needs_tinygrad
def test_decode_steps_replay_the_jit_without_compiling(tmp_path):
    """Default buckets. Once a decode bucket is captured, steps with other tokens, positions, slots and
    block tables compile nothing: tinygrad's program cache does not grow and the graph is replayed.
    Every step's logits are checked against the float64 oracle on the same token sequences."""
    from tinygrad.codegen import to_program_cache
    from tinyvllm.model import load_model
    from tinyvllm.runner import TinygradModelRunner
    path = tm.make_tiny_gguf(tmp_path / "m.gguf", qtype="Q4_1")
    runner, ref = TinygradModelRunner(load_model(path), num_blocks=32), ReferenceModel.from_gguf(path)
    rng = np.random.default_rng(0)
    tables = np.array([[5, 9, 2, 30], [11, 3, 7, 8], [1, 4, 6, 10]], dtype=np.int32)
    seqs = [list(rng.integers(0, runner.config.vocab_size, n)) for n in (20, 9, 3)]
    flat = [t for s in seqs for t in s]
    pos = [p for s in seqs for p in range(len(s))]
    sid = [i for i, s in enumerate(seqs) for _ in s]
    ends = list(np.cumsum([len(s) for s in seqs]) - 1)
    logits = runner.forward(flat, pos, sid, tables, ends)  # prefill all three (a 32-token bucket)
    compiled, key = None, runner.bucket_key(3, 3, 40)
    for step in range(6):
        for s, row in zip(seqs, logits):
            want = ref.prefill_logits(s)[-1]
            assert np.argmax(row) == np.argmax(want) and np.abs(row - want).max() < 1e-3 * np.abs(want).max()
            s.append(int(np.argmax(row)))
        logits = runner.forward([s[-1] for s in seqs], [len(s) - 1 for s in seqs], [0, 1, 2], tables, [0, 1, 2])
        if step == 0:  # the first decode step captured the bucket: from here on, nothing new may compile
            compiled, replays = len(to_program_cache), runner.jits[key].cnt
    assert len(to_program_cache) == compiled, "a decode step recompiled"
    assert runner.jits[key].cnt == replays + 5 and runner.jits[key].captured is not None
    assert set(runner.jits) == {runner.bucket_key(32, 3, 19), key}


@needs_tinygrad
def test_tiny_hf_qwen2_half_split_rope_matches_native_and_reference(tmp_path):
    """HF safetensors dir: half-split RoPE, qwen2 q/k/v biases, untied lm_head, float weights."""
    path = tm.make_tiny_hf_dir(tmp_path / "m", tokenizer="json", dtype="float32", arch="qwen2", tie=False)
    kw = dict(threads=2, max_num_batched_tokens=8, max_num_seqs=4)
    tg, nat = LLM(path, device="tinygrad", **kw), LLM(path, **kw)
    ref = ReferenceModel.from_hf_dir(path)
    prompts = ["the cat sat on the mat", "once upon a time 42"]
    got, want = tg.generate(prompts, GREEDY), nat.generate(prompts, GREEDY)
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.outputs[0].token_ids == ref.greedy(g.prompt_token_ids, GREEDY.max_tokens, eos_ids=[])[0]


@needs_tinygrad
def test_copy_block_and_preemption_on_tiny_gguf(tmp_path):
    """Q4_1 GGUF (interleaved RoPE, tied embedding): copy-on-write blocks and preemption by recompute."""
    path = tm.make_tiny_gguf(tmp_path / "m.gguf", qtype="Q4_1")
    from tinyvllm.model import load_model
    from tinyvllm.runner import TinygradModelRunner
    block_bytes = TinygradModelRunner.kv_bytes_per_block(load_model(path).config, 16, "float16")
    tight = LLM(path, device="tinygrad", threads=2, max_num_seqs=4, max_num_batched_tokens=64,
                kv_cache_bytes=7 * block_bytes)
    runner = tight.engine.runner
    assert runner.num_blocks == 6 and runner.kv_cache_bytes == 7 * block_bytes  # its padding block is paid for
    runner.min_tokens, runner.min_rows = 64, 4  # one graph for every step below (fewer captures)
    prompts = [f"the cat sat on the mat {i} times" for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    got, want = tight.generate(prompts, params), LLM(path, threads=2).generate(prompts, params)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    # copy_block: a sequence read through a copied block gives the same logits as through the original
    ids = list(range(3, 23))
    full = runner.forward(ids, np.arange(20), np.zeros(20), np.array([[0, 1]]), [19])
    runner.copy_block(1, 4)
    nxt = [runner.forward([7], [20], [0], np.array([[0, t]]), [0]) for t in (1, 4)]
    assert np.array_equal(nxt[0], nxt[1]) and np.isfinite(full).all()
    runner.copy_block(5, 4)  # overwrite the copy with another block: now the logits must differ
    assert not np.array_equal(runner.forward([7], [20], [0], np.array([[0, 4]]), [0]), nxt[0])
    runner.copy_block(1, 4)  # third call: the copy's JIT replays its captured graph
    assert runner._copy_jit.cnt == 3
    assert np.array_equal(runner.forward([7], [20], [0], np.array([[0, 4]]), [0]), nxt[0])
    with pytest.raises(ValueError, match="out of range"):
        runner.copy_block(0, 6)
    with pytest.raises(ValueError, match="token ids must be in"):
        runner.forward([10**6], [0], [0], np.array([[0]]), [0])
    with pytest.raises(ValueError, match="must increase"):
        runner.forward([1, 2], [3, 3], [0, 0], np.array([[0]]), [1])


def test_tinyvllm_works_without_tinygrad(tmp_path):
    """tinygrad blocked at import: tinyvllm and the CPU path work, device='tinygrad' says how to install."""
    path = tm.make_tiny_gguf(tmp_path / "m.gguf", qtype="Q8_0")
    code = textwrap.dedent(f"""
        import sys
        sys.modules["tinygrad"] = None  # import tinygrad -> ImportError, as if not installed
        import tinyvllm
        from tinyvllm import LLM, SamplingParams
        out = LLM({path!r}, threads=1).generate("the cat", SamplingParams(temperature=0, max_tokens=4))
        assert len(out[0].outputs[0].token_ids) == 4
        assert not any(m == "tinygrad" or m.startswith("tinygrad.") for m in sys.modules if sys.modules[m])
        try:
            LLM({path!r}, device="tinygrad")
        except ImportError as e:
            print("ERROR:", e)
    """)
    run = subprocess.run(python_cmd(code), capture_output=True, text=True, env=child_env(), timeout=120)
    assert run.returncode == 0, run.stderr
    assert "pip install tinyvllm[gpu]" in run.stdout and "Python >= 3.11" in run.stdout and "clang" in run.stdout
    with pytest.raises(ValueError, match="unknown device"):
        LLM(path, device="cuda")
    # the package supports Python 3.10 (tinygrad does not): the runner files must parse as 3.10
    import ast
    for f in sorted((Path(__file__).parents[1] / "tinyvllm" / "runner").glob("*.py")):
        ast.parse(f.read_text(), str(f), feature_version=(3, 10))
