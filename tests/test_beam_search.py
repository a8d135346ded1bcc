"""Beam search (engine requests with BeamSearchParams, LLM.beam_search over them) against a brute-force
beam search over the float64 reference forward (tests/reference_forward.py) on a tiny random-weight GGUF
model: same beams, same scores, also batched with ordinary requests and under a pool small enough to
preempt beams; the beams' KV shares blocks through native forks (fewer blocks than independent
sequences) and every block returns to the pool (finished, aborted, failed); bad parameters are refused."""
import json
import math
import socket
import time

import numpy as np
import pytest

import tiny_models as tm
from reference_forward import ReferenceModel
from tinyvllm import LLM, BeamSearchParams, SamplingParams

TOL = 1e-4  # |cum_logprob| difference allowed: float32 forward vs float64 (measured: <= 1e-5)
PROMPTS = ["the cat sat on", "once upon a time 42", {"prompt_token_ids": [5, 6, 7]}]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tm.make_tiny_gguf(tmp_path_factory.mktemp("beam") / "m.gguf", qtype="F32")


@pytest.fixture(scope="module")
def ref(model_path):
    return ReferenceModel.from_gguf(model_path)


@pytest.fixture(scope="module")
def llm(model_path):
    return LLM(model_path, threads=1, kv_cache_dtype="float32")


def log_softmax(row: np.ndarray) -> np.ndarray:
    m = row.max()
    return row - (m + math.log(np.exp(row - m).sum()))


def reference_beam_search(ref, prompt, width, max_tokens, eos=(), length_penalty=1.0, count_eos=False):
    """Written from vLLM's description, on the float64 forward (whole-sequence recompute per beam).
    Returns (best beams as (tokens, cum_logprob, finish_reason), the smallest score gap at any cut).
    count_eos: a wrong rule (a final EOS counted in the length), to find cases that tell the two apart."""
    beams, finished, margin = [(list(prompt), 0.0)], [], math.inf
    for _ in range(max_tokens):
        cands = []
        for tokens, cum in beams:
            lsm = log_softmax(ref.prefill_logits(tokens)[-1])
            for t in sorted(range(len(lsm)), key=lambda t: (-lsm[t], t))[:2 * width]:
                (finished if t in eos else cands).append((tokens + [t], cum + lsm[t]))
        cands.sort(key=lambda c: -c[1])
        if len(cands) > width:
            margin = min(margin, cands[width - 1][1] - cands[width][1])
        beams = cands[:width]
        if not beams:
            break

    def scale(c):  # score = cum_logprob * scale: an error e in cum_logprob moves the score by e * scale
        return 1.0 / (len(c[0]) - (c[0][-1] in eos and not count_eos)) ** length_penalty
    done = sorted([(t, c, "stop") for t, c in finished] + [(t, c, "length") for t, c in beams],
                  key=lambda c: -c[1] * scale(c))
    if len(done) > width:  # the final cut, in cum_logprob units
        a, b = done[width - 1], done[width]
        margin = min(margin, (a[1] * scale(a) - b[1] * scale(b)) / max(scale(a), scale(b)))
    return done[:width], margin


def prompt_ids(llm, p):
    return p["prompt_token_ids"] if isinstance(p, dict) else llm.tokenizer.encode(p)


def assert_pool_empty(llm):
    blocks = llm.engine.scheduler.blocks
    blocks.check()
    assert blocks.num_seqs == 0 and blocks.num_free_blocks == blocks.num_blocks
    assert not llm.engine.scheduler.has_work()


def check_against_reference(llm, ref, outs, width, max_tokens, eos=(), length_penalty=1.0):
    worst = 0.0
    for p, out in zip(PROMPTS, outs):
        ids = prompt_ids(llm, p)
        want, margin = reference_beam_search(ref, ids, width, max_tokens, eos, length_penalty)
        print(f"width {width} eos {set(eos)} lp {length_penalty}: smallest reference score gap at a cut {margin:.2e}")
        assert margin > 10 * TOL, "the case is a near-tie: pick another prompt or seed"
        assert len(out.sequences) == len(want) == width
        for got, (tokens, cum, reason) in zip(out.sequences, want):
            assert got.tokens == tokens and got.finish_reason == reason
            assert abs(got.cum_logprob - cum) < TOL, (got.cum_logprob, cum)
            worst = max(worst, abs(got.cum_logprob - cum))
            assert got.text == llm.tokenizer.decode(tokens, skip_special_tokens=False)
            assert len(got.logprobs) == len(tokens) - len(ids)
            for step, entry in enumerate(got.logprobs):  # the chosen token is among its step's candidates
                assert tokens[len(ids) + step] in entry and len(entry) == 2 * width
    print(f"largest |cum_logprob - reference| {worst:.2e}")


