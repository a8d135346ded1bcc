"""OpenAI-compatible server on loopback: the real `openai` client and raw SSE clients against
answers computed offline on the same LLMEngine (before the server's engine thread owns it)."""
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

import tinyvllm
from tinyvllm import BeamSearchParams, LLMEngine, SamplingParams, _native
from tinyvllm.runner import NativeModelRunner
from tinyvllm.server.api import build_app
from tinyvllm.async_llm import AsyncLLM

from child_process import child_env, python_cmd
from serve_process import start_server, stop_server
from run_alone import offline

MODEL = "smollm2-135m"
GEN = 5  # tokens per answer in the many-client tests
PROMPTS = [f"{subject} number {i} is" for i, subject in
           zip(range(16), ["The story", "My favourite colour", "The answer", "A good name"] * 4)]
GREEDY = dict(temperature=0, ignore_eos=True)
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
ROOT = Path(__file__).resolve().parents[1]


class LiveServer:
    """uvicorn in a thread on a free loopback port."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def engine(reference_gguf_path):
    return LLMEngine(str(reference_gguf_path), threads=2, max_model_len=512, max_num_seqs=32)


@pytest.fixture(scope="module")
def ref(engine):
    """Offline answers every test compares against, computed before the engine thread starts."""
    tok = engine.tokenizer
    chat_text = tok.apply_chat_template(FRANCE, add_generation_prompt=True)
    chat_ids = tok.encode(chat_text, add_special_tokens=False)
    completion = offline(engine, "The capital of France is", SamplingParams(temperature=0, max_tokens=16))
    word = completion.outputs[0].text.split()[2]
    return dict(
        alone={p: offline(engine, p, SamplingParams(max_tokens=GEN, **GREEDY)).outputs[0] for p in PROMPTS},
        completion=completion, stop_word=word,
        logprobs=offline(engine, "The capital of France is", SamplingParams(temperature=0, max_tokens=16, logprobs=2)),
        chat=offline(engine, {"prompt": chat_text, "prompt_token_ids": chat_ids},
                     SamplingParams(temperature=0, max_tokens=24)),
        n3=offline(engine, "Once upon a time", SamplingParams(n=3, temperature=0.8, seed=7, max_tokens=10)),
        beam=offline(engine, "The capital of France is", BeamSearchParams(beam_width=3, max_tokens=8)),
        beam_chat=offline(engine, {"prompt": chat_text, "prompt_token_ids": chat_ids},
                          BeamSearchParams(beam_width=2, max_tokens=12, length_penalty=0.5)))


@pytest.fixture(scope="module")
def aeng(engine, ref):
    a = AsyncLLM.from_engine(engine)
    yield a
    a.shutdown()


@pytest.fixture(scope="module")
def server(aeng):
    s = LiveServer(build_app(aeng, MODEL))
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def sse_completion(url, body, drop_after=None, hold=None):
    """Stream one completion over raw HTTP. Returns (status, text, finish_reason); with drop_after,
    closes the connection after that many chunks; with hold, waits on that barrier once headers are in."""
    with httpx.Client(timeout=120) as c, c.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
        if hold is not None:
            hold.wait(60)
        if r.status_code != 200:
            return r.status_code, json.loads(r.read()), None
        text, finish, chunks = "", None, 0
        for line in r.iter_lines():
            if line == "data: [DONE]":
                return 200, text, finish
            if line.startswith("data: "):
                choice = json.loads(line[6:])["choices"][0]
                text, finish, chunks = text + choice["text"], choice["finish_reason"], chunks + 1
                if drop_after and chunks >= drop_after:
                    return "dropped", text, None
    return "no [DONE]", text, finish


def idle(a):
    s = a.stats
    return not s["running"] and not a.num_waiting and s["blocks_free"] == s["blocks_total"]


def wait_idle(engine, aeng):
    """Until nothing runs or waits and every KV block is free again (evictable prefix-cache blocks count
    as free in BlockManager.num_free_blocks), re-checked each time the engine thread publishes its stats
    (the timeout only catches a hang)."""
    assert aeng.wait_until(idle, timeout=300), aeng.stats
    assert engine.scheduler.blocks.num_free_blocks == engine.scheduler.blocks.num_blocks
    assert not engine.has_unfinished_requests()


def metric(text, name):
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def queued(aeng, n):
    """With the engine paused: until n requests wait in its inbox."""
    assert aeng.wait_until(lambda a: a.num_waiting == n, timeout=300), aeng.num_waiting


# ---- 1. the openai client: completions and chat, streaming or not ---------------------------------
def test_completion_equals_offline(client, ref, engine):
    want = ref["completion"]
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=16, temperature=0)
    assert r.choices[0].text == want.outputs[0].text and r.choices[0].finish_reason == want.outputs[0].finish_reason
    assert r.usage.prompt_tokens == len(engine.tokenizer.encode("The capital of France is"))
    assert r.usage.completion_tokens == len(want.outputs[0].token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=16,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.outputs[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.outputs[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # token-id prompts and several prompts at once (choices in prompt order)
    ids = engine.tokenizer.encode("The capital of France is")
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=16, temperature=0)
    assert r.choices[0].text == want.outputs[0].text and r.usage.prompt_tokens == len(ids)
    r = client.completions.create(model=MODEL, prompt=["The capital of France is", "Hi"], max_tokens=16, temperature=0)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].text == want.outputs[0].text
    assert r.usage.prompt_tokens == len(ids) + len(engine.tokenizer.encode("Hi"))


def test_chat_equals_offline(client, ref):
    want = ref["chat"]
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, max_completion_tokens=24, temperature=0)
    assert r.choices[0].message.content == want.outputs[0].text and "Paris" in want.outputs[0].text
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == want.outputs[0].finish_reason
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == len(want.outputs[0].token_ids)
    chunks = list(client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.outputs[0].text
    assert chunks[-1].usage.prompt_tokens == len(want.prompt_token_ids)


def test_n_seeded_equals_offline(client, ref):
    want = ref["n3"].outputs
    for stream in (False, True):
        usage_opt = {"include_usage": True} if stream else None
        r = client.completions.create(model=MODEL, prompt="Once upon a time", n=3, temperature=0.8, seed=7,
                                      max_tokens=10, stream=stream, stream_options=usage_opt)
        texts, usage = {}, None
        for chunk in (r if stream else [r]):
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + c.text
            usage = chunk.usage or usage
        assert texts == {o.index: o.text for o in want}
        assert len(set(texts.values())) > 1  # three different samples
        assert usage.completion_tokens == sum(len(o.token_ids) for o in want)


def test_stop_strings(client, ref):
    base, word = ref["completion"].outputs[0].text, ref["stop_word"]
    for stop in (word, [word, "never appears"]):
        r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=16, temperature=0,
                                      stop=stop)
        assert r.choices[0].text == base[:base.index(word)] and r.choices[0].finish_reason == "stop"
        chunks = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=16,
                                           temperature=0, stop=stop, stream=True)
        assert "".join(c.choices[0].text for c in chunks) == base[:base.index(word)]


def test_logprobs(client, ref):
    want = ref["logprobs"].outputs[0]
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=16, temperature=0,
                                  logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(want.token_ids) == r.usage.completion_tokens
    assert lp.token_logprobs == pytest.approx([d[t] for t, d in zip(want.token_ids, want.logprobs)], abs=1e-4)
    assert all(len(top) >= 2 for top in lp.top_logprobs) and "".join(lp.tokens).startswith(r.choices[0].text)
    c = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens and all(len(e.top_logprobs) == 3 for e in content)
    assert all(e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in content)  # greedy picks the best


def test_models_health_tokenize(client, server, engine):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").status_code == 200
    text = "Tokenize me: naïve café, 日本語 and 123."
    r = httpx.post(server.url + "/tokenize", json={"model": MODEL, "prompt": text}).json()
    assert r["tokens"] == engine.tokenizer.encode(text) and r["count"] == len(r["tokens"]) and r["max_model_len"] == 512
    assert httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == text
    r = httpx.post(server.url + "/tokenize", json={"messages": FRANCE}).json()
    chat_text = engine.tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True)
    assert r["tokens"] == engine.tokenizer.encode(chat_text, add_special_tokens=False)


# ---- 2. many clients share one running batch ------------------------------------------------------
def test_32_concurrent_streams_equal_alone(server, engine, aeng, ref):
    """32 clients' requests are lined up while the engine is paused, so the batch does not depend on
    how fast they arrive: one prefill step takes all 32, then GEN - 1 decode steps of 32 each."""
    wait_idle(engine, aeng)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(32)]
    before = httpx.get(server.url + "/metrics").text
    aeng.pause()
    try:
        with ThreadPoolExecutor(32) as pool:
            futures = [pool.submit(sse_completion, server.url, {"model": MODEL, "prompt": p, "max_tokens": GEN,
                                                                **GREEDY}) for p in prompts]
            queued(aeng, 32)
            aeng.resume()
            results = [f.result() for f in futures]
    finally:
        aeng.resume()
    assert [r[0] for r in results] == [200] * 32
    assert [r[1] for r in results] == [ref["alone"][p].text for p in prompts]
    assert {r[2] for r in results} == {"length"}
    m = httpx.get(server.url + "/metrics").text
    delta = lambda name: metric(m, name) - metric(before, name)
    assert delta("tinyvllm:batch_size_count") == delta("tinyvllm:engine_steps_total") == GEN
    assert delta("tinyvllm:batch_size_sum") == 32 * GEN  # every step ran all 32 clients' sequences
    assert delta("tinyvllm:generation_tokens_total") == 32 * GEN


# ---- 3. bad input ---------------------------------------------------------------------------------
LONG = "hello " * 600  # ~600 tokens > max_model_len 512
MID = "hello " * 480   # fits alone, not with 100 more
C, CHAT = "/v1/completions", "/v1/chat/completions"
BAD = [
    (C, {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    (C, {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    (C, {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    (C, {"prompt": "x", "top_p": 0}, 400, "top_p"),
    (C, {"prompt": "x", "top_k": -5}, 400, "top_k"),
    (C, {"prompt": "x", "min_p": 2}, 400, "min_p"),
    (C, {"prompt": "x", "n": 0}, 400, "n"),
    (C, {"prompt": "x", "n": 2, "temperature": 0}, 400, "n"),
    (C, {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    (C, {"prompt": "x", "frequency_penalty": -9}, 400, "frequency_penalty"),
    (C, {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    (C, {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    (C, {"prompt": "x", "seed": "abc"}, 400, "seed"),
    (C, {"prompt": "x", "stop": [""]}, 400, "stop"),
    (C, {"prompt": "x", "stop": 5}, 400, "stop"),
    (C, {"prompt": "x", "stream": "sometimes"}, 400, "stream"),
    (C, {"prompt": LONG}, 400, "prompt"),
    (C, {"prompt": MID, "max_tokens": 100}, 400, "max_tokens"),
    (C, {"prompt": ""}, 400, "prompt"),
    (C, {"prompt": []}, 400, "prompt"),
    (C, {"prompt": [10 ** 7]}, 400, "prompt"),
    (C, {"prompt": 5}, 400, "prompt"),
    (C, {"max_tokens": 3}, 400, "prompt"),
    (C, {"prompt": "x", "echo": True, "stream": True}, 400, "echo"),
    (C, {"prompt": "x", "use_beam_search": True, "n": 0}, 400, "n"),  # beam width n
    (C, {"prompt": "x", "use_beam_search": True, "n": 33}, 400, "n"),  # more beams than max_num_seqs
    (C, {"prompt": "x", "use_beam_search": True, "n": 2.5}, 400, "n"),
    (C, {"prompt": "x", "use_beam_search": True, "max_tokens": 0}, 400, "max_tokens"),
    (C, {"prompt": "x", "use_beam_search": True, "temperature": -0.7}, 400, "temperature"),
    (C, {"prompt": "x", "use_beam_search": True, "logprobs": 2}, 400, "logprobs"),  # ignored by a search: refused
    (C, {"prompt": "x", "length_penalty": 0.5}, 400, "length_penalty"),  # beam search only
    (C, {"prompt": "x", "deadline_s": -1}, 400, "deadline_s"),
    (C, {"prompt": "x", "deadline_s": 0}, 400, "deadline_s"),
    (C, {"prompt": "x", "deadline_s": "soon"}, 400, "deadline_s"),
    (C, {"prompt": "x", "deadline_s": "nan"}, 400, "deadline_s"),
    (CHAT, {"messages": FRANCE, "deadline_s": "inf"}, 400, "deadline_s"),
    (C, {"prompt": "x", "use_beam_search": True, "deadline_s": 5}, 400, "deadline_s"),
    (CHAT, {"messages": FRANCE, "use_beam_search": True, "n": 2, "top_p": 0.5}, 400, "top_p"),
    (C, b'{"prompt": "x", "max_tokens": ', 400, None),
    (C, b'["prompt"]', 400, None),
    (C, {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": [{"content": "hi"}]}, 400, "messages"),
    (CHAT, {"messages": FRANCE, "top_logprobs": 2}, 400, "top_logprobs"),
    (CHAT, {"messages": FRANCE, "logprobs": True, "top_logprobs": 21}, 400, "logprobs"),
    (CHAT, {"messages": FRANCE, "max_completion_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    (CHAT, {"model": "gpt-4", "messages": FRANCE}, 404, "model"),
    ("/tokenize", {}, 400, "prompt"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/v1/no-such-endpoint", {}, 404, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input(server, path, body, status, param):
    raw = {"content": body, "headers": {"content-type": "application/json"}}
    r = httpx.post(server.url + path, timeout=30, **(raw if isinstance(body, bytes) else {"json": body}))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]
    assert err["param"] == param


def test_still_serving_after_bad_input(client, server, ref):
    for path, body, _, _ in BAD[:5]:
        httpx.post(server.url + path, json=body)
    with pytest.raises(openai.BadRequestError, match="unknown_field is not supported"):  # never silently ignored
        client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=16, temperature=0,
                                  extra_body={"unknown_field": 1})
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=16, temperature=0)
    assert r.choices[0].text == ref["completion"].outputs[0].text


def test_deadline_s_extra_body_ends_requests_at_their_deadline(client, server, engine, aeng):
    """deadline_s (tinyvllm's extra body, SamplingParams.deadline_s): both requests wait in the paused
    engine's inbox past their deadline, so the first step ends them with nothing generated; OpenAI's
    schema has no "deadline" reason: they finish with "length", streamed or not."""
    wait_idle(engine, aeng)
    body = dict(model=MODEL, prompt="The capital of France is", max_tokens=64, temperature=0)
    aeng.pause()
    try:
        with ThreadPoolExecutor(2) as pool:
            plain = pool.submit(client.completions.create, **body, extra_body={"deadline_s": 0.01, "ignore_eos": True})
            streamed = pool.submit(sse_completion, server.url, {**body, "deadline_s": 0.01, "ignore_eos": True})
            queued(aeng, 2)
            time.sleep(0.05)  # past both deadlines before any step runs
            aeng.resume()
            r, (status, text, finish) = plain.result(), streamed.result()
    finally:
        aeng.resume()
    assert r.choices[0].finish_reason == "length" and r.choices[0].text == "" and r.usage.completion_tokens == 0
    assert (status, text, finish) == (200, "", "length")
    r = client.completions.create(**body, extra_body={"deadline_s": 300, "ignore_eos": True})  # a far deadline changes nothing
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 64
    wait_idle(engine, aeng)


def test_beam_search_equals_offline(client, server, ref, engine, aeng):
    """use_beam_search with n (the beam width), vLLM's extra body: the n best beams are the choices, best
    first, as the engine's offline beam search (LLM.beam_search's path) returns them; streamed, each
    beam arrives whole when the search ends. The engine counts the beam steps, and /metrics shows them.
    A temperature is taken, as vLLM takes it (the sampled token joins each beam's candidates)."""
    steps, before = aeng.stats["beam_search"]["steps"], httpx.get(server.url + "/metrics").text
    want = ref["beam"].outputs
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, n=3,
                                  extra_body={"use_beam_search": True})
    assert [(c.index, c.text, c.finish_reason) for c in r.choices] == \
        [(i, o.text, o.finish_reason) for i, o in enumerate(want)]
    assert len({tuple(o.token_ids) for o in want}) == 3
    assert r.usage.completion_tokens == sum(len(o.token_ids) for o in want)
    want = ref["beam_chat"].outputs
    body = dict(model=MODEL, messages=FRANCE, max_tokens=12, n=2, extra_body={"use_beam_search": True,
                                                                              "length_penalty": 0.5})
    r = client.chat.completions.create(**body)
    assert [(c.message.content, c.finish_reason) for c in r.choices] == [(o.text, o.finish_reason) for o in want]
    texts, finish = {}, {}
    for chunk in client.chat.completions.create(**body, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert [(texts[i], finish[i]) for i in range(2)] == [(o.text, o.finish_reason) for o in want]
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, n=2,
                                  temperature=1.0, extra_body={"use_beam_search": True})
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens > 0
    assert aeng.stats["beam_search"]["steps"] - steps >= 8 + 12 + 12 + 4
    m = httpx.get(server.url + "/metrics").text
    assert metric(m, "tinyvllm:beam_search_steps_total") - metric(before, "tinyvllm:beam_search_steps_total") \
        == aeng.stats["beam_search"]["steps"] - steps
    assert metric(m, "tinyvllm:beam_search_rows_total") == aeng.stats["beam_search"]["beam_rows"]


