
import numpy as np
import pytest

from dataclasses import dataclass, field

from sampler_oracle import filter_probs
from tinyvllm.sampler import Sampler, SampleResult, apply_min_tokens, apply_penalties, make_generator
from tinyvllm.sampling_params import SamplingParams, SamplingType


def softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


@dataclass
class State:  # what the sampler reads of a sequence (tinyvllm.sampler.SamplingState)
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    index: int = 0
    generator: object = None

    def __post_init__(self):
        self.generator = make_generator(self.params, self.index)


def st(prompt=(), out=(), **kw):
    return State(SamplingParams(**kw), list(prompt), list(out))


# ---------------------------------------------------------------- SamplingParams

@pytest.mark.parametrize("kw, match", [
    (dict(n=0), "n must be at least 1"),
    (dict(best_of=3), "best_of"),
    (dict(temperature=-0.1), "temperature must be non-negative"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(top_p=1.01), "top_p must be in"),
    (dict(top_k=-2), "top_k must be"),
    (dict(min_p=-0.1), "min_p must be in"),
    (dict(min_p=1.5), "min_p must be in"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be greater than zero"),
    (dict(presence_penalty=2.5), "presence_penalty must be in"),
    (dict(presence_penalty=-2.5), "presence_penalty must be in"),
    (dict(frequency_penalty=3.0), "frequency_penalty must be in"),
    (dict(frequency_penalty=-3.0), "frequency_penalty must be in"),
    (dict(max_tokens=0), "max_tokens must be at least 1"),
    (dict(min_tokens=-1), "min_tokens must be greater than or equal to 0"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens must be less than or equal to max_tokens"),
    (dict(logprobs=-1), "logprobs must be in"),
    (dict(logprobs=21), "logprobs must be in"),
    (dict(prompt_logprobs=21), "prompt_logprobs must be in"),
    (dict(stop=""), "stop cannot contain an empty string"),
    (dict(stop=["a", ""]), "stop cannot contain an empty string"),
    (dict(n=2, temperature=0.0), "n must be 1 when using greedy"),
])
def test_params_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_params_normalize_and_clone():
    p = SamplingParams(stop="###", stop_token_ids=None, top_k=-1, max_tokens=None, min_tokens=100, seed=3)
    assert p.stop == ["###"] and p.stop_token_ids == []
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert p.sampling_type == SamplingType.RANDOM_SEED and not p.greedy
    assert SamplingParams().sampling_type == SamplingType.RANDOM
    g = SamplingParams(temperature=1e-7, top_k=5, top_p=0.5, min_p=0.2)
    assert g.greedy and g.sampling_type == SamplingType.GREEDY and (g.top_k, g.top_p, g.min_p) == (0, 1.0, 0.0)
    q = p.clone()
    assert q == p and q is not p and q.stop is not p.stop
    q.stop.append("x")
    assert p.stop == ["###"]


# ---------------------------------------------------------------- greedy / distribution

def test_greedy_is_argmax_with_lowest_id_on_ties():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 100)).astype(np.float32)
    logits[4, [7, 42]] = 50.0  # tie: lowest id wins
    before = logits.copy()
    res = Sampler(0).sample(logits, [st(temperature=0.0, repetition_penalty=1.5, out=[3]) for _ in range(5)], eos_token_ids={1})
    np.testing.assert_array_equal(logits, before)  # the caller's logits are not touched
    assert [r.token_id for r in res] == [*np.argmax(logits[:4], axis=1).tolist(), 7]
    assert all(isinstance(r, SampleResult) and r.top_logprobs is None for r in res)


def freq_check(tokens, probs, V):
    """Empirical frequencies vs exact probabilities, each within 5 binomial std (+ a chi-square)."""
    N = len(tokens)
    counts = np.bincount(tokens, minlength=V)
    std = np.sqrt(N * probs * (1 - probs))
    assert np.all(np.abs(counts - N * probs) <= 5 * std + 1e-9), (counts, N * probs)
    nz = probs > 0
    chi2 = (((counts[nz] - N * probs[nz]) ** 2) / (N * probs[nz])).sum()
    assert chi2 < 3 * nz.sum() + 30, chi2  # ~ df on average; a broken sampler is far beyond
    return counts


