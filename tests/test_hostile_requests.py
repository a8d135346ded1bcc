"""Hostile requests (issue 16): what a stranger can send must get a quick 4xx and cost the engine
nothing; no single request may stop the engine; the offline API, the model fetcher and the command
line fail cleanly. Each test is named after what it guards."""
import asyncio
import json
import signal
import subprocess
import sys

import httpx
import pytest

from tinyvllm import LLM, LLMEngine, SamplingParams
from tinyvllm.async_llm import AsyncLLM
from tinyvllm.cli import main
from tinyvllm.engine import RequestsFailed
from tinyvllm.model import ModelNotFoundError, resolve_model
from tinyvllm.model import fetch
from tinyvllm.server.api import PROMPT_CHARS_PER_TOKEN, build_app

from child_process import child_env, tinyvllm_cmd
from test_bench import FakeServer, _args
from test_server import LiveServer, idle

MAX_LEN, MAX_SEQS = 256, 4
HI = [{"role": "user", "content": "Hi"}]
C, CHAT = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def engine(reference_gguf_path):
    return LLMEngine(str(reference_gguf_path), threads=1, max_model_len=MAX_LEN, max_num_seqs=MAX_SEQS)


@pytest.fixture(scope="module")
def aeng(engine):
    a = AsyncLLM.from_engine(engine)
    yield a
    a.shutdown()


@pytest.fixture(scope="module")
def server(aeng):
    s = LiveServer(build_app(aeng, "m"))
    yield s
    s.stop()


def post(url, path, body, **kw):
    r = httpx.post(url + path, json=body, timeout=120, **kw)
    return r.status_code, r.json()