def test_beam_search_client_that_hangs_up_is_aborted(server, engine, aeng):
    """A non-streaming beam search has no output until it ends: the server still notices the client left
    (it polls) and aborts the search; every beam's blocks go back."""
    wait_idle(engine, aeng)
    steps, aborted = aeng.stats["beam_search"]["steps"], aeng.num_aborted
    body = json.dumps({"prompt": "Tell me a story", "max_tokens": 400, "n": 4, "use_beam_search": True,
                       "ignore_eos": True}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert aeng.wait_until(lambda a: a.stats["beam_search"]["steps"] > steps + 2)  # it is searching
    wait_idle(engine, aeng)
    (n,) = [n for _, n in aeng.aborts_since(aborted)]  # aborted, not finished
    assert 0 < n < 4 * 400 and aeng.stats["beam_search"]["steps"] - steps < 400


# ---- 4. clients that hang up ----------------------------------------------------------------------
STORM_CLIENTS = 200  # issue 16's figure


def test_disconnect_storm_frees_everything(server, engine, aeng, ref):
    """200 streaming clients at once, 30% of them hanging up mid-stream: afterwards the KV pool is back to
    full, and every client that stayed got the text its prompt gets alone (greedy)."""
    wait_idle(engine, aeng)
    generated, aborted = aeng.stats["generated_tokens"], aeng.num_aborted
    drops = {i for i in range(STORM_CLIENTS) if i % 10 in (0, 3, 7)}  # 30%

    def one(i):
        prompt = PROMPTS[i % len(PROMPTS)]
        if i in drops:  # long answers, dropped after the first chunk or two
            return sse_completion(server.url, {"prompt": prompt, "max_tokens": 64, **GREEDY}, drop_after=1 + i % 2)
        return sse_completion(server.url, {"prompt": prompt, "max_tokens": GEN, **GREEDY})

    with ThreadPoolExecutor(STORM_CLIENTS) as pool:
        results = list(pool.map(one, range(STORM_CLIENTS)))
    assert [r[0] for i, r in enumerate(results) if i in drops] == ["dropped"] * len(drops)
    kept = [(i, r) for i, r in enumerate(results) if i not in drops]
    assert [r for _, r in kept] == [(200, ref["alone"][PROMPTS[i % len(PROMPTS)]].text, "length") for i, _ in kept]
    wait_idle(engine, aeng)
    # each dropped request was aborted before its 64 tokens (one that ran on would finish, not abort)...
    dropped = [n for _, n in aeng.aborts_since(aborted)]
    assert len(dropped) == len(drops) and all(n < 64 for n in dropped), dropped
    # ...and nothing else was generated: the kept requests' tokens plus what the dropped ones had
    assert aeng.stats["generated_tokens"] - generated == len(kept) * GEN + sum(dropped)
    print(f"tokens the {len(drops)} dropped requests had when aborted: {sorted(dropped)}")


def test_non_streaming_client_that_hangs_up_is_aborted(server, engine, aeng):
    wait_idle(engine, aeng)
    before, aborted = aeng.stats["generated_tokens"], aeng.num_aborted
    body = json.dumps({"prompt": "Tell me a story", "max_tokens": 400, **GREEDY}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert aeng.wait_until(lambda a: a.stats["generated_tokens"] > before)  # it is generating
    wait_idle(engine, aeng)
    (n,) = [n for _, n in aeng.aborts_since(aborted)]  # aborted, not finished
    assert 0 < n < 400 and aeng.stats["generated_tokens"] - before == n


# ---- 5. a bounded waiting queue -------------------------------------------------------------------
def test_queue_full_is_429(aeng, engine, ref):
    """max_waiting=2 with the engine paused: two requests wait, every further one is refused with 429 at
    once (independent of timing); after resuming the two waiting ones complete, and new ones are taken."""
    wait_idle(engine, aeng)
    small = LiveServer(build_app(aeng, MODEL, max_waiting=2))  # same engine, a tiny waiting queue
    aeng.pause()
    try:
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(sse_completion, small.url, {"prompt": p, "max_tokens": GEN, **GREEDY})
                       for p in PROMPTS[:2]]
            queued(aeng, 2)
            for body in ({"prompt": PROMPTS[2], "max_tokens": GEN}, {"prompt": ["a", "b"], "max_tokens": GEN}):
                r = httpx.post(small.url + "/v1/completions", json=body, timeout=60)
                assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_exceeded", r.text
            status, err, _ = sse_completion(small.url, {"prompt": PROMPTS[3], "max_tokens": GEN})
            assert status == 429 and err["error"]["type"] == "rate_limit_exceeded"
            assert aeng.num_waiting == 2  # the refused ones were never queued
            aeng.resume()
            assert [f.result() for f in waiting] == [(200, ref["alone"][p].text, "length") for p in PROMPTS[:2]]
    finally:
        aeng.resume()
        wait_idle(engine, aeng)
    try:
        r = httpx.post(small.url + "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": GEN, **GREEDY},
                       timeout=60)
        assert r.json()["choices"][0]["text"] == ref["alone"][PROMPTS[0]].text
    finally:
        small.stop()


