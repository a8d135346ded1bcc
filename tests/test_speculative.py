"""Speculative decoding (tinyvllm/spec): configs, the n-gram proposer, exactness (greedy output equal
with and without speculation; rejection sampling keeps the target distribution, checked by a
chi-square test that a broken acceptance rule fails), rollback of rejected slots, the draft-model
path and its memory, the per-step off switch, structured outputs and the metrics."""
import json
import math

import numpy as np
import pytest

import tiny_models as tm
from tinyvllm import LLM, SamplingParams, StructuredOutputsParams
from tinyvllm.engine import LLMEngine
from tinyvllm.engine_args import EngineArgs
from tinyvllm.spec import NgramProposer, RejectionSampler, SpeculativeConfig
from tinyvllm.spec import rejection

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
CODE = '''def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal += item["price"] * item["quantity"]
    return subtotal * (1 + tax_rate)
'''
# prompts that make the model copy from its input: where n-gram lookup finds its drafts
COPY_PROMPTS = [f"<|im_start|>user\nRewrite this function, renaming subtotal to total:\n{CODE}<|im_end|>\n"
                "<|im_start|>assistant\n```python\n",
                "<|im_start|>user\nRepeat exactly: the quick brown fox jumps over the lazy dog, the quick brown fox "
                "jumps over the lazy dog<|im_end|>\n<|im_start|>assistant\n"]


# ---- configuration -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,match", [
    ("{not json", "not valid JSON"), ([1], "must be a dict"), ({"num_speculative_tokens": 2}, "method"),
    ({"method": "medusa", "num_speculative_tokens": 2}, "method"), ({"method": "ngram"}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "lookup_min"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 0}, "prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 2, "typo": 1}, "unknown key"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs 'model'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0}, "disable_by_batch_size"),
    ({"method": "ngram", "num_speculative_tokens": 2, "min_acceptance_rate": 2}, "min_acceptance_rate")])
def test_bad_configs_are_value_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        SpeculativeConfig.parse(bad)


def test_config_from_json_and_cli(reference_gguf_path):
    c = SpeculativeConfig.parse(json.dumps(NGRAM))
    assert (c.method, c.num_speculative_tokens, c.prompt_lookup_max, c.prompt_lookup_min) == ("ngram", 4, 4, 2)
    assert SpeculativeConfig.parse({"model": "x.gguf", "num_speculative_tokens": 3}).method == "draft_model"
    import argparse
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    args = EngineArgs.from_cli_args(parser.parse_args(["--speculative-config", json.dumps(NGRAM)]))
    assert SpeculativeConfig.parse(args.engine_kwargs()["speculative_config"]) == c
    with pytest.raises(ValueError, match="method"):  # refused before any model is loaded
        LLMEngine(str(reference_gguf_path), speculative_config={"method": "eagle", "num_speculative_tokens": 1})


def test_ngram_lookup():
    p = NgramProposer(prompt_lookup_min=1, prompt_lookup_max=3)
    t = np.array([5, 6, 7, 8, 9, 1, 6, 7, 8, 2, 3, 6, 7], dtype=np.int32)
    assert p.lookup(t, 2).tolist() == [8, 2]            # the latest occurrence of [6, 7]
    assert p.lookup(t, 10).tolist() == [8, 2, 3, 6, 7]  # as many as follow
    t2 = np.array([1, 2, 3, 9, 2, 3, 4, 5, 3], dtype=np.int32)
    assert p.lookup(t2, 1).tolist() == [4]              # longest suffix first: [3] alone, latest match
    assert NgramProposer(2, 3).lookup(t2, 3).tolist() == []  # no 2-token suffix recurs
    assert p.lookup(np.array([4], dtype=np.int32), 2).tolist() == []


