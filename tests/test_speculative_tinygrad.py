"""Speculative decoding on the tinygrad runner (device="tinygrad", tinygrad's CPU device here): the k + 1
positions of a verification run in one forward and give the logits of k + 1 one-token decodes; greedy
output is the same with and without speculation (n-gram lookup and a draft model, which runs on tinygrad
too); rejected drafts give their slots and whole blocks back.

Every engine here runs one graph bucket (8 tokens, 32 blocks, 8 logits rows) and the runner test adds a
second (1 token): each bucket is a capture of tens of seconds on busy cores, shared by the whole module
(tinygrad caches compiled kernels per process)."""
import numpy as np
import pytest

import tiny_models as tm
from reference_forward import ReferenceModel
from test_tinygrad import needs_tinygrad
from tinyvllm import LLM, SamplingParams

BLOCK = 4   # small blocks: drafts often cross a block boundary, so rejections give whole blocks back
BLOCKS = 40
K = 3
ENGINE = dict(device="tinygrad", threads=1, max_num_batched_tokens=8, max_num_seqs=2, block_size=BLOCK,
              kv_cache_bytes=(BLOCKS + 1) * 2 * 2 * BLOCK * 2 * 16 * 2)  # + the runner's padding block
NGRAM = {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
PROMPTS = ["the quick brown fox jumps over the lazy dog the quick brown", "Paris is the capital of France. Paris"]
GREEDY = SamplingParams(temperature=0, max_tokens=28, ignore_eos=True)


def _one_bucket(runner):
    runner.min_tokens, runner.min_rows, runner.min_blocks = 8, 8, 32
    return runner


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return str(tm.make_tiny_gguf(tmp_path_factory.mktemp("spec_tg") / "t.gguf", qtype="Q8_0"))


def _llm(path, **kw):
    draft = kw.get("speculative_config", {}).get("method") == "draft_model"
    # a draft model's KV blocks are paid from the same bytes: twice the bytes, the same blocks (same graphs)
    llm = LLM(path, **dict(ENGINE, kv_cache_bytes=ENGINE["kv_cache_bytes"] * (2 if draft else 1)), **kw)
    assert llm.engine.runner.num_blocks == BLOCKS
    _one_bucket(llm.engine.runner)
    if llm.engine.spec is not None and hasattr(llm.engine.spec.proposer, "runner"):
        _one_bucket(llm.engine.spec.proposer.runner)  # the draft model's tinygrad runner
    return llm


def _generate_checking_rollback(llm, prompts, params):
    """generate() step by step: after every step no running sequence holds a slot past its tokens (rejected
    drafts' slots were given back) nor a block past its last slot; at the end every block is free. Returns (token ids per prompt, engine stats, whole blocks given back by truncations)."""
    eng = llm.engine
    bm, sched = eng.scheduler.blocks, eng.scheduler
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params)
    outs, returned = {}, 0
    while eng.has_unfinished_requests():
        step_outs = eng.step()
        outs.update((o.request_id, o.outputs[0].token_ids) for o in step_outs if o.finished)
        free = bm.num_free_blocks
        sched.flush()  # apply the step's pending truncations now, to look at them
        for seq in sched.running:
            slots, blocks, _ = bm.seq_info(seq.seq_id)
            # no slot past the sequence's tokens (a rejected draft's slot is gone; the newest token gets its
            # slot when it is scheduled) and no block past its last slot
            assert seq.num_computed_tokens <= slots <= len(seq) and blocks == -(-slots // BLOCK), (slots, blocks, len(seq))
        if not any(o.finished for o in step_outs):  # no sequence was freed: what came back was truncated
            returned += bm.num_free_blocks - free
    bm.check()
    assert bm.num_seqs == 0 and bm.num_free_blocks == bm.num_blocks
    return [outs[str(i)] for i in range(len(prompts))], eng.stats(), returned


@needs_tinygrad
def test_verification_in_one_forward_equals_single_token_decodes(tiny_path):
    """One forward over [last, d1..d4] (the 8-token bucket) gives, row for row, the logits of five
    one-token decodes (the 1-token bucket: other kernels), and both match the float64 oracle; then the
    last three positions are "rejected" and decoded again with other tokens: the stale K/V of the rejected
    drafts is overwritten or masked, the logits are those of the new token sequence."""
    from tinyvllm.model import load_model
    from tinyvllm.runner import TinygradModelRunner
    runner = TinygradModelRunner(load_model(tiny_path), num_blocks=BLOCKS, block_size=BLOCK, min_blocks=32)
    ref = ReferenceModel.from_gguf(tiny_path)
    rng = np.random.default_rng(0)
    vocab = runner.config.vocab_size
    prompt, drafts = rng.integers(0, vocab, 16).astype(np.int32), rng.integers(0, vocab, 5).astype(np.int32)
    table = rng.permutation(BLOCKS)[:12].astype(np.int32)[None]  # a scattered block table
    for s in range(0, 16, 8):  # the prompt in two 8-token chunks (the 8-token bucket, every row scored)
        got = runner.forward(prompt[s:s + 8], np.arange(s, s + 8), np.zeros(8), table, np.arange(8))
    want = ref.prefill_logits(list(prompt))
    scale = np.abs(want).max()
    assert np.abs(got - want[8:]).max() < 1e-3 * scale
    n = len(prompt)
    multi = runner.forward(drafts, np.arange(n, n + 5), np.zeros(5), table, np.arange(5))
    single = np.stack([runner.forward(drafts[i:i + 1], [n + i], [0], table, [0])[0] for i in range(5)])
    assert set(runner.jits) == {(8, 32, 8), (1, 32, 1)}
    # the runner's tolerance: fp32 on this device (measured here: bit-identical); argmax equal is what
    # keeps greedy output unchanged
    assert np.abs(multi - single).max() <= 1e-5 * scale
    assert (np.argmax(multi, 1) == np.argmax(single, 1)).all()
    oracle = ref.prefill_logits(list(prompt) + list(drafts))[n - 1:][1:]
    assert np.abs(multi - oracle).max() < 1e-3 * scale
    # reject d3..d5: decode other tokens at their positions (one forward, like the next verification)
    other = (drafts[2:] + 1) % vocab
    again = runner.forward(other, np.arange(n + 2, n + 5), np.zeros(3), table, np.arange(3))
    oracle = ref.prefill_logits(list(prompt) + list(drafts[:2]) + list(other))[-3:]
    assert np.abs(again - oracle).max() < 1e-3 * scale
    assert np.abs(again - multi[2:]).max() > 1e-2 * scale  # the new tokens really changed the logits


@needs_tinygrad
def test_ngram_greedy_identical_and_rejections_roll_back(tiny_path):
    want, st, _ = _generate_checking_rollback(_llm(tiny_path), PROMPTS, GREEDY)
    assert st["spec_decode"] is None
    got, st, returned = _generate_checking_rollback(_llm(tiny_path, speculative_config=NGRAM), PROMPTS, GREEDY)
    assert got == want
    native = LLM(tiny_path, threads=1).generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in native] == want  # and the native core agrees
    spec = st["spec_decode"]
    assert spec["num_drafts"] > 0 and spec["num_accepted_tokens"] > 0
    assert spec["num_draft_tokens"] > spec["num_accepted_tokens"]  # some drafts were rejected...
    assert returned > 0  # ...and whole blocks of rejected drafts went back to the pool


@needs_tinygrad
def test_draft_model_on_tinygrad(tiny_path, tmp_path):
    """The draft model runs in its own tinygrad runner (same device, same block tables): the target as its
    own draft accepts every greedy draft; another model's drafts leave the output unchanged."""
    want, _, _ = _generate_checking_rollback(_llm(tiny_path), PROMPTS, GREEDY)
    same = {"method": "draft_model", "model": tiny_path, "num_speculative_tokens": K}
    llm = _llm(tiny_path, speculative_config=same)
    assert type(llm.engine.spec.proposer.runner).__name__ == "TinygradModelRunner"
    got, st, _ = _generate_checking_rollback(llm, PROMPTS, GREEDY)
    assert got == want and st["spec_decode"]["acceptance_rate"] == 1.0 and st["spec_decode"]["num_drafts"] > 0
    other = str(tm.make_tiny_gguf(tmp_path / "d.gguf", qtype="Q8_0", seed=1))
    got, st, _ = _generate_checking_rollback(_llm(tiny_path, speculative_config=dict(same, model=other)),
                                             PROMPTS, GREEDY)
    assert got == want and st["spec_decode"]["num_drafts"] > 0 and st["spec_decode"]["acceptance_rate"] < 1.0