@pytest.mark.parametrize("width", [1, 2, 4])
def test_equals_reference_beam_search(llm, ref, width):
    outs = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=width, max_tokens=7))
    check_against_reference(llm, ref, outs, width, 7)
    assert_pool_empty(llm)
    if width == 1:  # width 1 is greedy decoding
        greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))
        assert [o.sequences[0].tokens for o in outs] == [g.prompt_token_ids + g.outputs[0].token_ids for g in greedy]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 3.0])
def test_eos_and_length_penalty_equal_reference(llm, ref, length_penalty, monkeypatch):
    """EOS: a token the model ranks high is made the EOS (the tiny model's own <|im_end|> is rarely a
    candidate), so candidates end early at several steps and compete with the longer beams."""
    ids = prompt_ids(llm, PROMPTS[0])
    eos = int(np.argsort(-ref.prefill_logits(ids)[-1])[1])  # the second likeliest first token
    monkeypatch.setattr(llm.engine, "eos_token_ids", frozenset({eos}))
    outs = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=3, max_tokens=6, length_penalty=length_penalty))
    check_against_reference(llm, ref, outs, 3, 6, eos=(eos,), length_penalty=length_penalty)
    stopped = [s for o in outs for s in o.sequences if s.finish_reason == "stop"]
    assert all(s.tokens[-1] == eos for s in stopped)
    if length_penalty == 0.0:  # raw cum_logprob: the short finished beams win
        assert stopped
    # ignore_eos: EOS is a token like any other
    outs = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=3, max_tokens=6, length_penalty=length_penalty,
                                                     ignore_eos=True))
    check_against_reference(llm, ref, outs, 3, 6, length_penalty=length_penalty)
    assert_pool_empty(llm)


def test_final_eos_is_not_counted_in_the_length(llm, ref, monkeypatch):
    """A case (found here, on the reference) whose ranking changes if a final EOS counted in the length."""
    ids = prompt_ids(llm, PROMPTS[0])
    greedy, _ = ref.greedy(ids, 6, eos_ids=[])
    logits = ref.prefill_logits(ids + greedy)[len(ids) - 1:]
    cases = [(int(t), lp) for row in logits for t in np.argsort(-row)[:4] for lp in (0.5, 1.0, 2.0, 4.0)]
    for eos, lp in cases:
        want, margin = reference_beam_search(ref, ids, 3, 6, (eos,), lp)
        wrong, _ = reference_beam_search(ref, ids, 3, 6, (eos,), lp, count_eos=True)
        if [w[0] for w in want] != [w[0] for w in wrong] and margin > 10 * TOL:
            break
    else:
        pytest.fail("no case tells the two length rules apart")
    monkeypatch.setattr(llm.engine, "eos_token_ids", frozenset({eos}))
    out = llm.beam_search({"prompt_token_ids": ids}, BeamSearchParams(beam_width=3, max_tokens=6, length_penalty=lp))[0]
    assert [(s.tokens, s.finish_reason) for s in out.sequences] == [(t, r) for t, _, r in want]
    assert_pool_empty(llm)