def test_ngram_lookup_equals_brute_force():
    """The incremental lookup against every window compared, on random short token lists."""
    def brute(t, k, lo, hi):
        for n in range(min(hi, len(t) - 1), lo - 1, -1):
            hits = [i for i in range(len(t) - n) if t[i:i + n].tolist() == t[len(t) - n:].tolist()]
            if hits:
                return t[hits[-1] + n:hits[-1] + n + k].tolist()
        return []
    rng = np.random.default_rng(0)
    for _ in range(3000):
        t = rng.integers(0, rng.integers(2, 6), rng.integers(1, 30)).astype(np.int32)
        lo = int(rng.integers(1, 4))
        hi, k = int(rng.integers(lo, 6)), int(rng.integers(1, 6))
        assert NgramProposer(lo, hi).lookup(t, k).tolist() == brute(t, k, lo, hi), (t.tolist(), k, lo, hi)


# ---- exactness: greedy -------------------------------------------------------------------------------
def _generate(model, prompts, params, **engine):
    llm = LLM(model, threads=2, **engine)
    outs = llm.generate(prompts, params)
    eng = llm.engine
    bm = eng.scheduler.blocks
    bm.check()
    assert bm.num_seqs == 0 and bm.num_free_blocks == bm.num_blocks  # rolled-back blocks all came back
    return [[c.token_ids for c in o.outputs] for o in outs], eng.stats()


def test_multi_token_verification_logits_equal_single_token_decode(reference_gguf_path):
    """The forward over [last, d1..dk] gives, row for row, the very logits that k + 1 one-token decodes
    give: the kernels do not depend on how many tokens a step runs (why greedy output is unchanged)."""
    llm = LLM(str(reference_gguf_path), threads=2)
    r = llm.engine.runner
    toks = np.array(llm.tokenizer.encode(CODE), np.int32)
    n, extra, table = len(toks), np.array([42, 17, 99, 3, 5], np.int32), np.arange(8, dtype=np.int32)[None]
    r.forward(toks, np.arange(n, dtype=np.int32), np.zeros(n, np.int32), table, np.array([n - 1], np.int32))
    single = [r.forward(extra[i:i + 1], np.array([n + i], np.int32), np.zeros(1, np.int32), table,
                        np.array([0], np.int32))[0] for i in range(len(extra))]
    multi = r.forward(extra, np.arange(n, n + len(extra), dtype=np.int32), np.zeros(len(extra), np.int32), table,
                      np.arange(len(extra), dtype=np.int32))
    assert all(np.array_equal(a, b) for a, b in zip(single, multi))


@pytest.mark.parametrize("engine", [
    dict(),                                                               # plain
    dict(max_num_batched_tokens=24, enable_prefix_caching=True),         # chunked prefill, budget cuts drafts
    dict(kv_cache_bytes=9 * 16 * 23040, max_model_len=140)])              # 9 blocks: preemption
def test_greedy_output_identical_reference_model(reference_gguf_path, engine):
    # n=2 with top_k=1: sampled (forks, copy-on-write, the sampling path) yet deterministic
    params = [SamplingParams(temperature=0, max_tokens=40), SamplingParams(top_k=1, max_tokens=30, n=2, seed=3)]
    want, _ = _generate(str(reference_gguf_path), COPY_PROMPTS, params, **engine)
    got, st = _generate(str(reference_gguf_path), COPY_PROMPTS, params, speculative_config=NGRAM, **engine)
    assert got == want
    spec = st["spec_decode"]
    assert spec["num_drafts"] > 0 and spec["num_accepted_tokens"] > 0
    assert spec["num_draft_tokens"] > spec["num_accepted_tokens"]  # some were rejected and rolled back
    if "kv_cache_bytes" in engine:
        assert st["preemptions"] > 0


def test_greedy_output_identical_tiny_model(tmp_path):
    path = str(tm.make_tiny_gguf(tmp_path / "tiny.gguf", qtype="Q8_0"))
    prompts = ["the quick brown fox jumps over the lazy dog the quick brown", "Paris is the capital of France. Paris"]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    cfg = dict(NGRAM, prompt_lookup_min=1)
    want, _ = _generate(path, prompts, params)
    got, st = _generate(path, prompts, params, speculative_config=cfg)
    assert got == want and st["spec_decode"]["num_drafts"] > 0


