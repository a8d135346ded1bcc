"""A float64 numpy sampler to test the native one (tv_sample) against: what a token's weight is,
which tokens the filters keep, and which token a uniform u draws. Plain full sorts, nothing clever."""
import numpy as np


def weights(x: np.ndarray, temperature: float) -> np.ndarray:
    """exp((x - max) / T) in float64 (-inf logits: 0)."""
    w = np.asarray(x, dtype=np.float64)
    w = w - w.max()
    w *= 1.0 / temperature
    return np.exp(w)


def filter_probs(w: np.ndarray, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> np.ndarray:
    """vLLM's order on weights w [V] (a copy comes back, dropped tokens 0): top-k (ties with the k-th
    kept), top-p on the renormalized mass (the smallest prefix of the descending order, ties by lower
    id, reaching top_p: a token stays iff the mass strictly before it is < top_p), then min-p (drops
    w < min_p * max w)."""
    w = np.array(w, dtype=np.float64)
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


def draw(w: np.ndarray, u: float) -> int:
    """The inverse-cdf draw: the first token (id order) whose cumulative weight > u * total."""
    cdf = np.cumsum(w)
    j = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    return j if j < len(cdf) else int(np.searchsorted(cdf, cdf[-1]))


def token(x: np.ndarray, u: float, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> int:
    if temperature == 0:
        return int(np.argmax(x))
    return draw(filter_probs(weights(x, temperature), top_k, top_p, min_p), u)
