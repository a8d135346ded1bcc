"""The sampler's candidate-set fast path keeps exactly the tokens a full sort of the vocabulary keeps
and draws exactly the same token for the same generator: checked against a plain full-sort
reference written here (and against filter_probs, the full-vocabulary path)."""
import numpy as np
import pytest

from tinyvllm.sampler import Sampler, filter_probs, filtered_candidates, make_generator
from tinyvllm.sampling_params import SamplingParams


class State:  # what the sampler reads of a sequence
    def __init__(self, params: SamplingParams, index: int = 0):
        self.params, self.prompt_token_ids, self.output_token_ids = params, [], []
        self.generator = make_generator(params, index)


def weights(x: np.ndarray, temperature: float) -> np.ndarray:
    w = x.astype(np.float64)
    w -= w.max()
    w *= 1.0 / temperature
    return np.exp(w)


def full_sort_survivors(w: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """vLLM's order: top-k (ties with the k-th kept), top-p on the renormalized mass (the smallest
    prefix of the descending order, ties by lower id, reaching top_p: a token stays iff the mass
    strictly before it is < top_p), then min-p. Sorts the whole vocabulary, nothing clever."""
    w = w.copy()
    order = np.lexsort((np.arange(len(w)), -w))  # descending weight, then ascending id
    nz = np.count_nonzero(w)
    if 0 < top_k < nz:
        w[w < w[order[top_k - 1]]] = 0.0
    if top_p < 1.0:
        target = top_p * w[w > 0].sum()
        order = order[w[order] > 0]
        before = np.concatenate(([0.0], np.cumsum(w[order])[:-1]))
        k = max(1, int(np.count_nonzero(before < target)))
        w[order[k:]] = 0.0
    if min_p > 0.0:
        w[w < min_p * w.max()] = 0.0
    return w


def reference_token(x: np.ndarray, p: SamplingParams, u: float) -> int:
    cdf = np.cumsum(full_sort_survivors(weights(x, p.temperature), p.top_k, p.top_p, p.min_p))
    j = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    return j if j < len(cdf) else int(np.searchsorted(cdf, cdf[-1]))


def logits_rows(rng, n: int, V: int) -> np.ndarray:
    """Rows from flat to peaked, some with a heavy head, some quantized (ties at every edge)."""
    rows = []
    for i in range(n):
        x = rng.standard_normal(V) * rng.choice([0.5, 1.5, 3.0, 6.0])
        if i % 3 == 0:
            x[rng.integers(0, V, 20)] += rng.uniform(5, 15)
        if i % 4 == 1:
            x = np.round(x * 2) / 2
        rows.append(x)
    return np.asarray(rows, dtype=np.float32)


PARAMS = [dict(top_p=0.95), dict(top_p=0.9, top_k=40), dict(top_k=5), dict(top_k=1), dict(top_p=0.5),
          dict(top_p=0.999), dict(min_p=0.05), dict(top_p=0.8, min_p=0.1), dict(top_k=3000, top_p=0.7),
          dict(top_k=50, top_p=0.95, min_p=0.02)]


@pytest.mark.parametrize("V", [1000, 49152])
def test_candidates_keep_what_a_full_sort_keeps(V):
    rng = np.random.default_rng(V)
    decided = 0
    for x in logits_rows(rng, 24, V):
        for kw in PARAMS:
            for t in (0.3, 1.0, 1.7):
                w = weights(x, t)
                want = np.flatnonzero(full_sort_survivors(w, kw.get("top_k", 0), kw.get("top_p", 1.0),
                                                          kw.get("min_p", 0.0)))
                assert np.array_equal(np.flatnonzero(filter_probs(w.copy(), **kw)), want)
                found = filtered_candidates(w, **kw)
                if found is not None:
                    decided += 1
                    assert np.array_equal(found[0], want), (kw, t)
                    assert np.array_equal(found[1], w[want])
    assert decided > 0.9 * 24 * len(PARAMS) * 3  # the fast path decides nearly every row


def test_sampler_draws_the_full_sort_token_for_the_same_generator():
    """A batch of 64 seeded rows (mixed filters, a greedy row, a row with -inf logits that takes the
    full-vocabulary path) drawn for 5 steps: every token equals the full-sort reference's."""
    rng, V = np.random.default_rng(7), 49152
    params = [SamplingParams(temperature=t, seed=100 + i, **PARAMS[i % len(PARAMS)])
              for i, t in enumerate(np.tile([0.7, 1.0, 1.3, 0.4], 16))]
    params[5] = SamplingParams(temperature=0)
    params[6] = SamplingParams(temperature=1.0, seed=3)  # no filter: the whole vocabulary
    states = [State(p) for p in params]
    mirror = [make_generator(p) for p in params]  # the reference's own generators, same seeds
    sampler = Sampler(0)
    for _ in range(5):
        x = logits_rows(rng, len(params), V)
        x[9, ::3] = -np.inf  # a masked row (min_tokens, structured outputs)
        got = [r.token_id for r in sampler.sample(x, states)]
        for i, p in enumerate(params):
            want = int(np.argmax(x[i])) if p.greedy else reference_token(x[i], p, mirror[i].random())
            assert got[i] == want, (i, p)