def test_one_batched_forward_per_step_and_waves(model_path, ref):
    """All beams of all prompts run in one forward per step; with fewer sequence slots than beams the
    prompts run in waves, with the same results."""
    llm = LLM(model_path, threads=1, kv_cache_dtype="float32")
    calls, forward = [], llm.engine.runner.forward
    llm.engine.runner.forward = lambda *a: calls.append(len(a[0])) or forward(*a)
    outs = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=3, max_tokens=5))
    assert len(calls) == 5 and calls[1:] == [9] * 4  # step 1 prefills the prompts; then 3 prompts x 3 beams
    check_against_reference(llm, ref, outs, 3, 5)
    small = LLM(model_path, threads=1, kv_cache_dtype="float32", max_num_seqs=4)  # one prompt's beams at a time
    rows, small_forward = [], small.engine.runner.forward  # a group holds its width in slots from admission on
    small.engine.runner.forward = lambda *a: rows.append(int(a[2].max()) + 1) or small_forward(*a)
    assert [o.sequences for o in small.beam_search(PROMPTS, BeamSearchParams(beam_width=3, max_tokens=5))] == \
        [o.sequences for o in outs]
    assert max(rows) == 3 and len(rows) == 15  # never two groups at once: 3 prompts x 5 steps
    assert_pool_empty(small)
    calls.clear()
    one_at_a_time = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=3, max_tokens=5), concurrency_limit=1)
    assert [o.sequences for o in one_at_a_time] == [o.sequences for o in outs] and len(calls) == 15
    assert_pool_empty(llm)


def test_context_end_is_the_last_step(model_path, ref):
    """Beams stop at max_model_len (finish_reason "length"), as if max_tokens ended there."""
    llm = LLM(model_path, threads=1, kv_cache_dtype="float32", max_model_len=12)
    ids = [5, 6, 7, 8, 9, 10, 11, 12]
    out = llm.beam_search({"prompt_token_ids": ids}, BeamSearchParams(beam_width=3, max_tokens=10))[0]
    want, _ = reference_beam_search(ref, ids, 3, 4)
    assert [(s.tokens, s.finish_reason) for s in out.sequences] == [(t, r) for t, _, r in want]
    assert all(len(s.tokens) == 12 for s in out.sequences)
    assert_pool_empty(llm)


def peak_blocks_used(llm) -> list[int]:
    """Blocks in use at each forward (after the step's allocation), the peak kept in the returned list."""
    runner, blocks, peak = llm.engine.runner, llm.engine.scheduler.blocks, [0]
    forward = runner.forward

    def probed(*a):
        peak[0] = max(peak[0], blocks.num_blocks - blocks.num_free_blocks)
        return forward(*a)
    runner.forward = probed
    return peak