def draw(logits, n, **kw):
    s = st(seed=1234, **kw)
    smp = Sampler()
    row = np.asarray(logits, dtype=np.float32)[None]
    return np.array([smp.sample(row, [s])[0].token_id for _ in range(n)])


def test_temperature_sampling_matches_softmax():
    logits = np.array([1.0, 2.0, 0.5, -1.0, 3.0, 0.0, 2.5, -2.0], dtype=np.float32)
    for T in (1.0, 0.7):
        toks = draw(logits, 20000, temperature=T)
        freq_check(toks, softmax(logits / T), 8)
    # and the test can fail: the wrong temperature is rejected
    toks = draw(logits, 20000, temperature=0.7)
    with pytest.raises(AssertionError):
        freq_check(toks, softmax(logits), 8)


def test_top_k_support_and_relative_probs():
    logits = np.array([1.0, 2.0, 0.5, -1.0, 3.0, 0.0, 2.5, -2.0], dtype=np.float32)
    toks = draw(logits, 20000, top_k=3)
    assert set(toks.tolist()) <= {4, 6, 1}
    p = np.zeros(8)
    p[[1, 4, 6]] = softmax(logits[[1, 4, 6]])
    freq_check(toks, p, 8)
    probs = softmax(logits)
    w = filter_probs(probs.copy(), top_k=3)
    ids = np.flatnonzero(w)
    assert ids.tolist() == [1, 4, 6]
    np.testing.assert_array_equal(w[ids], probs[ids])  # kept weights untouched: relative probs preserved


def kept(p, **kw):
    return np.flatnonzero(filter_probs(np.array(p, dtype=np.float64), **kw)).tolist()


def nucleus_naive(p, top_p):
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))
    keep, acc = [], 0.0
    for i in order:
        keep.append(i)
        acc += p[i]
        if acc >= top_p:
            break
    return sorted(keep)


def test_top_p_nucleus_exact():
    p = np.array([0.125, 0.5, 0.0625, 0.25, 0.0625])  # dyadic: cumsums are exact
    assert kept(p, top_p=0.75) == [1, 3]  # cumsum hits 0.75 exactly
    assert kept(p, top_p=0.7500001) == [0, 1, 3]
    assert kept(p, top_p=0.5) == [1]
    assert kept(p, top_p=0.01) == [1]  # always at least one
    assert kept(p, top_p=1.0) == [0, 1, 2, 3, 4]
    assert kept(p, top_p=0.9) == [0, 1, 2, 3]  # edge inside a tie (ids 2, 4): lower id first
    assert kept([0.25] * 4, top_p=0.5) == [0, 1]
    assert kept([0.3, 0.2, 0.2, 0.3], top_k=3) == [0, 1, 2, 3]  # ties with the k-th are kept (vLLM)
    rng = np.random.default_rng(5)
    for V in (10, 3000):
        for _ in range(20):
            q = softmax(rng.normal(size=V) * rng.choice([0.3, 3.0]))  # flat: head too small, full sort
            tp = float(rng.uniform(0.05, 0.99))
            assert kept(q, top_p=tp) == nucleus_naive(q, tp)
    # top-p runs on the renormalized top-k mass: [.5,.25,.125] -> [4/7,2/7,1/7] (cumsum .57, .86)
    assert kept(p, top_p=0.8) == [0, 1, 3]  # full mass: .5, .75, .875
    assert kept(p, top_k=3, top_p=0.8) == [1, 3]
    assert kept(p, top_k=3, top_p=0.87) == [0, 1, 3]
    assert kept(p, top_k=2, top_p=0.6) == [1]  # 2/3 >= 0.6
    assert kept(p, top_k=2, top_p=0.7) == [1, 3]