# ---- 5b. /metrics after a known workload ------------------------------------------------------------
METRICS = {"num_requests_running": "gauge", "num_requests_waiting": "gauge", "kv_blocks_used": "gauge",
           "kv_blocks_free": "gauge", "kv_cache_usage_perc": "gauge", "num_preemptions": "counter",
           "prefix_cache_queries": "counter", "prefix_cache_hits": "counter", "engine_steps": "counter",
           "beam_search_steps": "counter", "beam_search_rows": "counter",
           "time_to_first_token_seconds": "histogram", "time_per_output_token_seconds": "histogram",
           "e2e_request_latency_seconds": "histogram", "batch_size": "histogram", "prompt_tokens": "counter",
           "generation_tokens": "counter", "request_success": "counter"}
VLLM_METRICS = {"num_requests_running": "gauge", "num_requests_waiting": "gauge", "kv_cache_usage_perc": "gauge",
                "time_to_first_token_seconds": "histogram", "time_per_output_token_seconds": "histogram",
                "e2e_request_latency_seconds": "histogram"}


def test_metrics_after_a_known_workload(reference_gguf_path):
    """A fresh engine with a 12-block pool: a 40-token prompt twice (the second finds its 2 full blocks in
    the prefix cache), then 6 requests of 40 tokens at once (18 blocks wanted: preemptions). Every
    documented metric exists, with the type and the value this workload implies; vLLM's names of the same
    series (labelled model_name="<served name>", as vLLM does) carry the same values."""
    eng = LLMEngine(str(reference_gguf_path), threads=2, max_model_len=512, max_num_seqs=8,
                    kv_cache_bytes=12 * 16 * 23040)
    assert eng.scheduler.blocks.num_blocks == 12
    app = build_app(eng, MODEL)
    live, aeng = LiveServer(app), app.state.async_llm
    try:
        scrape = lambda: httpx.get(live.url + "/metrics").text
        text = scrape()
        types = dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE "))
        types = {k.removesuffix("_total"): v for k, v in types.items() if not k.endswith("_created")}
        assert types == ({f"tinyvllm:{k}": v for k, v in METRICS.items()} |
                         {f"vllm:{k}": v for k, v in VLLM_METRICS.items()})
        prompt = list(range(1000, 1040))  # 40 tokens: (40 - 1) // 16 = 2 full blocks to share
        for _ in range(2):
            r = httpx.post(live.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 4, **GREEDY}, timeout=120)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        m = scrape()
        assert metric(m, "tinyvllm:prefix_cache_queries_total") == 80
        assert metric(m, "tinyvllm:prefix_cache_hits_total") == 32
        assert metric(m, "tinyvllm:num_preemptions_total") == 0
        many = [[2000 + 50 * i + j for j in range(8)] for i in range(6)]
        aeng.pause()
        try:
            with ThreadPoolExecutor(6) as pool:
                futures = [pool.submit(httpx.post, live.url + "/v1/completions", timeout=300,
                                       json={"prompt": p, "max_tokens": 40, **GREEDY}) for p in many]
                queued(aeng, 6)
                aeng.resume()
                assert all(f.result().json()["usage"]["completion_tokens"] == 40 for f in futures)
        finally:
            aeng.resume()
        assert aeng.wait_until(idle, timeout=300)
        m = scrape()
        want = {"num_requests_running": 0, "num_requests_waiting": 0, "kv_blocks_used": 0, "kv_blocks_free": 12,
                "kv_cache_usage_perc": 0, "num_preemptions_total": eng.scheduler.num_preemptions,
                "engine_steps_total": eng.num_steps, "batch_size_count": eng.num_steps,
                "beam_search_steps_total": 0, "beam_search_rows_total": 0,
                "time_to_first_token_seconds_count": 8, "time_per_output_token_seconds_count": 8,
                "e2e_request_latency_seconds_count": 8, 'request_success_total{finished_reason="length"}': 8,
                "prompt_tokens_total": 2 * 40 + 6 * 8, "generation_tokens_total": 2 * 4 + 6 * 40}
        assert {k: metric(m, f"tinyvllm:{k}") for k in want} == want
        label = f'{{model_name="{MODEL}"}}'
        twins = [k for k in VLLM_METRICS if VLLM_METRICS[k] == "gauge"] + [
            f"{k}_{part}" for k in VLLM_METRICS if VLLM_METRICS[k] == "histogram" for part in ("count", "sum")]
        assert {k: metric(m, f"vllm:{k}{label}") for k in twins} == {k: metric(m, f"tinyvllm:{k}") for k in twins}
        assert metric(m, f"vllm:e2e_request_latency_seconds_count{label}") == 8
        assert metric(m, f'vllm:time_to_first_token_seconds_bucket{{le="+Inf",model_name="{MODEL}"}}') == 8
        assert eng.scheduler.num_preemptions > 0  # 6 x 3 blocks wanted from 12
        assert metric(m, "tinyvllm:prefix_cache_hits_total") >= 32
        assert metric(m, "tinyvllm:batch_size_sum") == eng.num_generated_tokens  # every step samples each sequence
    finally:
        live.stop()


