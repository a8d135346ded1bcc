"""SamplingParams(prompt_logprobs=k) against the float64 reference forward (tests/reference_forward.py),
teacher forced: every prompt position's logprob of the actual next prompt token, and its top-k, equal the
reference's log-softmax within TOL, with chunked prefill on and off and with prefix caching on."""
import numpy as np
import pytest

from tinyvllm import LLM, SamplingParams
from tinyvllm.outputs import Logprob
from run_alone import offline

# Measured on the reference model (Q4_1 weights, int16 activations vs float64): at most ~0.01 on these
# prompts; logits themselves differ by up to ~0.05 (tests/test_generate.py).
TOL = 0.05
K = 5

CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "user", "content": "Write a short poem about the sea."}]]
RAW = ["The quick brown fox jumps over the lazy dog because",
       "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]


def ref_log_softmax(ref, ids) -> np.ndarray:
    logits = ref.prefill_logits(list(ids))
    m = logits.max(axis=1, keepdims=True)
    return logits - (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))


def check_against_reference(ref, ids, prompt_logprobs, k=K) -> float:
    """Returns the largest |difference| seen; asserts the shape and every entry."""
    assert len(prompt_logprobs) == len(ids) and prompt_logprobs[0] is None
    lsm = ref_log_softmax(ref, ids)
    worst = 0.0
    for pos in range(1, len(ids)):
        entry, want = prompt_logprobs[pos], lsm[pos - 1]
        tok = ids[pos]
        assert tok in entry and all(isinstance(v, Logprob) for v in entry.values())
        assert len(entry) in (k, k + 1) and (len(entry) == k) == (entry[tok].rank <= k)
        for t, lp in entry.items():
            worst = max(worst, abs(lp.logprob - want[t]))
            assert abs(lp.logprob - want[t]) < TOL, (pos, t, lp, want[t])
            # rank: tokens at least as likely, up to what TOL cannot tell apart
            assert np.count_nonzero(want >= want[t] + TOL) < lp.rank <= np.count_nonzero(want >= want[t] - TOL)
        top = sorted((lp.logprob for t, lp in entry.items() if lp.rank <= k), reverse=True)
        assert len(top) == k and top[-1] > np.sort(want)[-k] - TOL, "a likelier token was left out of the top-k"
        assert sorted(lp.rank for t, lp in entry.items() if lp.rank <= k) == list(range(1, k + 1))
    return worst


@pytest.fixture(scope="module")
def prompts(reference_gguf_path):
    llm = LLM(str(reference_gguf_path), threads=2, kv_cache_bytes="8MB")
    return [llm._chat_prompt(c)["prompt_token_ids"] for c in CHATS] + [llm.tokenizer.encode(p) for p in RAW]


def record_logits_rows(llm) -> list[int]:
    """Wraps the runner's forward to record how many logits rows each step computed."""
    rows, forward = [], llm.engine.runner.forward

    def wrapped(*args):
        out = forward(*args)
        rows.append(len(out))
        return out
    llm.engine.runner.forward = wrapped
    return rows


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "whole-prompt"])
def test_prompt_logprobs_match_reference(reference_gguf_path, reference_model, prompts, chunked):
    if chunked:  # prompts of ~40 tokens in chunks of 16 tokens, and at most 4 scored positions per step
        llm = LLM(str(reference_gguf_path), threads=2, max_num_batched_tokens=16, max_num_seqs=4,
                  enable_prefix_caching=False)
    else:  # room for every prompt in one step
        llm = LLM(str(reference_gguf_path), threads=2, max_num_batched_tokens=512, max_num_seqs=256,
                  enable_prefix_caching=False)
    rows = record_logits_rows(llm)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=K, ignore_eos=True))
    worst = max(check_against_reference(reference_model, p, o.prompt_logprobs) for p, o in zip(prompts, outs))
    print(f"prompt logprobs vs float64 reference ({'chunked' if chunked else 'one step'}): max |diff| {worst:.4f}")
    if chunked:
        assert max(rows) <= 4 + 4 and len(rows) > sum(map(len, prompts)) // 4  # never a [prompt, vocab] array
    else:
        assert rows[0] == sum(map(len, prompts)), "every prompt position of every prompt in the first step"
    # the generated tokens are the same as without prompt logprobs
    plain = llm.generate([{"prompt_token_ids": p} for p in prompts],
                         SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    assert all(o.prompt_logprobs is None for o in plain)


def test_prompt_logprobs_skip_the_prefix_cache(reference_gguf_path, reference_model, prompts):
    """A request with prompt logprobs sharing a cached prefix runs its whole prompt (cached positions would
    have no logits) and still leaves its blocks to the cache for requests without prompt logprobs."""
    llm = LLM(str(reference_gguf_path), threads=2, max_num_batched_tokens=32, max_num_seqs=8)
    base = prompts[1]  # chat prompt: system prompt + question, > 2 blocks
    longer = base + prompts[2]
    stats = lambda: llm.engine.stats()["prefix_cache"]
    llm.generate({"prompt_token_ids": base}, SamplingParams(temperature=0, max_tokens=1))
    hits = stats()["hit_tokens"]
    out = llm.generate({"prompt_token_ids": longer}, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=K))[0]
    assert stats()["hit_tokens"] == hits, "the prompt-logprobs request took nothing from the cache"
    worst = check_against_reference(reference_model, longer, out.prompt_logprobs)
    print(f"prompt logprobs with a cached prefix: max |diff| {worst:.4f}")
    # without prompt logprobs the same prompt hits the cache (filled by both requests)
    llm.generate({"prompt_token_ids": longer}, SamplingParams(temperature=0, max_tokens=1))
    assert stats()["hit_tokens"] - hits >= len(longer) - llm.engine.scheduler.blocks.block_size
    # and asking twice gives the same numbers
    again = llm.generate({"prompt_token_ids": longer},
                         SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=K))[0]
    assert again.prompt_logprobs == out.prompt_logprobs