def test_structured_outputs_check_drafts(reference_gguf_path):
    """A JSON-schema request copying a JSON document: drafts pass through the grammar's mask, output is
    the same as without speculation and valid."""
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24}, "tags": {
              "type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4}},
              "required": ["name", "tags"], "additionalProperties": False}
    doc = json.dumps({"name": "tiny engine", "tags": ["fast", "small", "exact"]})
    prompt = f"<|im_start|>user\nRepeat this JSON: {doc}<|im_end|>\n<|im_start|>assistant\n"
    sp = SamplingParams(temperature=0, max_tokens=40, structured_outputs=StructuredOutputsParams(json=schema))
    want, _ = _generate(str(reference_gguf_path), [prompt], sp)
    got, st = _generate(str(reference_gguf_path), [prompt], sp, speculative_config=dict(NGRAM, prompt_lookup_min=1))
    assert got == want and st["spec_decode"]["num_accepted_tokens"] > 0
    llm = LLM(str(reference_gguf_path), threads=2, speculative_config=dict(NGRAM, prompt_lookup_min=1))
    out = json.loads(llm.tokenizer.decode(got[0][0]))
    assert set(out) == {"name", "tags"}
    # sampled: drafts the grammar forbids have p = 0 and are always rejected; every completion is valid
    sampled = llm.generate([prompt] * 4, [SamplingParams(temperature=0.8, seed=i, max_tokens=120,
                                                         structured_outputs=sp.structured_outputs) for i in range(4)])
    for o in sampled:
        assert o.outputs[0].finish_reason == "stop" and set(json.loads(o.outputs[0].text)) == {"name", "tags"}
    assert llm.engine.stats()["spec_decode"]["num_accepted_tokens"] > 0


def test_off_switch_by_batch_size(reference_gguf_path):
    params = SamplingParams(temperature=0, max_tokens=12)
    _, st = _generate(str(reference_gguf_path), COPY_PROMPTS, params,
                      speculative_config=dict(NGRAM, disable_by_batch_size=1))
    assert st["spec_decode"]["steps_off"] > 0
    _, st1 = _generate(str(reference_gguf_path), COPY_PROMPTS[:1], params,
                       speculative_config=dict(NGRAM, disable_by_batch_size=1))
    assert st1["spec_decode"]["steps_off"] == 0 and st1["spec_decode"]["num_drafts"] > 0


# ---- exactness: sampling -----------------------------------------------------------------------------
class _Seq:
    """What the rejection sampler reads of a sequence."""
    def __init__(self, params, seed):
        self.params, self.generator, self.matcher = params, np.random.default_rng(seed), None
        self.prompt_token_ids = self.output_token_ids = np.zeros(0, np.int32)


