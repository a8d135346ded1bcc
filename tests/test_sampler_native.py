"""The native sampler (tv_sample) against the float64 numpy oracle (tests/sampler_oracle.py).

The native weights are float32 exps (sums in double): a token can differ from the oracle's only where
u * total lands within float error of a cdf step, or a top-p prefix sum within float error of its
target. Such cases are counted and each is checked to be one (the oracle draws the native token for
a u, or a top_p, moved by 1e-5 relative). Greedy is exact."""
import numpy as np
import pytest

import sampler_oracle as oracle
from tinyvllm._native import NativeError, check, ffi, lib
from tinyvllm.sampler import Sampler, log_sum_exp, make_generator, native_sample, sampling_weights
from tinyvllm.sampling_params import SamplingParams

PARAMS = [dict(), dict(top_p=0.95), dict(top_p=0.9, top_k=40), dict(top_k=5), dict(top_k=1), dict(top_p=0.5),
          dict(top_p=0.999), dict(min_p=0.05), dict(top_p=0.8, min_p=0.1), dict(top_k=3000, top_p=0.7),
          dict(top_k=50, top_p=0.95, min_p=0.02), dict(top_k=10**9), dict(top_k=10**9, top_p=1.0, min_p=0.0),
          dict(min_p=0.9)]
TEMPERATURES = (0.02, 0.3, 0.8, 1.0, 1.7)


def logits_rows(rng, n: int, V: int) -> np.ndarray:
    """Rows from flat to peaked, some with a heavy head, some quantized (ties at every edge), some
    with masked (-inf) tokens."""
    rows = []
    for i in range(n):
        x = rng.standard_normal(V) * rng.choice([0.5, 1.5, 3.0, 6.0])
        if i % 3 == 0:
            x[rng.integers(0, V, 20)] += rng.uniform(5, 15)
        if i % 4 == 1:
            x = np.round(x * 2) / 2
        if i % 5 == 2:
            x[rng.random(V) < 0.5] = -np.inf
        rows.append(x)
    return np.asarray(rows, dtype=np.float32)


@pytest.fixture(params=["best", "avx2", "scalar"])
def kernel_path(request):
    """Each kernel path this CPU runs: on AVX-512 ones tv_sample's own AVX-512 loops, elsewhere its
    generic vector loops (cloned per ISA)."""
    restore = ffi.string(lib.tv_kernel_path()).decode()
    if request.param != "best" and lib.tv_select_kernel_path(request.param.encode()) != 0:
        pytest.skip(f"{request.param} does not run here")
    yield request.param
    check(lib.tv_select_kernel_path(restore.encode()))


def call(x, temperature, u, top_k=0, top_p=1.0, min_p=0.0, weights=None):
    B = len(x)
    return native_sample(np.ascontiguousarray(x, dtype=np.float32), None, np.full(B, float(temperature)),
                         np.full(B, min(top_k, 2**31 - 1), dtype=np.int32), np.full(B, top_p), np.full(B, min_p),
                         np.asarray(u, dtype=np.float64), weights)


def edge_within_float_error(x, T, kw, kept: np.ndarray) -> bool:
    """The native survivors `kept` differ from the oracle's only by tokens at the top-p edge: the
    oracle's mass strictly before each of them is within 1e-6 (relative) of the target."""
    w = oracle.weights(x, T)
    want = oracle.filter_probs(w, **kw) > 0
    diff = np.flatnonzero(want != kept)
    if len(diff) == 0:
        return True
    if kw.get("top_p", 1.0) >= 1.0:
        return False
    k = oracle.filter_probs(w, kw.get("top_k", 0)) > 0  # what top-p runs on
    order = np.lexsort((np.arange(len(w)), -w))
    order = order[k[order]]
    before = np.concatenate(([0.0], np.cumsum(w[order])[:-1])) / w[order].sum()
    pos = np.empty(len(w), dtype=np.int64)
    pos[order] = np.arange(len(order))
    return bool(np.all(k[diff]) and np.all(np.abs(before[pos[diff]] - kw["top_p"]) <= 1e-6))


