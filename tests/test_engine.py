"""Engine behaviour on the reference model: batching, streaming, stops, n, logprobs, abort, errors,
min_tokens and penalties; the `tinyvllm generate | chat` command line."""
import io
import subprocess
import sys

import numpy as np
import pytest

from child_process import child_env, tinyvllm_cmd
from tinyvllm import LLM, SamplingParams, cli

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


def test_stream_refuses_n_above_one(llm):
    """One stream of text holds one completion: n=2 is an error, not a silently dropped second answer."""
    for stream in (lambda p: llm.stream("Once upon a time", p), lambda p: llm.stream_chat(FRANCE, p)):
        with pytest.raises(ValueError, match="n=2"):
            stream(SamplingParams(n=2, temperature=0.8, max_tokens=4))  # at the call, before any iteration
    assert not llm.engine.has_unfinished_requests()
    assert len(list(llm.stream("Once upon a time", SamplingParams(n=1, max_tokens=4, **GREEDY)))) >= 1


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
    total = eng.scheduler.blocks.num_blocks
    ids = [eng.add_request(None, f"Request number {i} says", SamplingParams(max_tokens=200, **GREEDY)) for i in range(5)]
    for _ in range(6):
        eng.step()
    assert eng.scheduler.blocks.num_free_blocks < total
    for rid in ids:
        assert eng.abort(rid)
    assert not eng.abort(ids[0])
    assert eng.scheduler.blocks.num_free_blocks == total and not eng.has_unfinished_requests()


def test_max_num_seqs_bounds_batches_with_forks(reference_gguf_path, llm):
    """n > 1 requests count all their sequences against max_num_seqs, forks not yet joined included."""
    narrow = LLM(str(reference_gguf_path), threads=2, max_num_batched_tokens=64, max_num_seqs=4)
    eng = narrow.engine
    requests = [("Once upon a time", 2), ("The weather today", 2), ("In the beginning", 1), ("1, 2, 3,", 3)]
    for i, (prompt, n) in enumerate(requests):
        eng.add_request(str(i), prompt, SamplingParams(n=n, temperature=0.8, seed=i, max_tokens=10))
    widest, outs = 0, {}
    while eng.has_unfinished_requests():
        outs.update({o.request_id: o for o in eng.step() if o.finished})
        widest = max(widest, len(eng.scheduler.running))
    assert widest == 4  # the two n=2 requests run together; nothing more joins them
    wide = llm.generate([p for p, _ in requests],
                        [SamplingParams(n=n, temperature=0.8, seed=i, max_tokens=10) for i, (_, n) in enumerate(requests)])
    assert [[c.token_ids for c in outs[str(i)].outputs] for i in range(4)] == [[c.token_ids for c in o.outputs] for o in wide]
    with pytest.raises(ValueError, match="max_num_seqs"):
        narrow.generate("Hi", SamplingParams(n=5))
    assert eng.scheduler.blocks.num_free_blocks == eng.scheduler.blocks.num_blocks


def test_preemption_keeps_greedy_output(reference_gguf_path):
    """A KV pool too small for all requests at once forces preemption by recompute; tokens unchanged."""
    params = SamplingParams(max_tokens=40, **GREEDY)
    prompts = [f"Story {i}: the dragon" for i in range(6)]
    roomy = LLM(str(reference_gguf_path), threads=2).generate(prompts, params)
    tight = LLM(str(reference_gguf_path), threads=2, kv_cache_bytes=12 * 16 * 23040)  # 12 blocks of 16 tokens
    outs = tight.generate(prompts, params)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in roomy]
    assert tight.engine.scheduler.blocks.num_free_blocks == tight.engine.scheduler.blocks.num_blocks


def test_bad_requests_raise_clearly(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []})
    with pytest.raises(ValueError, match="token ids must be in"):
        llm.generate({"prompt_token_ids": [1, 10**6]})
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate({"prompt_token_ids": [5] * (llm.engine.max_model_len + 1)})
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    assert llm.engine.scheduler.blocks.num_free_blocks == llm.engine.scheduler.blocks.num_blocks