def assert_still_serving(server, engine, aeng):
    status, body = post(server.url, C, {"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0})
    assert status == 200 and body["choices"][0]["finish_reason"] == "length", body
    assert aeng.alive and aeng.wait_until(idle, timeout=300), aeng.stats
    assert engine.scheduler.blocks.num_free_blocks == engine.scheduler.blocks.num_blocks


# ---- what the engine can hold: refused before admitting ------------------------------------------
OVER_CAPACITY = [
    (CHAT, {"messages": HI, "n": 1_000_000, "temperature": 1}, "n"),  # killed the engine thread once
    (C, {"prompt": "Hi", "n": 10 ** 20, "temperature": 1}, "n"),
    (C, {"prompt": "Hi", "n": MAX_SEQS + 1, "temperature": 1}, "n"),
    (CHAT, {"messages": HI, "max_tokens": 10 ** 12}, "max_tokens"),  # dropped the connection once
    (CHAT, {"messages": HI, "max_completion_tokens": 10 ** 30}, "max_tokens"),
    (C, {"prompt": "Hi", "max_tokens": MAX_LEN}, "max_tokens"),  # a 400, not a clamp (as vLLM)
    (CHAT, {"messages": HI, "best_of": 10 ** 6}, "best_of"),
    (C, {"prompt": "Hi", "logprobs": 10 ** 6}, "logprobs"),
    (CHAT, {"messages": HI, "logprobs": True, "top_logprobs": 10 ** 6}, "logprobs"),
    (C, {"prompt": "Hi", "prompt_logprobs": 10 ** 6}, "prompt_logprobs"),
]


@pytest.mark.parametrize("path,body,param", OVER_CAPACITY, ids=[f"{i}-{next(iter(b[1].keys() - {'prompt', 'messages'}))}"
                                                              for i, b in enumerate(OVER_CAPACITY)])
def test_request_beyond_engine_capacity_is_400_before_admitting(server, engine, aeng, path, body, param):
    steps = aeng.stats["steps"]
    status, err = post(server.url, path, body)
    assert status == 400 and err["error"]["param"] == param, err
    assert aeng.stats["steps"] == steps and aeng.alive  # refused up front: nothing ran


def test_engine_still_serves_after_capacity_bombs(server, engine, aeng):
    for path, body, _ in OVER_CAPACITY:
        post(server.url, path, body)
    assert_still_serving(server, engine, aeng)


# ---- sizes: refused before parsing or tokenizing --------------------------------------------------
def test_huge_prompt_is_refused_before_tokenizing(server, engine, aeng, monkeypatch):
    calls = []
    real_encode = engine.tokenizer.encode
    monkeypatch.setattr(engine.tokenizer, "encode", lambda *a, **k: calls.append(1) or real_encode(*a, **k))
    huge = "x" * (PROMPT_CHARS_PER_TOKEN * engine.max_model_len + 1)
    for path, body, param in [(C, {"prompt": huge}, "prompt"), (C, {"prompt": ["Hi", huge]}, "prompt"),
                              (CHAT, {"messages": [{"role": "user", "content": huge}]}, "messages"),
                              ("/tokenize", {"prompt": huge}, "prompt")]:
        status, err = post(server.url, path, body)
        assert status == 400 and err["error"]["param"] == param and "characters" in err["error"]["message"], err
    assert not calls  # the tokenizer never saw it
    monkeypatch.undo()
    assert_still_serving(server, engine, aeng)


def test_body_over_max_request_bytes_is_413_before_reading(aeng):
    small = LiveServer(build_app(aeng, "m", max_request_bytes=2000, max_prompt_chars=100))
    try:
        big = {"prompt": "x" * 3000, "max_tokens": 1}
        status, err = post(small.url, C, big)  # with a Content-Length
        assert status == 413 and err["error"]["code"] == "request_too_large", err
        chunks = (json.dumps(big)[i:i + 500].encode() for i in range(0, 3100, 500))  # chunked: no length
        r = httpx.post(small.url + C, content=chunks, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
        status, err = post(small.url, C, {"prompt": "x" * 101, "max_tokens": 1})  # under the bytes, over the chars
        assert status == 400 and err["error"]["param"] == "prompt", err
        status, ok = post(small.url, C, {"prompt": "Hi", "max_tokens": 1})
        assert status == 200 and ok["choices"], ok
    finally:
        small.stop()


# ---- fields the server does not honour ------------------------------------------------------------
UNHONOURED = [
    (C, {"prompt": "Hi", "logit_bias": {"5": 100}}, "logit_bias"),
    (C, {"prompt": "Hi", "use_beam_search": True, "top_p": 0.5}, "top_p"),  # a beam search would ignore it
    (C, {"prompt": "Hi", "length_penalty": 0.5}, "length_penalty"),  # beam search only
    (C, {"prompt": "Hi", "max_token": 3}, "max_token"),  # a misspelling is not silently the default
    (CHAT, {"messages": HI, "functions": [{"name": "f"}]}, "functions"),
    (CHAT, {"messages": HI, "function_call": "auto"}, "function_call"),
    (CHAT, {"messages": HI, "modalities": ["audio"], "audio": {"voice": "x"}}, "modalities"),
    (CHAT, {"messages": HI, "echo": True}, "echo"),
    (CHAT, {"messages": HI, "stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options"),
    (CHAT, {"messages": HI, "response_format": {"type": "json_schema", "json_schema": {"schema": {}, "x": 1}}},
     "response_format"),
    ("/tokenize", {"prompt": "Hi", "truncate": True}, "truncate"),
]


@pytest.mark.parametrize("path,body,param", UNHONOURED, ids=[u[2] for u in UNHONOURED])
def test_unhonoured_field_is_400_naming_it(server, path, body, param):
    status, err = post(server.url, path, body)
    assert status == 400 and err["error"]["param"] == param, err
    assert err["error"]["message"].startswith(param) and "not supported" in err["error"]["message"]
    assert all(f in err["error"]["message"] for f in body if f not in ("prompt", "messages", "stream"))


def test_user_field_is_accepted(server):  # OpenAI's end-user id: no output depends on it
    status, body = post(server.url, C, {"prompt": "Hi", "max_tokens": 1, "user": "someone"})
    assert status == 200, body


# ---- no single request stops the engine -----------------------------------------------------------
def _fail_next_sample(monkeypatch, engine):
    real, failed = engine.sampler.sample, []

    def sample(*a, **k):
        if not failed:
            failed.append(1)
            raise MemoryError("Unable to allocate 183. GiB for an array with shape (1000000, 49152)")
        return real(*a, **k)
    monkeypatch.setattr(engine.sampler, "sample", sample)


def test_failing_step_fails_its_requests_not_the_engine_thread(engine, aeng, monkeypatch):
    assert aeng.wait_until(idle, timeout=300)
    aeng.pause()  # both requests join the same step
    victims = [aeng.submit("Once upon a time", SamplingParams(max_tokens=4, temperature=0)) for _ in range(2)]
    _fail_next_sample(monkeypatch, engine)
    aeng.resume()
    for h in victims:
        with pytest.raises(RuntimeError, match="MemoryError"):
            h.result(timeout=300)
    assert aeng.alive and aeng.wait_until(idle, timeout=300), aeng.stats  # their blocks are back
    out = aeng.submit("The capital of France is", SamplingParams(max_tokens=3, temperature=0)).result(timeout=300)
    assert out.finished and len(out.outputs[0].token_ids) == 3


def test_failing_step_frees_its_requests_in_the_engine(reference_gguf_path, monkeypatch):
    eng = LLMEngine(str(reference_gguf_path), threads=1, max_model_len=64, max_num_seqs=2)
    eng.add_request("a", "Once upon a time", SamplingParams(max_tokens=3, temperature=0))
    _fail_next_sample(monkeypatch, eng)
    with pytest.raises(RequestsFailed) as e:
        eng.step()
    assert e.value.request_ids == ["a"] and isinstance(e.value.cause, MemoryError)
    assert not eng.has_unfinished_requests()
    assert eng.scheduler.blocks.num_free_blocks == eng.scheduler.blocks.num_blocks
    eng.add_request("b", "Once upon a time", SamplingParams(max_tokens=3, temperature=0))
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert outs[-1].request_id == "b" and outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3


# ---- a client that never reads cannot hold the engine ---------------------------------------------
def test_client_that_never_reads_its_stream_does_not_block_the_engine(server, engine, aeng):
    assert aeng.wait_until(idle, timeout=300)
    generated = aeng.stats["generated_tokens"]
    body = {"prompt": "Once upon a time", "max_tokens": 48, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=120) as c, c.stream("POST", server.url + C, json=body) as r:
        assert r.status_code == 200
        # nothing read: the engine finishes the request anyway (its outputs wait in its own queue)...
        assert aeng.wait_until(lambda a: idle(a) and a.stats["generated_tokens"] >= generated + 48, timeout=300)
        # ...and serves others meanwhile
        status, other = post(server.url, C, {"prompt": "Hi", "max_tokens": 2, "temperature": 0})
        assert status == 200 and other["choices"][0]["finish_reason"] == "length"
    assert_still_serving(server, engine, aeng)


# ---- the offline API --------------------------------------------------------------------------------
def test_generate_with_a_bad_prompt_leaves_nothing_queued(reference_gguf_path):
    llm = LLM(str(reference_gguf_path), threads=1, max_model_len=64, max_num_seqs=2)
    params = SamplingParams(max_tokens=3, temperature=0)
    with pytest.raises(ValueError, match="empty"):
        llm.generate(["Tell me a story", ""], params)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.scheduler.blocks.num_free_blocks == llm.engine.scheduler.blocks.num_blocks
    (out,) = llm.generate(["Tell me a story"], params)  # once failed with KeyError on the orphan
    assert out.finished and len(out.outputs[0].token_ids) == 3


# ---- fetching a model without a network -------------------------------------------------------------
@pytest.mark.parametrize("how", ["unreachable", "HF_HUB_OFFLINE"])
def test_hf_repo_id_offline_fails_at_once_saying_offline(how, monkeypatch, tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    if how == "unreachable":  # a closed loopback port: the probe fails at once, no DNS, no retries
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(var, raising=False)
    else:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def network(*a, **k):
        raise AssertionError("went to the network while offline")
    monkeypatch.setattr(hub, "list_repo_files", network)
    for name in ("someorg/some-model", "someorg/some-model:m.gguf"):
        with pytest.raises(ModelNotFoundError, match=r"^offline \(.*\), and someorg/some-model.* is not in the local"):
            resolve_model(name, progress=False)
    assert fetch._hub_reachable("http://127.0.0.1:9") is False


# ---- the command line -------------------------------------------------------------------------------
def test_bench_json_is_strict_json_without_the_api_key(reference_gguf_path, tmp_path):
    fake = FakeServer(["x"], 0.0, usage_tokens=1)
    try:  # --request-rate defaults to inf (all at once), which json.dumps writes as Infinity
        assert main(_args(tmp_path, "--model", str(reference_gguf_path), "--url", fake.url, "--num-prompts", "2",
                          "--api-key", "sk-secret-123")) == 0
    finally:
        fake.close()
    text = (tmp_path / "r.json").read_text()

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    report = json.loads(text, parse_constant=refuse)
    assert report["config"]["request_rate"] is None and report["config"]["api_key"] == "<redacted>"
    assert "sk-secret-123" not in text


def test_ctrl_c_in_generate_exits_130_without_traceback(reference_gguf_path):
    proc = subprocess.Popen(tinyvllm_cmd("generate", "--model", str(reference_gguf_path), "--threads", "1",
                                         "--max-tokens", "4000", "1, 2, 3, 4, 5, 6, 7,"),
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.read(1)  # it is generating
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and b"Traceback" not in err, err.decode()


def test_unread_stream_holds_one_output_not_one_per_step(engine, aeng):
    """A reader that never reads costs one (cumulative) output per request, not one per step: 48 queued
    outputs of growing length are quadratic memory at long max_tokens."""
    assert aeng.wait_until(idle, timeout=300)

    async def run():
        gen = aeng.generate("Once upon a time", SamplingParams(max_tokens=48, temperature=0, ignore_eos=True))
        await asyncio.to_thread(aeng.wait_until, idle, 300)  # finished in the engine, nothing read yet
        await aeng.abort("no-such-request")  # a round trip through the engine thread: its earlier hand-overs ran
        return [out async for out in gen]
    outs = asyncio.run(run())
    assert len(outs) == 1 and outs[0].finished and len(outs[0].outputs[0].token_ids) == 48