def boundary_case(x, u, T, tok, kw) -> bool:
    """The native token is a float boundary case: its survivors differ from the oracle's at most at
    the top-p edge within float error, and the oracle's draw over them, for a u moved by 1e-6, is it."""
    kept = sampling_weights(x, SamplingParams(temperature=T, **kw)) > 0
    if not edge_within_float_error(x, T, kw, kept):
        return False
    w = np.where(kept, oracle.weights(x, T), 0.0)
    return tok in [oracle.draw(w, min(max(u + s * 1e-6, 0.0), 1 - 1e-12)) for s in (-1, 0, 1)]


@pytest.mark.parametrize("V", [1000, 49152])
def test_native_draws_the_oracle_token_for_the_same_u(V, kernel_path):
    rng = np.random.default_rng(V)
    rows = logits_rows(rng, 20 if V > 1000 else 60, V)
    draws = boundary = 0
    for kw in PARAMS:
        for T in TEMPERATURES:
            u = rng.random(len(rows))
            got, _ = call(rows, T, u, **kw)
            for x, ui, tok in zip(rows, u, got.tolist()):
                want = oracle.token(x, ui, T, **kw)
                draws += 1
                if tok != want:
                    assert boundary_case(x, ui, T, tok, kw), (kw, T, tok, want)
                    boundary += 1
    assert boundary <= draws // 1000, (boundary, draws)  # float boundaries are rare


@pytest.mark.parametrize("V", [7, 1000, 49152])
def test_native_keeps_what_the_oracle_keeps(V, kernel_path):
    """Survivor sets (weights out) equal the oracle's on rows whose top-p edge is clear of float error."""
    rng = np.random.default_rng(V + 1)
    rows = logits_rows(rng, 12, V)
    checked = 0
    for kw in PARAMS:
        p = SamplingParams(temperature=0.8, **kw)
        for x in rows:
            want = oracle.filter_probs(oracle.weights(x, 0.8), p.top_k, p.top_p, p.min_p)
            got = sampling_weights(x, p)
            if not np.array_equal(got > 0, want > 0):  # only at a top-p edge within float error
                assert edge_within_float_error(x, 0.8, kw, got > 0), kw
                continue
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)  # float32 (x - max) / T: ~|arg| ulps
            checked += 1
    assert checked >= 0.99 * len(PARAMS) * len(rows)


def test_ties_and_edges(kernel_path):
    keep = lambda x, **kw: np.flatnonzero(sampling_weights(np.array(x, np.float32), SamplingParams(**kw))).tolist()
    assert keep([0, 0, 0, 0], top_p=0.5) == [0, 1]  # ties at the top-p edge: lower ids first
    assert keep([0, 0, 0, 0], top_p=0.51) == [0, 1, 2]
    assert keep([1, 0, 2, 0, 2], top_k=2) == [2, 4]
    assert keep([1, 3, 2, 2, 0], top_k=2) == [1, 2, 3]  # ties with the k-th kept (vLLM)
    assert keep([2, 1, 2, -np.inf], top_k=5, top_p=1.0) == [0, 1, 2]  # top_k >= V: off; -inf: weight 0
    assert keep([0, -1, -30, -np.inf], temperature=1.0, min_p=np.exp(-1.5)) == [0, 1]
    assert keep([0, -1, -30], temperature=0.01) == [0, 1, 2][:1]  # underflowed: zero weight
    # greedy: the lowest id of the maxima, bit-exact; -inf elsewhere is fine
    x = np.array([[1, 5, 5, -np.inf, 5], [-np.inf, -np.inf, 0, -np.inf, 0]], np.float32)
    assert call(x, 0.0, [0.5, 0.5])[0].tolist() == [1, 2]
    # u just below 1 (u * total may round up to the total): the last token that has a weight, never a
    # masked one after it
    x = np.zeros((2, 1000), np.float32)
    x[:, 600:] = -np.inf
    x[1, 599] = -200.0  # underflows at T = 1: weight 0
    for kw in PARAMS:
        got = call(x, 1.0, [np.nextafter(1.0, 0.0)] * 2, **kw)[0].tolist()
        assert got[0] < 600 and got[1] < 599, (kw, got)
        assert kw or got == [599, 598], got
    # one token left: every u draws it, every filter keeps it
    row = np.full((1, 1000), -np.inf, np.float32)
    row[0, 777] = 3.0
    for kw in PARAMS:
        assert call(np.repeat(row, 3, 0), 1.3, [0.0, 0.5, 0.999999], **kw)[0].tolist() == [777] * 3