def test_top_p_end_to_end_frequencies():
    logits = np.log(np.array([0.3, 0.05, 0.4, 0.1, 0.15]))
    toks = draw(logits, 20000, top_p=0.8)  # nucleus {2, 0, 4} (0.85)
    q = np.array([0.3, 0, 0.4, 0, 0.15]) / 0.85
    freq_check(toks, q, 5)


def test_min_p():
    p = np.array([0.4, 0.05, 0.2, 0.1, 0.25])
    assert kept(p, min_p=0.5) == [0, 2, 4]  # threshold 0.2, inclusive
    assert kept(p, min_p=0.6) == [0, 4]
    assert kept(p, min_p=1.0) == [0]
    toks = draw(np.log(p), 20000, min_p=0.45)  # off the float32 boundary of the exact 0.5 case
    freq_check(toks, np.array([0.4, 0, 0.2, 0, 0.25]) / 0.85, 5)


# ---------------------------------------------------------------- penalties / min_tokens

def test_penalties_match_naive_loop():
    rng = np.random.default_rng(1)
    V = 50
    states = [
        st(prompt=[1, 2, 3, 3], out=[3, 4, 4, 4, 9], repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.7),
        st(prompt=[10, 11], out=[], repetition_penalty=0.8, frequency_penalty=1.0, presence_penalty=-0.5),
        st(prompt=[5], out=[5, 6, 6], presence_penalty=1.5),
        st(prompt=[0], out=[0, 0, 49]),  # no penalties: untouched
    ]
    logits = rng.normal(size=(4, V)).astype(np.float32) * 3
    got = apply_penalties(logits.copy(), states)
    want = logits.astype(np.float64)
    for i, s in enumerate(states):
        p = s.params
        for t in range(V):
            if t in s.prompt_token_ids or t in s.output_token_ids:
                want[i, t] = want[i, t] / p.repetition_penalty if want[i, t] > 0 else want[i, t] * p.repetition_penalty
            c = s.output_token_ids.count(t)
            want[i, t] -= p.frequency_penalty * c + p.presence_penalty * (c > 0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(got[:3], logits[:3])
    np.testing.assert_array_equal(got[3], logits[3])


def test_penalty_changes_greedy_choice():
    logits = np.array([[0.0, 2.0, 1.9, 0.5]], dtype=np.float32)
    assert Sampler().sample(logits, [st(out=[1], temperature=0)])[0].token_id == 1
    assert Sampler().sample(logits, [st(out=[1], temperature=0, repetition_penalty=1.2)])[0].token_id == 2
    assert Sampler().sample(logits, [st(prompt=[1], temperature=0, frequency_penalty=0.2)])[0].token_id == 1


def test_min_tokens_masks_eos_and_stop_ids():
    logits = np.zeros((1, 6), dtype=np.float32)
    logits[0, 2] = 10.0  # eos is the best token
    logits[0, 4] = 9.0  # then a stop token id
    for ignore_eos in (False, True):  # ignore_eos does not lift the mask (vLLM)
        s = st(out=[0, 0], temperature=0, min_tokens=3, stop_token_ids=[4], ignore_eos=ignore_eos)
        r = Sampler().sample(logits, [s], eos_token_ids={2})[0]
        assert r.token_id == 0  # best unmasked token (lowest id among the zeros)
        assert r.logprob == pytest.approx(float(logits[0, r.token_id] - np.log(np.exp(logits[0].astype(np.float64)).sum())), abs=1e-5)
        s.output_token_ids.append(r.token_id)  # 3 tokens out: eos allowed again
        assert Sampler().sample(logits, [s], eos_token_ids={2})[0].token_id == 2
    masked = apply_min_tokens(np.zeros((2, 6), np.float32), [st(min_tokens=1, stop_token_ids=[3]), st(min_tokens=0)], [2])
    assert np.isneginf(masked[0, [2, 3]]).all() and np.isfinite(masked[0, [0, 1, 4, 5]]).all() and np.isfinite(masked[1]).all()
    # sampled (non-greedy) rows never pick a masked token either
    toks = {Sampler(i).sample(logits, [st(min_tokens=5, stop_token_ids=[4])], eos_token_ids={2})[0].token_id for i in range(300)}
    assert not toks & {2, 4}


# ---------------------------------------------------------------- seeds / batching

def test_same_seed_same_tokens_whatever_the_batch():
    rng = np.random.default_rng(2)
    V, steps = 64, 30
    logit_seq = rng.normal(size=(steps, V)).astype(np.float32) * 2

    def run(batch_specs, target):
        states = [st(**kw) for kw in batch_specs]
        smp = Sampler(seed=int(rng.integers(1 << 30)))  # shared rng differs every run
        out = []
        for t in range(steps):
            noise = rng.normal(size=(len(states), V)).astype(np.float32)
            noise[target] = logit_seq[t]
            res = smp.sample(noise, states)
            for s, r in zip(states, res):
                s.output_token_ids.append(r.token_id)
            out.append(res[target].token_id)
        return out

    me = dict(seed=42, temperature=0.9, top_p=0.95, top_k=40, repetition_penalty=1.1)
    alone = run([me], 0)
    assert run([dict(temperature=1.0), me, dict(seed=7)], 1) == alone
    assert run([dict(seed=7, temperature=0.5), dict(temperature=0), me], 2) == alone
    assert run([{**me, "seed": 43}], 0) != alone  # different seed, different tokens
    # n>1: completion i uses seed + i, so siblings differ but each is reproducible
    p = SamplingParams(seed=42, temperature=1.0, n=2)
    a = [make_generator(p, i).random() for i in range(2)]
    b = [make_generator(p, i).random() for i in range(2)]
    assert a == b and a[0] != a[1]
    assert make_generator(SamplingParams()) is None
    # unseeded requests share the sampler's rng: reproducible per Sampler(seed)
    lg = rng.normal(size=(4, V)).astype(np.float32)
    def unseeded_run():
        smp, states = Sampler(9), [st() for _ in range(4)]
        return [r.token_id for _ in range(10) for r in smp.sample(lg, states)]
    runs = [unseeded_run(), unseeded_run()]
    assert runs[0] == runs[1] and len(set(runs[0])) > 3


# ---------------------------------------------------------------- logprobs

def test_logprobs_are_raw_log_softmax_and_include_chosen():
    rng = np.random.default_rng(3)
    V = 100
    logits = rng.normal(size=(4, V)).astype(np.float32) * 3
    logits[3, 5] = 20.0
    lsm = [np.log(softmax(row)) for row in logits]
    states = [
        st(temperature=0, logprobs=5, out=[int(np.argmax(logits[0]))], repetition_penalty=2.0),
        st(seed=0, temperature=1.5, logprobs=3, top_k=50, frequency_penalty=1.0, out=[1, 2]),
        st(seed=1, logprobs=0),
        st(temperature=0, logprobs=1, out=[5], presence_penalty=2.0, repetition_penalty=1.5),  # chosen yet penalized
    ]
    res = Sampler().sample(logits, states)
    for i, r in enumerate(res):
        assert r.logprob == pytest.approx(lsm[i][r.token_id], abs=1e-4)  # raw, not penalized/tempered
        k = states[i].params.logprobs
        top = np.argsort(-lsm[i], kind="stable")[:k].tolist()
        assert set(r.top_logprobs) == set(top) | {r.token_id}
        assert list(r.top_logprobs)[0] == r.token_id  # chosen first, like vLLM
        for t, v in r.top_logprobs.items():
            assert v == pytest.approx(lsm[i][t], abs=1e-4)
    # the repetition penalty moved greedy off the raw argmax, yet logprobs stay raw
    assert res[0].token_id != int(np.argmax(logits[0]))
    assert res[3].token_id == 5 and res[3].logprob == pytest.approx(lsm[3][5], abs=1e-5)
    assert res[2].top_logprobs == {res[2].token_id: pytest.approx(lsm[2][res[2].token_id], abs=1e-4)}
