"""Paged serving on the reference model: continuous batching, chunked prefill, prefix caching,
preemption and forks all give the tokens each request gets alone."""
import pytest

from tinyvllm import LLM, SamplingParams

SYSTEM = "You are a careful assistant. Answer briefly and precisely. " * 3  # a shared prefix (> 2 blocks)
PROMPTS = [SYSTEM + q for q in ["Name a color.", "What is 2+2?", "Say hi.", "Count to five:",
                                "Describe the moon in one sentence.", "Why is the sky blue?"]] + \
          ["Once upon a time", "def add(a, b):", "The list of planets:", "Roses are red,",
           "A" * 3 + " long prompt " * 20, "Q: capital of Italy? A:"]
LENGTHS = [8, 24, 16, 30, 12, 20, 26, 10, 18, 22, 14, 28]


def run(llm, prompts=PROMPTS):
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=n) for n in LENGTHS[:len(prompts)]]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def alone(reference_gguf_path):
    llm = LLM(str(reference_gguf_path), threads=2, enable_prefix_caching=False)
    return [llm.generate(p, SamplingParams(temperature=0, ignore_eos=True, max_tokens=n))[0].outputs[0].token_ids
            for p, n in zip(PROMPTS, LENGTHS)]


@pytest.mark.parametrize("chunk,prefix,kv_blocks", [
    (2048, False, None), (32, False, None), (2048, True, None), (32, True, None),
    (32, True, 14), (2048, False, 14)])
def test_batch_equals_alone(reference_gguf_path, alone, chunk, prefix, kv_blocks):
    """Must-show 1 (issue 4): 12 concurrent requests of mixed lengths, chunked prefill on/off, prefix
    caching on/off, and a KV pool of 14 blocks (224 tokens) that forces preemptions."""
    kv = None if kv_blocks is None else kv_blocks * 16 * 23040  # 22.5 KiB of fp16 K+V per token
    llm = LLM(str(reference_gguf_path), threads=2, max_num_batched_tokens=chunk,
              enable_prefix_caching=prefix, kv_cache_bytes=kv)
    assert run(llm) == alone
    eng = llm.engine
    if kv_blocks:
        assert eng.scheduler.num_preemptions > 0
    stats = eng.scheduler.blocks.prefix_cache_stats
    if not prefix:
        assert stats["hit_tokens"] == 0
    elif chunk == 32:  # admitted step by step: later requests find the shared system prompt computed
        assert stats["hit_tokens"] > 0
    assert eng.scheduler.blocks.num_free_blocks == eng.scheduler.blocks.num_blocks and eng.scheduler.blocks.num_seqs == 0


def test_prefix_cache_reuses_blocks(reference_gguf_path):
    llm = LLM(str(reference_gguf_path), threads=2)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    first = llm.generate(PROMPTS[0], params)[0]
    before = llm.engine.scheduler.blocks.prefix_cache_stats["hit_tokens"]
    second = llm.generate(PROMPTS[0], params)[0]
    hit = llm.engine.scheduler.blocks.prefix_cache_stats["hit_tokens"] - before
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert hit == (len(first.prompt_token_ids) - 1) // 16 * 16 > 0


def test_n_forks_share_blocks_and_match_independent_runs(reference_gguf_path):
    """n=3 completions fork the prompt's blocks (one prefill, copy-on-write on the shared last
    block); completion i draws from seed + i, so it must equal an n=1 run with that seed."""
    llm = LLM(str(reference_gguf_path), threads=2, enable_prefix_caching=False)
    prompt = "Write a story about a robot:"  # 7 tokens: the last block is partial and shared
    eng = llm.engine
    eng.add_request("r", prompt, SamplingParams(n=3, temperature=0.8, seed=11, max_tokens=20))
    eng.step()
    eng.scheduler.flush()  # the forks ride on the next step's block-manager call: send them now
    assert eng.scheduler.blocks.ref_counts().max() == 3  # one prompt block, three sequences
    outs = []
    while eng.has_unfinished_requests():
        outs += [o for o in eng.step() if o.finished]
    together = [o.token_ids for o in outs[0].outputs]
    single = [llm.generate(prompt, SamplingParams(temperature=0.8, seed=11 + i, max_tokens=20))[0].outputs[0].token_ids
              for i in range(3)]
    assert together == single and len({tuple(t) for t in together}) == 3
    assert eng.scheduler.blocks.num_free_blocks == eng.scheduler.blocks.num_blocks