def test_very_low_temperature_underflow():
    """At T = 1e-3 every token more than ~0.09 below the best underflows: the best (lowest id among
    exact ties) is drawn, whatever the filter."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((50, 49152)) * 3).astype(np.float32)
    x[7, [11, 40000]] = x[7].max() + 1  # a tie at the top: both drawn, nothing else
    for kw in PARAMS:
        tok, _ = call(x, 1e-3, rng.random(50), **kw)
        best = x.argmax(1)
        assert (tok[np.arange(50) != 7] == best[np.arange(50) != 7]).all(), kw
        assert tok[7] in (11, 40000)


def test_chi_square_distribution(kernel_path):
    """20,000 draws of one row (a batch of 20,000 rows, each its own u) follow the oracle's exact
    probabilities; the wrong temperature fails the same check."""
    rng = np.random.default_rng(11)
    V, N = 40, 20000
    x = (rng.standard_normal(V) * 1.5).astype(np.float32)
    rows = np.repeat(x[None], N, 0)
    for T, kw in [(1.0, {}), (0.7, dict(top_p=0.9)), (1.3, dict(top_k=12, min_p=0.05))]:
        probs = oracle.filter_probs(oracle.weights(x, T), **kw)
        probs /= probs.sum()
        tok, _ = call(rows, T, rng.random(N), **kw)
        counts = np.bincount(tok, minlength=V)
        assert counts[probs == 0].sum() == 0
        nz = probs > 0
        chi2 = (((counts[nz] - N * probs[nz]) ** 2) / (N * probs[nz])).sum()
        assert chi2 < 3 * nz.sum() + 30, (T, kw, chi2)  # df on average; a broken sampler is far beyond
        if T == 1.0:
            wrong = oracle.weights(x, 0.7)
            wrong /= wrong.sum()
            assert (((counts - N * wrong) ** 2) / (N * wrong)).sum() > 3 * V + 30


def test_log_sum_exp_and_logprobs(kernel_path):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((6, 49152)) * 4).astype(np.float32)
    x[2, ::2] = -np.inf
    x64 = x.astype(np.float64)
    m = x64.max(1)
    want = m + np.log(np.exp(x64 - m[:, None]).sum(1))
    np.testing.assert_allclose(log_sum_exp(x), want, rtol=2e-7, atol=2e-6)
    res = Sampler(0).sample(x, [type("S", (), dict(params=SamplingParams(temperature=0.8, logprobs=2), generator=None,
                                                   prompt_token_ids=[], output_token_ids=[]))() for _ in range(6)])
    for i, r in enumerate(res):
        assert abs(r.logprob - (x64[i, r.token_id] - want[i])) < 1e-5
        assert list(r.top_logprobs)[0] == r.token_id and len(r.top_logprobs) >= 2


class State:  # what the sampler reads of a sequence
    def __init__(self, params: SamplingParams, index: int = 0):
        self.params, self.prompt_token_ids, self.output_token_ids = params, [], []
        self.generator = make_generator(params, index)


def test_batch_independence():
    """A seeded request draws the same tokens alone and inside batches of other rows (other
    params, unseeded, greedy), in any position."""
    rng, V = np.random.default_rng(8), 49152
    steps = [logits_rows(rng, 16, V) for _ in range(4)]
    me = SamplingParams(temperature=0.8, top_p=0.95, seed=42)
    alone = Sampler(0)
    s = State(me)
    solo = [alone.sample(x[3:4], [s])[0].token_id for x in steps]
    for pos, seed in [(3, 1), (0, 2), (15, 3)]:
        others = [SamplingParams(temperature=t, **PARAMS[i % len(PARAMS)]) for i, t in
                  enumerate(np.tile([0.0, 0.5, 1.2, 0.9], 4)[:15])]
        sampler, mine = Sampler(seed), State(me)
        states = [State(p) for p in others]
        states.insert(pos, mine)
        got = []
        for x in steps:
            rows = np.delete(x, 3, 0)
            rows = np.insert(rows, pos, x[3], 0)
            got.append(sampler.sample(rows, states)[pos].token_id)
        assert got == solo, (pos, got, solo)


def test_sampler_matches_the_oracle_with_processing():
    """Sampler.sample (penalties and a bitmask applied in numpy, drawn natively) vs the oracle on the
    same processed row, per-request generators mirrored."""
    from tinyvllm.sampler import apply_penalties, apply_token_bitmask
    rng, V = np.random.default_rng(9), 3000
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=5, repetition_penalty=1.3),
              SamplingParams(temperature=1.1, top_k=20, seed=6), SamplingParams(temperature=0.0)]
    states = [State(p) for p in params]
    for s in states:
        s.output_token_ids = rng.integers(0, V, 30).tolist()
    mirror = [make_generator(p) for p in params]
    mask = np.full((1, (V + 31) // 32), -1, np.int32)
    mask[0, :40] = 0  # row 1 may not draw ids < 1280
    sampler = Sampler(0)
    for _ in range(5):
        x = logits_rows(rng, 3, V)
        got = [r.token_id for r in sampler.sample(x, states, token_bitmask=([1], mask))]
        px = x.copy()
        apply_penalties(px, states)
        apply_token_bitmask(px, [1], mask)
        for i, p in enumerate(params):
            u = 0.0 if p.greedy else mirror[i].random()
            kw = dict(top_k=p.top_k, top_p=p.top_p, min_p=p.min_p)
            want = oracle.token(px[i], u, p.temperature, **kw)
            assert got[i] == want or (not p.greedy and boundary_case(px[i], u, p.temperature, got[i], kw)), (i, got, want)
        assert got[1] >= 1280


def test_bad_rows_are_errors_not_crashes():
    x = np.zeros((2, 100), np.float32)
    x[1, 5] = np.nan
    with pytest.raises(NativeError, match="NaN"):
        call(x, 1.0, [0.1, 0.2])
    with pytest.raises(NativeError, match="NaN or no finite"):
        call(np.full((1, 10), -np.inf, np.float32), 1.0, [0.1])
    with pytest.raises(NativeError, match="out of range"):
        call(np.zeros((1, 10), np.float32), 1.0, [1.0])
    with pytest.raises(NativeError, match="out of range"):
        call(np.zeros((1, 10), np.float32), 1.0, [0.5], top_p=0.0)


def test_a_fully_forbidden_row_does_not_fail_its_batch():
    """A grammar that allows only EOS while min_tokens forbids it leaves no token: the grammar wins
    for that row (it draws EOS), and the other rows of the batch sample as they would alone."""
    from types import SimpleNamespace
    rng = np.random.default_rng(5)
    V, eos = 300, 7
    logits = rng.standard_normal((3, V)).astype(np.float32)

    def state(**kw):
        return SimpleNamespace(params=SamplingParams(**kw), generator=None, prompt_token_ids=[1], output_token_ids=[])
    states = [state(temperature=0.0), state(temperature=0.0, min_tokens=4), state(temperature=0.0)]
    bitmask = np.zeros((1, (V + 31) // 32), dtype=np.int32)
    bitmask[0, eos // 32] = 1 << (eos % 32)  # only EOS allowed in row 1
    out = Sampler().sample(logits, states, eos_token_ids=[eos], token_bitmask=([1], bitmask))
    assert out[1].token_id == eos
    assert [out[0].token_id, out[2].token_id] == np.argmax(logits[[0, 2]], axis=1).tolist()
    # nothing allowed at all (an empty mask): the row draws from its raw logits instead of failing
    out = Sampler().sample(logits, states, eos_token_ids=[eos], token_bitmask=([1], np.zeros_like(bitmask)))
    assert out[1].token_id == int(np.argmax(logits[1]))


def test_nan_and_infinite_logits_still_sample():
    """A model that emits NaN / inf logits (random or damaged weights) gets a token per row, not a
    failed batch: NaN counts as -inf, +inf as the largest logit, a row with nothing finite is uniform."""
    from types import SimpleNamespace
    x = np.zeros((3, 50), np.float32)
    x[0, 5], x[0, 9] = np.nan, 3.0
    x[1, 7] = np.inf
    x[2] = np.nan
    states = [SimpleNamespace(params=SamplingParams(temperature=0.0), generator=None, prompt_token_ids=[1],
                              output_token_ids=[]) for _ in range(3)]
    out = Sampler().sample(x, states)
    assert [o.token_id for o in out] == [9, 7, 0]