def test_prompt_logprobs_with_preemption_and_n(reference_gguf_path, prompts):
    """A KV pool too small for every request preempts some (recomputed on readmission); prompt logprobs are
    the same as in a roomy engine, and an n=2 request reports them once, for its prompt."""
    from tinyvllm.runner import NativeModelRunner
    params = SamplingParams(temperature=0, max_tokens=24, prompt_logprobs=2, ignore_eos=True)
    reqs = [{"prompt_token_ids": p} for p in prompts]
    roomy_llm = LLM(str(reference_gguf_path), threads=2, max_num_seqs=4, max_num_batched_tokens=64)
    roomy = roomy_llm.generate(reqs, params)
    block = NativeModelRunner.kv_bytes_per_block(roomy_llm.engine.config, 16)
    need = [-(-(len(p) + 24) // 16) for p in prompts]  # blocks each request ends with
    tight = LLM(str(reference_gguf_path), threads=2, max_num_seqs=4, max_num_batched_tokens=64,
                kv_cache_bytes=max(max(need) + 1, sum(need) - 3) * block)
    outs = tight.generate(reqs, params)
    assert tight.engine.stats()["preemptions"] > 0
    for a, b in zip(roomy, outs):
        assert a.prompt_logprobs[0] is None and b.prompt_logprobs[0] is None
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert sorted(x) == sorted(y) and all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    two = tight.generate(reqs[2], SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=4, prompt_logprobs=1))[0]
    assert len(two.outputs) == 2 and len(two.prompt_logprobs) == len(prompts[2])
    for pos in range(1, len(prompts[2])):
        t = prompts[2][pos]
        assert abs(two.prompt_logprobs[pos][t].logprob - roomy[2].prompt_logprobs[pos][t].logprob) < 1e-4


def test_prompt_logprobs_zero_and_validation(reference_gguf_path, reference_model, prompts):
    llm = LLM(str(reference_gguf_path), threads=2, kv_cache_bytes="8MB")
    out = llm.generate({"prompt_token_ids": prompts[2]},
                       SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))[0]
    assert all(list(d) == [t] for d, t in zip(out.prompt_logprobs[1:], prompts[2][1:]))
    lsm = ref_log_softmax(reference_model, prompts[2])
    got = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], prompts[2][1:])]
    np.testing.assert_allclose(got, lsm[np.arange(len(got)), prompts[2][1:]], atol=TOL)
    one = llm.generate({"prompt_token_ids": prompts[2][:1]}, SamplingParams(max_tokens=1, prompt_logprobs=3))[0]
    assert one.prompt_logprobs == [None]
    for bad in (-1, 21, 1.5):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)