def test_memory_budget(reference_gguf_path):
    with pytest.raises(ValueError, match="too small"):
        LLM(str(reference_gguf_path), memory_budget="50MB")
    llm = LLM(str(reference_gguf_path), memory_budget="256MB")
    weights = sum(t.data.nbytes for t in llm.engine.weights.tensors.values())
    assert 0 < llm.engine.load_overhead_bytes < 100e6  # parsed metadata + tokenizer, paid from the budget
    assert weights + llm.engine.load_overhead_bytes + llm.engine.runner.kv_cache_bytes < 256e6
    assert llm.engine.runner.kv_cache_bytes > 30e6


FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_cli_chat_and_generate(reference_gguf_path, llm):
    """The real command in a subprocess: chat --message, generate with the prompt on stdin, a bad argument."""
    run = lambda *a, stdin=None: subprocess.run(tinyvllm_cmd(*a, "--model", reference_gguf_path, "--threads", "2"),
                                                input=stdin, capture_output=True, text=True, timeout=300,
                                                env=child_env())
    r = run("chat", "--message", "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "The capital of France is Paris."
    want = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
    r = run("generate", "--max-tokens", "8", stdin="The capital of France is")  # no prompt argument: read from stdin
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"
    r = run("generate", "x", "--temperature", "-1")
    assert r.returncode == 2 and "temperature" in r.stderr


class _Spy:
    """The module's LLM behind cli._llm, recording which entry points the command used."""

    def __init__(self, llm):
        self.llm, self.calls = llm, []

    def __getattr__(self, name):
        attr = getattr(self.llm, name)
        if name in ("generate", "stream", "chat", "stream_chat"):
            def call(*a, **k):
                self.calls.append((name, a))
                return attr(*a, **k)
            return call
        return attr


def test_cli_generate_no_stream_and_stdin(llm, monkeypatch, capsys):
    spy = _Spy(llm)
    monkeypatch.setattr(cli, "_llm", lambda a: spy)
    params = SamplingParams(temperature=0, max_tokens=8)
    want = [llm.generate(p, params)[0].outputs[0].text for p in ("Once upon a time", "The sea is")]
    assert cli.main(["generate", "Once upon a time", "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out == want[0] + "\n" and [c[0] for c in spy.calls] == ["stream"]
    spy.calls.clear()
    assert cli.main(["generate", "Once upon a time", "--max-tokens", "8", "--no-stream"]) == 0
    assert capsys.readouterr().out == want[0] + "\n" and [c[0] for c in spy.calls] == ["generate"]
    spy.calls.clear()
    monkeypatch.setattr(sys, "stdin", io.StringIO("The sea is"))
    assert cli.main(["generate", "--max-tokens", "8", "--no-stream"]) == 0
    assert capsys.readouterr().out == want[1] + "\n" and spy.calls[0][1][0] == ["The sea is"]


def test_cli_chat_system_prompt(llm, monkeypatch, capsys):
    spy = _Spy(llm)
    monkeypatch.setattr(cli, "_llm", lambda a: spy)
    system, user = ({"role": "system", "content": "You are Bob, a pirate who loves the sea."},
                    {"role": "user", "content": "Who are you?"})
    params = SamplingParams(temperature=0, max_tokens=24)
    with_system = llm.chat([system, user], params)[0].outputs[0].text
    assert with_system != llm.chat([user], params)[0].outputs[0].text  # else this test could not tell them apart
    assert cli.main(["chat", "--message", user["content"], "--system", system["content"], "--max-tokens", "24"]) == 0
    assert capsys.readouterr().out == with_system + "\n"
    assert spy.calls[0][1][0][:2] == [system, user]


def test_cli_interactive_chat_in_a_terminal(reference_gguf_path, llm):
    """stdin is a terminal: a prompt, streamed answers, history kept across turns, /reset forgets, /exit quits.
    The second answer must be the one to the whole conversation, which differs from the answer to the
    follow-up alone; after /reset the same follow-up gets the answer it gets alone."""
    pexpect = __import__("pexpect")
    params = SamplingParams(temperature=0, max_tokens=48)
    first = llm.chat(FRANCE, params)[0].outputs[0].text
    follow = [{"role": "user", "content": "And of Germany?"}]
    in_context = llm.chat([*FRANCE, {"role": "assistant", "content": first}, *follow], params)[0].outputs[0].text
    alone = llm.chat(follow, params)[0].outputs[0].text
    assert first == "The capital of France is Paris." and in_context != alone
    argv = tinyvllm_cmd("chat", "--model", reference_gguf_path, "--threads", "2", "--max-tokens", "48")
    child = pexpect.spawn(argv[0], argv[1:], env=child_env(), encoding="utf-8", timeout=300)
    tty = lambda text: text.replace("\n", "\r\n")
    child.expect_exact("> ")
    child.sendline(FRANCE[0]["content"])
    child.expect_exact(tty(first + "\n> "))
    child.sendline(follow[0]["content"])
    child.expect_exact(tty(in_context + "\n> "))
    child.sendline("/reset")
    child.expect_exact("> ")
    child.sendline(follow[0]["content"])
    child.expect_exact(tty(alone + "\n> "))
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_min_tokens_holds_eos_back(llm):
    """The chat answer ends with eos after a few tokens; min_tokens=20 masks eos (and only eos) until 20."""
    eos = set(llm.tokenizer.eos_token_ids)
    free = llm.chat(FRANCE, SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    assert free.finish_reason == "stop" and free.token_ids[-1] in eos and len(free.token_ids) < 20
    held = llm.chat(FRANCE, SamplingParams(temperature=0, max_tokens=40, min_tokens=20))[0].outputs[0]
    k = len(free.token_ids) - 1
    assert held.token_ids[:k] == free.token_ids[:k]  # same tokens up to where eos won
    assert len(held.token_ids) >= 20 and not eos & set(held.token_ids[:20])


@pytest.mark.parametrize("penalties", [dict(repetition_penalty=1.3), dict(frequency_penalty=0.5),
                                       dict(presence_penalty=1.5),
                                       dict(repetition_penalty=1.1, frequency_penalty=0.4, presence_penalty=0.3)],
                         ids=["repetition", "frequency", "presence", "all"])
def test_penalties_through_the_engine(penalty_llm, penalties):
    """Greedy with penalties: every chosen token is the argmax of the raw logits (one prefill over
    prompt + answer) after the penalties applied by hand, and the answer differs from the unpenalized one."""
    llm, prompt = penalty_llm, "one one one one one one one one one one one one"
    plain = llm.generate(prompt, SamplingParams(max_tokens=24, **GREEDY))[0].outputs[0].token_ids
    out = llm.generate(prompt, SamplingParams(max_tokens=24, **GREEDY, **penalties))[0]
    ids, got = out.prompt_token_ids, out.outputs[0].token_ids
    assert got != plain
    rep, freq, pres = (penalties.get(k, d) for k, d in (("repetition_penalty", 1.0), ("frequency_penalty", 0.0),
                                                         ("presence_penalty", 0.0)))
    runner, seq = llm.engine.runner, ids + got
    n = len(seq)
    table = np.arange(-(-n // runner.block_size), dtype=np.int32)[None]
    raw = runner.forward(seq, np.arange(n), np.zeros(n), table, np.arange(len(ids) - 1, n - 1)).astype(np.float64)
    for i, (row, tok) in enumerate(zip(raw, got)):
        for t in set(ids) | set(got[:i]):  # repetition: prompt and output
            row[t] = row[t] / rep if row[t] > 0 else row[t] * rep
        counts = np.bincount(np.asarray(got[:i], dtype=np.int64), minlength=row.size)  # the others: output only
        row -= freq * counts + pres * (counts > 0)
        best = int(np.argmax(row))
        assert tok == best or row[best] - row[tok] < 0.02, (i, tok, best, row[best] - row[tok])


@pytest.fixture(scope="module")
def penalty_llm(reference_gguf_path):
    """No prefix cache: the test's own forward may then overwrite the runner's KV blocks between requests."""
    return LLM(str(reference_gguf_path), threads=2, enable_prefix_caching=False)


def test_request_metrics(llm):
    out = llm.generate("Metrics please:", SamplingParams(max_tokens=10, **GREEDY))[0]
    m = out.metrics
    assert m.num_output_tokens == 10 and len(m.itl) == 9 and all(t >= 0 for t in m.itl)
    assert 0 < m.ttft <= m.e2e and m.tpot == pytest.approx(sum(m.itl) / 9)
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