def test_batched_with_an_ordinary_request_and_stats(llm, ref):
    """A beam search and ordinary requests in the same steps (continuous batching): the beams equal the
    reference, the greedy request equals its lone run, and the engine's stats count the beam steps."""
    eng = llm.engine
    params = BeamSearchParams(beam_width=3, max_tokens=6)
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    alone = llm.generate("a long way", greedy)[0].outputs[0].token_ids
    before = eng.stats()["beam_search"]
    calls, forward = [], eng.runner.forward
    eng.runner.forward = lambda *a: calls.append(len(a[0])) or forward(*a)
    try:
        other = eng.add_request(None, "a long way", greedy)
        eng.step()  # the ordinary request is running when the beam searches arrive
        outs = llm.beam_search(PROMPTS, params)
        while eng.has_unfinished_requests():
            for out in eng.step():
                if out.request_id == other and out.finished:
                    assert out.outputs[0].token_ids == alone
    finally:
        eng.runner.forward = forward
    check_against_reference(llm, ref, outs, 3, 6)
    assert calls[2] == 1 + 9  # the ordinary decode and 3 prompts x 3 beams in one forward
    after = eng.stats()["beam_search"]
    assert after["steps"] - before["steps"] == 6 and after["beam_rows"] - before["beam_rows"] == 3 + 5 * 9
    assert after["requests"] == 0
    assert_pool_empty(llm)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_small_kv_cache_preempts_beams_with_the_same_results(model_path, prefix_caching):
    """A pool that holds one prompt's worst case but not everything at once: beams are preempted and
    recomputed (an ordinary request runs alongside; when only beams waiting for preempted group mates
    hold the pool, the oldest group goes first), with the same results as in a roomy pool; a search that
    cannot fit at all is refused up front."""
    from tinyvllm.beam_search import blocks_needed
    roomy = LLM(model_path, threads=1, kv_cache_dtype="float32", enable_prefix_caching=prefix_caching)
    params = BeamSearchParams(beam_width=4, max_tokens=24)
    want = roomy.beam_search(PROMPTS, params)
    need = [blocks_needed(len(o.sequences[0].tokens) - 24, 24, 4, 16, prefix_caching) for o in want]
    per_block = roomy.engine.runner.kv_bytes_per_block(roomy.engine.config, 16, "float32")
    tight = LLM(model_path, threads=1, kv_cache_dtype="float32", kv_cache_bytes=per_block * max(need),
                enable_prefix_caching=prefix_caching)
    assert tight.engine.scheduler.blocks.num_blocks < sum(need)
    eng = tight.engine
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    alone = roomy.generate("once upon a time", greedy)[0].outputs[0].token_ids
    other = eng.add_request(None, "once upon a time", greedy)
    steps, step = [0], eng.step

    def bounded_step():  # a livelock (beams readmitted in turn, forever) fails here instead of hanging
        steps[0] += 1
        assert steps[0] < 2000, "no progress: the beam groups keep preempting each other"
        return step()
    eng.step = bounded_step
    got = tight.beam_search(PROMPTS, params)
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.request_id == other and out.finished:
                assert out.outputs[0].token_ids == alone
    print(f"preemptions: {eng.scheduler.num_preemptions}, steps: {steps[0]}")
    assert eng.scheduler.num_preemptions > 0
    assert [[(s.tokens, s.finish_reason) for s in o.sequences] for o in got] == \
        [[(s.tokens, s.finish_reason) for s in o.sequences] for o in want]
    for g, w in zip(got, want):
        assert all(abs(a.cum_logprob - b.cum_logprob) < TOL for a, b in zip(g.sequences, w.sequences))
    assert_pool_empty(tight)
    with pytest.raises(ValueError, match="KV blocks"):
        tight.beam_search(PROMPTS[0], BeamSearchParams(beam_width=4, max_tokens=100))
    assert_pool_empty(tight)