# ---- the server: /v1/completions with echo, logprobs and max_tokens 0 (lm-evaluation-harness) -----------------
@pytest.fixture(scope="module")
def served(reference_gguf_path):
    """(engine, offline answers, base url): answers are computed before the server's engine thread owns it."""
    import threading
    import time
    import uvicorn
    from tinyvllm import LLMEngine
    from tinyvllm.server.api import build_app
    from tinyvllm.async_llm import AsyncLLM
    engine = LLMEngine(str(reference_gguf_path), threads=2, max_model_len=256, max_num_seqs=4,
                       max_num_batched_tokens=16)
    ctx, cont = "Question: What is the capital of France?\nAnswer:", " Paris is the capital."
    ref = {"score": offline(engine, ctx + cont, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3)),
           "gen": offline(engine, ctx, SamplingParams(temperature=0, max_tokens=4, logprobs=2, prompt_logprobs=2)),
           "ctx": ctx, "cont": cont}
    aeng = AsyncLLM.from_engine(engine)
    server = uvicorn.Server(uvicorn.Config(build_app(aeng, "m"), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    yield engine, ref, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    thread.join(30)
    aeng.shutdown()


def post(url, body):
    import httpx
    return httpx.post(url + "/v1/completions", json={"model": "m", **body}, timeout=120)


def assert_echo_matches(engine, lp, prompt_ids, plp, top):
    strs = [engine.tokenizer.decode([t], skip_special_tokens=False) for t in prompt_ids]
    n = len(prompt_ids)
    assert lp["tokens"][:n] == strs and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"][:n] == [sum(map(len, strs[:i])) for i in range(n)]
    for pos in range(1, n):  # token for token: the same scores as the offline API
        want = plp[pos][prompt_ids[pos]].logprob
        assert lp["token_logprobs"][pos] == pytest.approx(want, abs=1e-5)
        best = {engine.tokenizer.decode([t], skip_special_tokens=False): v.logprob for t, v in plp[pos].items()
                if v.rank <= top or t == prompt_ids[pos]}
        assert lp["top_logprobs"][pos] == pytest.approx(best, abs=1e-5)


def test_server_echo_scores_the_prompt_like_the_offline_api(served):
    """An lm-evaluation-harness `local-completions` loglikelihood request: echo, logprobs, max_tokens 0,
    the prompt as text and as token ids; the answer agrees with the offline API token for token."""
    engine, ref, url = served
    out = ref["score"]
    ids = out.prompt_token_ids
    for prompt in (ref["ctx"] + ref["cont"], ids):
        r = post(url, {"prompt": [prompt], "echo": True, "logprobs": 3, "max_tokens": 0, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        choice = body["choices"][0]
        assert choice["text"] == ref["ctx"] + ref["cont"] and choice["finish_reason"] == "length"
        assert len(choice["logprobs"]["tokens"]) == len(ids)
        assert_echo_matches(engine, choice["logprobs"], ids, out.prompt_logprobs, 3)
        assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    # what the harness computes: the continuation's summed logprob and whether it is the greedy choice
    n_ctx = len(engine.tokenizer.encode(ref["ctx"]))
    lps = choice["logprobs"]["token_logprobs"][n_ctx:]
    assert sum(lps) == pytest.approx(sum(out.prompt_logprobs[i][ids[i]].logprob for i in range(n_ctx, len(ids))))
    # the openai client reads the same answer
    import openai
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    c = client.completions.create(model="m", prompt=ref["ctx"] + ref["cont"], echo=True, logprobs=3, max_tokens=0,
                                  temperature=0)
    assert c.choices[0].logprobs.token_logprobs == choice["logprobs"]["token_logprobs"]


def test_server_echo_with_generation_and_vllm_prompt_logprobs(served):
    engine, ref, url = served
    out = ref["gen"]
    ids, gen = out.prompt_token_ids, out.outputs[0]
    r = post(url, {"prompt": ref["ctx"], "echo": True, "logprobs": 2, "max_tokens": 4, "temperature": 0,
                   "prompt_logprobs": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == ref["ctx"] + gen.text
    lp = choice["logprobs"]
    assert_echo_matches(engine, lp, ids, out.prompt_logprobs, 2)
    assert lp["token_logprobs"][len(ids):] == pytest.approx([d[t] for t, d in zip(gen.token_ids, gen.logprobs)],
                                                            abs=1e-5)
    strs = lp["tokens"]
    assert lp["text_offset"] == [sum(map(len, strs[:i])) for i in range(len(strs))]
    # vLLM's prompt_logprobs field: [None, {token id: {logprob, rank, decoded_token}}, ...]
    plp = choice["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    for pos in range(1, len(ids)):
        want = out.prompt_logprobs[pos]
        assert sorted(map(int, plp[pos])) == sorted(want)
        for t, v in plp[pos].items():
            assert (v["rank"], v["decoded_token"]) == (want[int(t)].rank, want[int(t)].decoded_token)
            assert v["logprob"] == pytest.approx(want[int(t)].logprob, abs=1e-5)
    # without echo, prompt_logprobs alone: the text is only the completion
    r = post(url, {"prompt": ref["ctx"], "max_tokens": 4, "temperature": 0, "prompt_logprobs": 2})
    assert r.json()["choices"][0]["text"] == gen.text and len(r.json()["choices"][0]["prompt_logprobs"]) == len(ids)


@pytest.mark.parametrize("body,word", [
    ({"echo": True, "stream": True, "max_tokens": 2}, "echo"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"prompt_logprobs": 21, "max_tokens": 1}, "prompt_logprobs"),
    ({"prompt_logprobs": 1, "max_tokens": 1, "stream": True}, "prompt_logprobs")])
def test_server_echo_bad_requests(served, body, word):
    _, _, url = served
    r = post(url, {"prompt": "Hi", **body})
    assert r.status_code == 400 and word in r.json()["error"]["message"]
