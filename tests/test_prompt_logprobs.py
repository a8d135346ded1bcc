"""SamplingParams(prompt_logprobs=k) against the float64 reference forward (tests/reference_forward.py),
teacher forced: every prompt position's logprob of the actual next prompt token, and its top-k, equal the
reference's log-softmax within TOL, with chunked prefill on and off and with prefix caching on."""
import numpy as np
import pytest

from tinyvllm import LLM, SamplingParams
from tinyvllm.outputs import Logprob

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