def test_beams_do_not_speculate_beside_requests_that_do(model_path, llm):
    """With n-gram speculation on, ordinary requests speculate and beams do not (the search scores one
    position per beam and step): the beams are those of an engine without speculation."""
    want = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=3, max_tokens=6))
    spec = LLM(model_path, threads=1, kv_cache_dtype="float32", speculative_config={
        "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1})
    eng = spec.engine
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    other = eng.add_request(None, {"prompt_token_ids": [5, 6, 7, 8] * 6}, greedy)
    eng.step()
    got = spec.beam_search(PROMPTS, BeamSearchParams(beam_width=3, max_tokens=6))
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.request_id == other and out.finished:  # speculation keeps greedy output exact
                alone = llm.generate({"prompt_token_ids": [5, 6, 7, 8] * 6}, greedy)[0].outputs[0].token_ids
                assert out.outputs[0].token_ids == alone
    assert [[s.tokens for s in o.sequences] for o in got] == [[s.tokens for s in o.sequences] for o in want]
    assert eng.stats()["spec_decode"]["num_draft_tokens"] > 0, eng.stats()["spec_decode"]
    assert_pool_empty(spec)


def test_abort_frees_every_beam(model_path):
    """An engine-level abort mid-search frees every beam's blocks and ends the request with its live beams
    (finish_reason "abort")."""
    llm = LLM(model_path, threads=1)
    eng = llm.engine
    rid = eng.add_request(None, PROMPTS[0], BeamSearchParams(beam_width=4, max_tokens=20))
    keep = eng.add_request(None, PROMPTS[1], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    for _ in range(4):
        assert not [o for o in eng.step() if o.request_id == rid]  # a beam search has output only at its end
    assert len(eng.scheduler.running) == 5  # four live beams and the ordinary request
    out = eng.abort(rid)
    assert out.finished and len(out.outputs) == 4 and {c.finish_reason for c in out.outputs} == {"abort"}
    assert all(len(c.token_ids) == 4 for c in out.outputs)  # one token chosen per step (the prefill's included)
    assert eng.stats()["beam_search"]["requests"] == 0
    eng.abort(keep)
    assert_pool_empty(llm)


def test_forks_use_fewer_blocks_than_independent_sequences(model_path):
    """Width-4 beams on a long prompt hold the prompt's blocks once; four independent sequences (no
    prefix caching, so nothing is shared) hold four copies."""
    prompt = {"prompt_token_ids": [int(t) for t in np.random.default_rng(3).integers(3, 300, 200)]}
    beams = LLM(model_path, threads=1)
    peak = peak_blocks_used(beams)
    copies, copy_block = [], beams.engine.runner.copy_block
    beams.engine.runner.copy_block = lambda src, dst: copies.append((src, dst)) or copy_block(src, dst)
    beams.beam_search([prompt], BeamSearchParams(beam_width=4, max_tokens=20))
    assert_pool_empty(beams)
    assert copies  # the prompt's last block is partial: the first forks share it until each beam writes
    independent = LLM(model_path, threads=1, enable_prefix_caching=False)
    ind_peak = peak_blocks_used(independent)
    independent.generate([prompt] * 4, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    prompt_blocks = -(-200 // 16)
    print(f"peak blocks: width-4 beam search {peak[0]}, four independent sequences {ind_peak[0]}")
    assert ind_peak[0] >= 4 * prompt_blocks
    assert peak[0] <= prompt_blocks + 4 * 3  # the prompt once, then at most 3 own blocks per beam (220 tokens)
    assert peak[0] < ind_peak[0] / 2


def test_temperature_adds_the_sampled_token_as_a_candidate():
    """vLLM's beam search asks its sampler for 2 * width logprobs at the request's temperature: the token
    it samples joins the candidates. At temperature 0 the draw is the argmax, already among them."""
    from tinyvllm.beam_search import top_candidates
    logits = np.random.default_rng(3).normal(size=500).astype(np.float32)
    x = logits.astype(np.float64)
    lsm = x - np.log(np.exp(x - x.max()).sum()) - x.max()
    order = list(np.argsort(-lsm, kind="stable"))
    plain = top_candidates(logits, 4)
    assert [t for t, _, _ in plain] == order[:4] and [r for _, _, r in plain] == [1, 2, 3, 4]
    assert top_candidates(logits, 4, 1e-6, np.random.default_rng(0)) == plain  # the draw is the argmax
    rng, extra = np.random.default_rng(0), []
    for _ in range(20):  # a near-uniform temperature draws outside the top 4 nearly always
        cands = top_candidates(logits, 4, 1e4, rng)
        assert cands[:4] == plain and len(cands) in (4, 5)
        extra += cands[4:]
    assert len(extra) >= 15
    for t, lp, rank in extra:
        assert abs(lp - lsm[t]) < 1e-12 and rank == order.index(t) + 1


def test_a_sampled_search_runs_and_keeps_its_books(llm):
    """temperature > 0 through the engine: every step's candidates are the 2 * width likeliest plus at most
    the sampled one, each beam's cum_logprob is the sum of its tokens' raw logprobs, and it frees its blocks."""
    width, steps = 2, 6
    (out,) = llm.beam_search([PROMPTS[0]], BeamSearchParams(beam_width=width, max_tokens=steps, temperature=50.0))
    n = len(prompt_ids(llm, PROMPTS[0]))
    assert len(out.sequences) == width
    sizes = set()
    for seq in out.sequences:
        gen = seq.tokens[n:]
        assert len(seq.logprobs) == len(gen)
        assert abs(seq.cum_logprob - sum(e[t].logprob for t, e in zip(gen, seq.logprobs))) < 1e-9
        sizes |= {len(e) for e in seq.logprobs}
    assert sizes <= {2 * width, 2 * width + 1} and 2 * width + 1 in sizes  # the temperature explored
    assert_pool_empty(llm)


def test_bad_params_and_a_busy_engine(llm):
    for kw, word in [(dict(beam_width=0, max_tokens=4), "beam_width"), (dict(beam_width=2, max_tokens=0), "max_tokens"),
                     (dict(beam_width=2.5, max_tokens=4), "beam_width"), (dict(beam_width=True, max_tokens=4), "beam_width"),
                     (dict(beam_width=2, max_tokens=4, temperature=-0.7), "temperature"),
                     (dict(beam_width=2, max_tokens=4, temperature=float("inf")), "temperature"),
                     (dict(beam_width=2, max_tokens=4, length_penalty=float("nan")), "length_penalty")]:
        with pytest.raises(ValueError, match=word):
            BeamSearchParams(**kw)
    params = BeamSearchParams(beam_width=2, max_tokens=4)
    with pytest.raises(ValueError, match="max_num_seqs"):
        llm.beam_search("the cat", BeamSearchParams(beam_width=33, max_tokens=4))
    with pytest.raises(ValueError, match="empty"):
        llm.beam_search(["the cat", ""], params)
    with pytest.raises(ValueError, match="prompt token ids"):
        llm.beam_search({"prompt_token_ids": [1, 10 ** 6]}, params)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.beam_search({"prompt_token_ids": [5] * llm.engine.max_model_len}, params)
    with pytest.raises(TypeError):
        llm.beam_search("the cat", SamplingParams())
    with pytest.raises(TypeError):
        llm.engine.add_request(None, "the cat", {"beam_width": 2})
    with pytest.raises(ValueError, match="concurrency_limit"):
        llm.beam_search("the cat", params, concurrency_limit=0)
    # an unfinished stream no longer stops a beam search: both run in the same steps
    want = llm.beam_search("the cat", params)
    stream = llm.stream("the cat", SamplingParams(max_tokens=8))
    next(stream)
    assert [s.tokens for s in llm.beam_search("the cat", params)[0].sequences] == [s.tokens for s in want[0].sequences]
    stream.close()
    assert_pool_empty(llm)


def test_a_failing_step_frees_every_beam(model_path):
    llm = LLM(model_path, threads=1)
    forward, calls = llm.engine.runner.forward, []

    def failing(*a):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("boom")
        return forward(*a)
    llm.engine.runner.forward = failing
    with pytest.raises(RuntimeError, match="boom"):
        llm.beam_search(PROMPTS, BeamSearchParams(beam_width=4, max_tokens=8))
    assert_pool_empty(llm)
    llm.engine.runner.forward = forward
    assert len(llm.beam_search(PROMPTS, BeamSearchParams(beam_width=2, max_tokens=3))) == 3
    assert_pool_empty(llm)


def test_real_model_scores_are_the_reference_scores(reference_gguf_path, reference_model):
    """SmolLM2-135M (Q4_1): each returned beam's cum_logprob is the float64 reference's log-probability of
    its tokens (teacher forced; quantized activations: a small tolerance), the beams are distinct and
    ranked by score, and width 1 is greedy decoding."""
    from tinyvllm.beam_search import beam_search_score
    llm = LLM(str(reference_gguf_path), threads=2)
    prompt = llm._chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    n = len(prompt["prompt_token_ids"])
    out = llm.beam_search(prompt, BeamSearchParams(beam_width=4, max_tokens=12))[0]
    eos = llm.engine.eos_token_ids
    assert len({tuple(s.tokens) for s in out.sequences}) == 4
    scores = [beam_search_score(s.tokens, s.cum_logprob, eos, 1.0) for s in out.sequences]
    assert scores == sorted(scores, reverse=True)
    for s in out.sequences:
        assert s.tokens[:n] == prompt["prompt_token_ids"] and s.text.startswith(prompt["prompt"])
        lsm = np.array([log_softmax(r) for r in reference_model.prefill_logits(s.tokens)[n - 1:-1]])
        want = float(sum(lsm[i, t] for i, t in enumerate(s.tokens[n:])))
        print(f"beam {s.text[len(prompt['prompt']):]!r}: cum_logprob {s.cum_logprob:.4f}, reference {want:.4f}")
        assert abs(s.cum_logprob - want) < 0.05, (s.cum_logprob, want)  # measured: <= 0.006
    assert out.sequences[0].text[len(prompt["prompt"]):] == "The capital of France is Paris.<|im_end|>"
    greedy = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    best = llm.beam_search(prompt, BeamSearchParams(beam_width=1, max_tokens=12))[0].sequences[0]
    assert best.tokens[n:] == greedy.token_ids and best.finish_reason == greedy.finish_reason == "stop"
    assert_pool_empty(llm)


def test_server_equals_offline_api(model_path, llm):
    """The OpenAI server's use_beam_search (the openai client, n = beam width) returns LLM.beam_search's
    beams as choices (prompt i's beams at indices i * n ..., best first), streamed or not; widths the
    engine cannot hold (max_num_seqs, KV blocks) are 400s naming n; a client that hangs up mid-search
    (streaming or not) gets its search aborted; afterwards every block is free."""
    import httpx
    import openai
    from test_server import LiveServer, idle
    from tinyvllm.server.api import build_app
    per_block = llm.engine.runner.kv_bytes_per_block(llm.engine.config, 16, "float32")
    llm = LLM(model_path, threads=1, kv_cache_dtype="float32", max_num_seqs=8, max_model_len=64,
              kv_cache_bytes=16 * per_block)  # 16 blocks: width 8 over 60 tokens would need 32
    params = BeamSearchParams(beam_width=3, max_tokens=6, length_penalty=0.5)
    prompts = PROMPTS[:2]
    want = llm.beam_search(prompts, params)
    expected = []
    for p, out in zip(prompts, want):
        n = len(prompt_ids(llm, p))
        for s in out.sequences:
            gen = s.tokens[n:]
            shown = gen[:-1] if s.finish_reason == "stop" else gen
            expected.append((llm.tokenizer.decode(shown, skip_special_tokens=True), s.finish_reason))
    server = LiveServer(build_app(llm.engine, "tiny"))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        body = dict(model="tiny", prompt=prompts, n=3, max_tokens=6,
                    extra_body={"use_beam_search": True, "length_penalty": 0.5})
        r = client.completions.create(**body)
        assert [(c.index, c.text, c.finish_reason) for c in r.choices] == \
            [(i, t, f) for i, (t, f) in enumerate(expected)]
        texts, finish = {}, {}
        for chunk in client.completions.create(**body, stream=True):
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + c.text
                finish[c.index] = c.finish_reason or finish.get(c.index)
        assert [(texts[i], finish[i]) for i in range(6)] == expected
        for n, max_tokens in [(9, 6), (8, 60), (0, 6)]:  # over max_num_seqs, over the KV cache, no beam
            with pytest.raises(openai.BadRequestError) as e:
                client.completions.create(model="tiny", prompt="the cat", n=n, max_tokens=max_tokens,
                                          extra_body={"use_beam_search": True})
            assert e.value.body["param"] == "n", e.value.body
        aeng = server.server.config.app.state.async_llm
        assert aeng.wait_until(idle, timeout=120), aeng.stats
        assert aeng.stats["beam_search"]["steps"] >= 2 * 6
        # clients that hang up mid-search, streaming or not: the search is aborted, every beam freed
        forward = llm.engine.runner.forward
        llm.engine.runner.forward = lambda *a: time.sleep(0.05) or forward(*a)  # a search of seconds
        for stream in (True, False):
            steps, aborted = aeng.stats["beam_search"]["steps"], aeng.num_aborted
            searching = lambda a: a.stats["beam_search"]["steps"] > steps + 2
            body = {"model": "tiny", "prompt": "the cat", "n": 4, "max_tokens": 60, "ignore_eos": True,
                    "use_beam_search": True, "stream": stream}
            if stream:
                with httpx.Client(timeout=60) as c, c.stream("POST", server.url + "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    assert aeng.wait_until(searching, timeout=60)
            else:  # a beam search has no update to notice the hang-up at: the server polls
                data = json.dumps(body).encode()
                host, port = server.url.removeprefix("http://").split(":")
                with socket.create_connection((host, int(port))) as sock:
                    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
                    assert aeng.wait_until(searching, timeout=60)
            assert aeng.wait_until(idle, timeout=120), aeng.stats
            assert aeng.num_aborted == aborted + 1, (stream, aeng.aborts_since(aborted))
            assert aeng.stats["beam_search"]["steps"] - steps < 60
        llm.engine.runner.forward = forward
    finally:
        server.stop()
    assert_pool_empty(llm)