# ---- 6. `tinyvllm serve` as a process: API key, SIGTERM -----------------------------------------------
def test_serve_subprocess_api_key_and_sigterm(reference_gguf_path, engine):
    """Also: the start-up log line names the model, threads, kernel path and the KV pool's blocks and bytes."""
    proc, url = start_server(reference_gguf_path, "--threads", "1", "--max-num-seqs", "4",
                             "--served-model-name", "smol", "--api-key", "sekrit", "--log-level", "info")
    try:
        body = {"model": "smol", "prompt": "Hello", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.post(url + "/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekrit", max_retries=0, timeout=60)
        r = good.completions.create(model="smol", prompt="Hello", max_tokens=3, temperature=0,
                                    extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
        # SIGTERM while a stream is in flight: it is finished, then the server exits 0
        stream = good.completions.create(model="smol", prompt="Count: 1, 2,", max_tokens=24, temperature=0,
                                         stream=True, extra_body={"ignore_eos": True})
        first = next(iter(stream))
        proc.send_signal(signal.SIGTERM)
        rest = list(stream)
        assert first.choices[0].text and rest[-1].choices[0].finish_reason == "length"
        assert proc.wait(timeout=30) == 0
    finally:
        stop_server(proc)
    log = proc.stdout.read().decode()
    m = re.search(r"INFO: +tinyvllm (\S+): model (\S+) .*threads (\d+), kernel path (\S+), KV cache (\d+) blocks "
                  r"x 16 tokens = [\d.]+ MiB \((\d+) bytes\), max_model_len (\d+), max_num_seqs 4", log)
    assert m, log
    version, model, threads, kernels, blocks, kv_bytes, max_len = m.groups()
    assert (version, model, threads) == (tinyvllm.__version__, str(reference_gguf_path), "1")
    assert kernels == _native.ffi.string(_native.lib.tv_kernel_path()).decode()
    assert int(kv_bytes) == int(blocks) * NativeModelRunner.kv_bytes_per_block(engine.config, 16) > 0
    assert int(blocks) * 16 >= int(max_len) > 0


def test_serve_without_server_extra_says_what_to_install(monkeypatch, capsys):
    import argparse
    from tinyvllm.server import cli
    code = "import sys, tinyvllm.server.cli; sys.exit(bool({'fastapi', 'uvicorn'} & set(sys.modules)))"
    assert subprocess.run(python_cmd(code), cwd=ROOT, env=child_env()).returncode == 0  # the CLI imports stay light
    p = argparse.ArgumentParser()
    cli.configure(p)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if it were not installed
    a = p.parse_args(["no-such-model"])
    assert a.func(a) == 1 and "pip install tinyvllm[server]" in capsys.readouterr().err


def test_serve_memory_budget_max_model_len_max_waiting(reference_gguf_path, engine):
    """The serve flags reach the engine and the app: --memory-budget sizes the KV pool (more than the
    16-block default for 4 sequences of 64 tokens, within what the budget leaves after the weights),
    --max-model-len bounds prompts, --max-waiting 0 refuses everything with 429."""
    proc, url = start_server(reference_gguf_path, "--threads", "1", "--memory-budget", "190MB", "--max-model-len",
                             "64", "--max-num-seqs", "4", "--max-waiting", "0")
    try:
        assert httpx.get(url + "/v1/models").json()["data"][0]["max_model_len"] == 64
        r = httpx.post(url + "/v1/completions", json={"prompt": [5] * 60, "max_tokens": 10})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        r = httpx.post(url + "/v1/completions", json={"prompt": [5] * 10, "max_tokens": 4})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_exceeded", r.text
        m = httpx.get(url + "/metrics").text
        blocks = metric(m, "tinyvllm:kv_blocks_free") + metric(m, "tinyvllm:kv_blocks_used")
        weights = sum(t.data.nbytes for t in engine.weights.tensors.values())
        block_bytes = engine.runner.kv_cache_bytes // engine.scheduler.blocks.num_blocks
        assert 16 < blocks and blocks * block_bytes <= 190 * 2**20 - weights, (blocks, block_bytes, weights)
    finally:
        stop_server(proc)


def test_serve_sigint_aborts_what_outlives_shutdown_grace(reference_gguf_path):
    """SIGINT with --shutdown-grace 1 while a 3000-token stream runs: the stream is cut (never reaches
    its length), the server exits 0."""
    proc, url = start_server(reference_gguf_path, "--threads", "1", "--shutdown-grace", "1")
    try:
        body = {"prompt": "Count: 1, 2,", "max_tokens": 3000, "stream": True, **GREEDY}
        chunks, finishes = 0, []
        with httpx.Client(timeout=120) as c, c.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            try:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunks += 1
                        finishes += [ch.get("finish_reason") for ch in json.loads(line[6:]).get("choices", [])]
                        if chunks == 1:
                            proc.send_signal(signal.SIGINT)
            except httpx.HTTPError:  # the connection cut mid-stream
                pass
        assert 0 < chunks < 3000 and "length" not in finishes, (chunks, finishes[-3:])
        assert proc.wait(timeout=120) == 0
    finally:
        stop_server(proc)