def _chi2_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square goodness of fit (tokens with small expected counts pooled into one bin); the
    p-value from the Wilson-Hilferty normal approximation of the chi-square distribution."""
    n = counts.sum()
    big = probs * n >= 5
    obs = np.append(counts[big], counts[~big].sum()).astype(np.float64)
    exp = np.append(probs[big], probs[~big].sum()) * n
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    if obs.sum() != n:  # mass where the target has none
        return 0.0
    stat, df = float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.fixture(scope="module")
def tiny_logits(tmp_path_factory):
    """Two logits rows of a tiny model (positions after a prompt and after one more token)."""
    path = str(tm.make_tiny_gguf(tmp_path_factory.mktemp("m") / "t.gguf", qtype="Q8_0"))
    llm = LLM(path, threads=1)
    ids = llm.tokenizer.encode("the quick brown fox")
    r, n = llm.engine.runner, len(ids)
    table = np.arange(4, dtype=np.int32)[None]
    toks = np.array(ids + [int(np.argmax(r.forward(np.array(ids, np.int32), np.arange(n, dtype=np.int32),
                                                      np.zeros(n, np.int32), table, np.array([n - 1], np.int32))))],
                    np.int32)
    return r.forward(toks, np.arange(n + 1, dtype=np.int32), np.zeros(n + 1, np.int32), table,
                     np.array([n - 1, n], np.int32))


@pytest.mark.parametrize("rule,proposal", [("exact", "point"), ("exact", "draft"),
                                           ("always_accept", "point"), ("always_accept", "draft")])
def test_rejection_sampling_keeps_the_target_distribution(tiny_logits, monkeypatch, rule, proposal):
    """20,000 verifications of one draft token against two logits rows of a tiny model (temperature 1.3,
    top-k 50): the first emitted token must follow p0 and, where the draft was accepted, the bonus
    token p1 (chi-square, p > 1e-3). A broken acceptance rule (always accept) must fail the same test:
    the criterion can tell."""
    params = SamplingParams(temperature=1.3, top_k=50, max_tokens=8)
    p = [rejection.probs_of(row, params) for row in tiny_logits]
    draft = int(np.argsort(p[0])[-2])  # a draft the target takes now and then, not always
    assert 0.02 < p[0][draft] < 0.7, p[0][draft]
    q = None
    if proposal == "draft":  # a draft model's distribution: the target's, flattened and shifted
        q = np.exp(0.5 * np.log(p[0] + 1e-12))
        q /= q.sum()
        draft_rng = np.random.default_rng(7)
    if rule == "always_accept":
        monkeypatch.setattr(rejection, "accept_probability", lambda p_d, q_d: 1.0)
    sampler = RejectionSampler(np.random.default_rng(0))
    seq = _Seq(params, seed=123)
    first, second = np.zeros(len(p[0]), np.int64), np.zeros(len(p[1]), np.int64)
    for _ in range(20000):
        d = draft if q is None else int(draft_rng.choice(len(q), p=q))
        results, accepted = sampler.verify(tiny_logits, seq, np.array([d], np.int32),
                                           None if q is None else q[None], ())
        first[results[0].token_id] += 1
        if accepted:
            second[results[1].token_id] += 1
    pv = _chi2_p_value(first, p[0]), _chi2_p_value(second, p[1])
    ok = min(pv) > 1e-3
    assert ok == (rule == "exact")


def test_seeded_sampling_reproducible_with_speculation(reference_gguf_path):
    params = SamplingParams(temperature=0.5, max_tokens=32, seed=5)
    cfg = dict(NGRAM, prompt_lookup_min=1)
    a, st = _generate(str(reference_gguf_path), COPY_PROMPTS, params, speculative_config=cfg)
    b, _ = _generate(str(reference_gguf_path), COPY_PROMPTS, params, speculative_config=cfg)
    assert a == b and st["spec_decode"]["num_drafts"] > 0


# ---- draft model ------------------------------------------------------------------------------------
def test_draft_model(tmp_path, reference_gguf_path):
    """The target as its own draft accepts every greedy draft (same kernels, same logits); another
    model's drafts leave the output unchanged; the draft's KV blocks come out of the same budget."""
    target = str(tm.make_tiny_gguf(tmp_path / "t.gguf", qtype="Q8_0"))
    other = str(tm.make_tiny_gguf(tmp_path / "d.gguf", qtype="Q8_0", seed=1))
    prompts = ["the quick brown fox", "Paris is the capital of"]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    want, _ = _generate(target, prompts, params)
    same, st = _generate(target, prompts, params,
                         speculative_config={"method": "draft_model", "model": target, "num_speculative_tokens": 3})
    assert same == want and st["spec_decode"]["acceptance_rate"] == 1.0
    got, st = _generate(target, prompts, params, max_num_batched_tokens=16,
                        speculative_config={"method": "draft_model", "model": other, "num_speculative_tokens": 3})
    assert got == want and st["spec_decode"]["num_drafts"] > 0 and st["spec_decode"]["acceptance_rate"] < 1.0
    from tinyvllm.runner.kv_cache import kv_bytes_per_block
    from tinyvllm.model import load_model
    cfg = load_model(target).config
    two = 2 * kv_bytes_per_block(cfg, 16, "float16")  # a block of the target's KV and one of the draft's
    got, st = _generate(target, prompts, params, kv_cache_bytes=4 * two, max_model_len=60,
                        speculative_config={"method": "draft_model", "model": other, "num_speculative_tokens": 3})
    assert got == want and st["preemptions"] > 0 and st["blocks_total"] == 4
    budget = dict(memory_budget="64MB")
    plain = LLMEngine(target, threads=1, **budget).scheduler.blocks.num_blocks
    with_draft = LLMEngine(target, threads=1, speculative_config={"method": "draft_model", "model": target,
                                                                   "num_speculative_tokens": 3},
                           **budget).scheduler.blocks.num_blocks
    assert with_draft < plain  # the draft's KV and weights are paid from the same 64 MB
    with pytest.raises(ValueError, match="vocabulary"):
        LLMEngine(str(reference_gguf_path), speculative_config={"method": "draft_model", "model": target,
                                                                 "num_speculative_tokens": 2})


def test_draft_proposals_are_the_draft_models_own_greedy_continuation(tmp_path):
    """At every step, the drafts are exactly what the draft model alone proposes for the sequence as it
    stands: its greedy continuation computed from scratch (a fresh runner, a prefill of every token). So
    the draft's KV, caught up with what the target ran and after rolled-back and fully accepted steps, is
    never stale or behind in a way that changes a proposal (acceptance is what the draft model earns)."""
    from tinyvllm.model import load_model
    from tinyvllm.runner import NativeModelRunner
    target = str(tm.make_tiny_gguf(tmp_path / "t.gguf", qtype="Q8_0"))
    draft = str(tm.make_tiny_gguf(tmp_path / "d.gguf", qtype="Q4_0"))  # the same weights, coarser: agrees often
    llm = LLM(target, threads=1, max_num_batched_tokens=16,
              speculative_config={"method": "draft_model", "model": draft, "num_speculative_tokens": 3})
    fresh = NativeModelRunner(load_model(draft), num_blocks=64, threads=1)
    table = np.arange(64, dtype=np.int32)[None]
    proposer, checked = llm.engine.spec.proposer, []
    prepare = proposer.prepare

    def checked_prepare(batch):
        prepare(batch)
        for seq, n in zip(batch.seqs, batch.num_tokens):
            n_spec = seq.num_computed_tokens + n - len(seq)
            if n_spec > 0:
                toks = list(seq.token_ids)
                for _ in range(n_spec):
                    row = fresh.forward(toks, np.arange(len(toks)), np.zeros(len(toks)), table, [len(toks) - 1])[0]
                    toks.append(int(np.argmax(row)))
                assert list(seq.spec_token_ids[:n_spec]) == toks[len(seq):], (len(seq), n_spec)
                checked.append(n_spec)
    proposer.prepare = checked_prepare
    prompts = ["the quick brown fox jumps over", "Paris is the capital of", "one two three four"]
    got = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    want = LLM(target, threads=1).generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    st = llm.engine.stats()["spec_decode"]
    assert len(checked) == st["num_drafts"] > 10
    # both paths were taken: fully accepted steps (the draft then catches up two positions) and rejections
    assert 0 < st["num_accepted_tokens_per_pos"][-1] < st["num_drafts"], st


def test_metrics_report_acceptance(reference_gguf_path):
    """Engine stats and the server's /metrics text (vLLM's counter names) carry the acceptance counts."""
    from tinyvllm.server.api import build_app
    args = EngineArgs(model=str(reference_gguf_path), threads=2, speculative_config=json.dumps(NGRAM))
    eng = LLMEngine(args.model, **args.engine_kwargs())  # as `tinyvllm serve --speculative-config '<json>'` does
    eng.add_request("r", COPY_PROMPTS[1], SamplingParams(temperature=0, max_tokens=24))
    while eng.has_unfinished_requests():
        eng.step()
    spec = eng.stats()["spec_decode"]
    assert spec["num_draft_tokens"] >= spec["num_accepted_tokens"] > 0
    assert spec["acceptance_rate"] == spec["num_accepted_tokens"] / spec["num_draft_tokens"]
    assert sum(spec["num_accepted_tokens_per_pos"]) == spec["num_accepted_tokens"]
    assert eng.num_generated_tokens == 24 and eng.num_steps < 24  # fewer forwards than tokens
    app = build_app(eng, "smol")
    try:
        text = app.state.metrics.render().decode()
        label = '{model_name="smol"}'
        for name in ("num_draft_tokens", "num_accepted_tokens", "num_drafts"):
            line = next(x for x in text.splitlines() if x.startswith(f"vllm:spec_decode_{name}_total{label} "))
            assert float(line.split()[-1]) == spec[name]
    finally:
        app.state.async_llm.shutdown()


def test_logprobs_equal_without_speculation(reference_gguf_path):
    """Emitted tokens report the raw logprobs (and top-k) a run without speculation reports."""
    sp = SamplingParams(temperature=0, max_tokens=24, logprobs=3)
    outs = []
    for cfg in (None, NGRAM):
        llm = LLM(str(reference_gguf_path), threads=2, speculative_config=cfg)
        o = llm.generate(COPY_PROMPTS[1:], sp)[0].outputs[0]
        outs.append((o.token_ids, o.logprobs, o.cumulative_logprob))
        if cfg:
            assert llm.engine.stats()["spec_decode"]["num_accepted_tokens"] > 0
    assert outs[0] == outs[1]


@pytest.mark.parametrize("rule", ["exact", "always_accept"])
def test_engine_sampling_with_a_draft_model_keeps_the_target_distribution(tmp_path, monkeypatch, rule):
    """End to end: 1,536 completions (temperature 1) of one prompt on a tiny target with another tiny
    model drafting (so q differs from p). The first token is sampled after the prefill; the second is
    the first one speculation decides. Among completions whose first token is the most common one,
    the second must follow the target's exact distribution computed from its logits (chi-square,
    p > 1e-3); with an always-accept rule it follows the draft's and the same test fails."""
    target = str(tm.make_tiny_gguf(tmp_path / "t.gguf", qtype="Q8_0"))
    draft = str(tm.make_tiny_gguf(tmp_path / "d.gguf", qtype="Q8_0", seed=1))
    if rule == "always_accept":
        monkeypatch.setattr(rejection, "accept_probability", lambda p_d, q_d: 1.0)
    llm = LLM(target, threads=1, max_num_seqs=64,
              speculative_config={"method": "draft_model", "model": draft, "num_speculative_tokens": 2})
    prompt = llm.tokenizer.encode("the quick brown fox")
    pairs = []
    for i in range(24):
        sp = SamplingParams(temperature=1.0, max_tokens=3, n=64, seed=1000 * i, ignore_eos=True)
        pairs += [tuple(c.token_ids[:2]) for c in llm.generate({"prompt_token_ids": prompt}, sp)[0].outputs]
    assert llm.engine.stats()["spec_decode"]["num_drafts"] >= len(pairs)
    first = max(set(p[0] for p in pairs), key=[p[0] for p in pairs].count)
    second = np.bincount([p[1] for p in pairs if p[0] == first], minlength=llm.engine.config.vocab_size)
    r, n = llm.engine.runner, len(prompt) + 1
    row = r.forward(np.array(prompt + [first], np.int32), np.arange(n, dtype=np.int32), np.zeros(n, np.int32),
                    np.arange(4, dtype=np.int32)[None] + 60, np.array([n - 1], np.int32))[0]
    p1 = rejection.probs_of(row, SamplingParams(temperature=1.0))
    assert second.sum() > 300
    assert (_chi2_p_value(second, p1) > 1e-3) == (rule == "exact")


def test_min_acceptance_rate_sits_out_poor_drafters():
    """A sequence whose drafts keep being rejected stops drafting for a while, then tries again."""
    from types import SimpleNamespace

    from tinyvllm.spec import SpeculativeDecoder

    class Always:
        def propose(self, seq, k):
            return np.arange(k, dtype=np.int32)
    cfg = SpeculativeConfig.parse(dict(NGRAM, min_acceptance_rate=0.3))
    dec = SpeculativeDecoder(cfg, Always(), max_model_len=1000, rng=np.random.default_rng(0))
    class Seq(SimpleNamespace):
        def __len__(self):
            return 10
    seq = Seq(seq_id=7, num_uncomputed_tokens=1, needs_prompt_logprobs=False, num_output_tokens=1,
              params=SamplingParams(max_tokens=100), spec_token_ids=None)
    drafted = []
    for step in range(20):
        dec.plan([seq])
        drafted.append(len(seq.spec_token_ids))
        if len(seq.spec_token_ids):
            dec._count(seq, len(seq.spec_token_ids), 0)  # every draft rejected
    assert drafted[:2] == [4, 4] and 0 in drafted and drafted.count(4) < 10
    assert drafted[drafted.index(0):].count(4) >= 1  # it tries again after sitting out
