"""Engine behaviour on the reference model: batching, streaming, stops, n, logprobs, abort, errors."""
import subprocess
import sys

import pytest

from tinyvllm import LLM, SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(reference_gguf_path):
    return LLM(str(reference_gguf_path), threads=2, max_num_batched_tokens=64)


def test_batched_equals_alone(llm):
    prompts = ["Hello, my name is", "The weather today", "1, 2, 3, 4,", "In the beginning"]
    params = SamplingParams(max_tokens=20, **GREEDY)
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    alone = [llm.generate(p, params)[0].outputs[0].token_ids for p in prompts]
    assert together == alone


def test_chunked_prefill_equals_whole_prefill(llm, reference_gguf_path):
    """A prompt longer than max_num_batched_tokens (64) runs in chunks; same tokens as one chunk."""
    prompt = " ".join(f"item {i}:" for i in range(40))
    params = SamplingParams(max_tokens=16, **GREEDY)
    chunked = llm.generate(prompt, params)[0]
    assert len(chunked.prompt_token_ids) > 64
    whole = LLM(str(reference_gguf_path), threads=2, max_num_batched_tokens=512).generate(prompt, params)[0]
    assert chunked.outputs[0].token_ids == whole.outputs[0].token_ids


def test_streaming_text_equals_generate_text(llm):
    for prompt in ["Tell me about Paris.", "日本語: こんにちは、", "Emoji time: 🎉"]:
        params = SamplingParams(max_tokens=32, **GREEDY)
        pieces = list(llm.stream(prompt, params))
        assert len(pieces) > 1
        assert "".join(pieces) == llm.generate(prompt, params)[0].outputs[0].text
        assert all("\ufffd" not in p for p in pieces)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert "".join(llm.stream_chat(chat, SamplingParams(temperature=0, max_tokens=48))) == \
        llm.chat(chat, SamplingParams(temperature=0, max_tokens=48))[0].outputs[0].text


def test_stop_string_and_stop_token(llm):
    base = llm.generate("Paris is the capital of", SamplingParams(max_tokens=24, **GREEDY))[0].outputs[0]
    word = base.text.split()[2]  # a word from the middle of the answer
    out = llm.generate("Paris is the capital of", SamplingParams(max_tokens=24, stop=[word], **GREEDY))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == word
    assert out.text == base.text[:base.text.index(word)]
    kept = llm.generate("Paris is the capital of", SamplingParams(max_tokens=24, stop=word,
                                                                   include_stop_str_in_output=True, **GREEDY))[0]
    assert kept.outputs[0].text == base.text[:base.text.index(word) + len(word)]
    tok = base.token_ids[3]
    out = llm.generate("Paris is the capital of", SamplingParams(max_tokens=24, stop_token_ids=[tok], **GREEDY))[0]
    assert out.outputs[0].token_ids == base.token_ids[:4] and out.outputs[0].stop_reason == tok


def test_eos_stops_unless_ignored(llm):
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(chat, SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in llm.tokenizer.eos_token_ids
    assert len(llm.chat(chat, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))[0].outputs[0].token_ids) == 64


def test_n_seed_and_logprobs(llm):
    params = SamplingParams(n=3, temperature=0.9, seed=7, max_tokens=12, logprobs=3)
    a = llm.generate("Once upon a time", params)[0]
    b = llm.generate("Once upon a time", params)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]  # seeded: reproducible
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1                     # but not all the same
    for o in a.outputs:
        assert len(o.logprobs) == len(o.token_ids)
        for tok, lp in zip(o.token_ids, o.logprobs):
            assert tok in lp and all(v <= 0 for v in lp.values()) and len(lp) >= 3
        assert o.cumulative_logprob == pytest.approx(sum(lp[t] for t, lp in zip(o.token_ids, o.logprobs)), abs=1e-3)


def test_abort_frees_blocks(llm):
    eng = llm.engine
    total = eng.blocks.num_blocks
    ids = [eng.add_request(None, f"Request number {i} says", SamplingParams(max_tokens=200, **GREEDY)) for i in range(5)]
    for _ in range(6):
        eng.step()
    assert eng.blocks.num_free_blocks < total
    for rid in ids:
        assert eng.abort(rid)
    assert not eng.abort(ids[0])
    assert eng.blocks.num_free_blocks == total and not eng.has_unfinished_requests()


def test_preemption_keeps_greedy_output(reference_gguf_path):
    """A KV pool too small for all requests at once forces preemption by recompute; tokens unchanged."""
    params = SamplingParams(max_tokens=40, **GREEDY)
    prompts = [f"Story {i}: the dragon" for i in range(6)]
    roomy = LLM(str(reference_gguf_path), threads=2).generate(prompts, params)
    tight = LLM(str(reference_gguf_path), threads=2, kv_cache_bytes=12 * 16 * 23040)  # 12 blocks of 16 tokens
    outs = tight.generate(prompts, params)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in roomy]
    assert tight.engine.blocks.num_free_blocks == tight.engine.blocks.num_blocks


def test_bad_requests_raise_clearly(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []})
    with pytest.raises(ValueError, match="token ids must be in"):
        llm.generate({"prompt_token_ids": [1, 10**6]})
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate({"prompt_token_ids": [5] * (llm.engine.max_model_len + 1)})
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


def test_memory_budget(reference_gguf_path):
    with pytest.raises(ValueError, match="too small"):
        LLM(str(reference_gguf_path), memory_budget="50MB")
    llm = LLM(str(reference_gguf_path), memory_budget="256MB")
    weights = sum(t.data.nbytes for t in llm.engine.weights.tensors.values())
    assert 0 < llm.engine.load_overhead_bytes < 100e6  # parsed metadata + tokenizer, paid from the budget
    assert weights + llm.engine.load_overhead_bytes + llm.engine.runner.kv_cache_bytes < 256e6
    assert llm.engine.runner.kv_cache_bytes > 30e6


def test_cli_chat_and_generate(reference_gguf_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "tinyvllm", *a, "--model", str(reference_gguf_path)],
                                    capture_output=True, text=True, timeout=300)
    r = run("chat", "--message", "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "The capital of France is Paris."
    r = run("generate", "The capital of France is", "-n", "8")
    assert r.returncode == 0 and len(r.stdout.strip()) > 0, r.stderr
    r = run("generate", "x", "--temperature", "-1")
    assert r.returncode == 2 and "temperature" in r.stderr


def test_cli_interactive_chat_in_a_terminal(reference_gguf_path):
    """stdin is a terminal: a prompt, streamed answers, history kept across turns, /exit quits."""
    pexpect = __import__("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "tinyvllm", "chat", "--model", str(reference_gguf_path)],
                          encoding="utf-8", timeout=300)
    child.expect_exact("> ")
    child.sendline("What is the capital of France?")
    child.expect_exact("The capital of France is Paris.")
    child.expect_exact("> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_request_metrics(llm):
    out = llm.generate("Metrics please:", SamplingParams(max_tokens=10, **GREEDY))[0]
    m = out.metrics
    assert m.num_output_tokens == 10 and len(m.itl) == 9 and all(t >= 0 for t in m.itl)
    assert 0 < m.ttft <= m.e2e and m.tpot == pytest.approx(sum(m.itl) / 9)
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
