"""Verification of draft tokens by rejection sampling (Leviathan et al. 2023; Chen et al. 2023).

For each draft position, in order: the target distribution p is what the ordinary sampler would draw
from at that point (min_tokens, penalties over the tokens accepted so far, the structured-output
mask after them, temperature, top-k/top-p/min-p); draft token d, proposed with probability q(d), is
accepted with probability min(1, p(d) / q(d)); on the first rejection a token is drawn from
norm(max(0, p - q)) and the step ends; when all k are accepted a bonus token is drawn from the last
row's p. Each emitted token is then distributed exactly as p. A deterministic proposal (n-gram
lookup, a greedy draft model) is a point mass: accept with probability p(d), resample from p with d
removed. Greedy requests take the argmax of each row: a draft is accepted iff it is that argmax, so
greedy output is the same token sequence as without speculation (given equal logits)."""
from dataclasses import dataclass

import numpy as np

from ..sampler import SampleResult, apply_min_tokens, apply_penalties, apply_token_bitmask, log_sum_exp, sampling_weights


def accept_probability(p_draft: float, q_draft: float) -> float:
    """min(1, p/q): the rule that keeps the target distribution (tests swap it for broken ones)."""
    return 1.0 if p_draft >= q_draft else p_draft / q_draft


@dataclass
class _State:
    """What the sampler's penalties read: the sequence as if the tokens accepted so far were appended."""
    params: object
    prompt_token_ids: np.ndarray
    output_token_ids: np.ndarray


def target_row(logits_row: np.ndarray, seq, accepted: list[int], eos_token_ids, mask_row) -> np.ndarray:
    """The processed logits (float32 [V]) the sampler would draw this row's token from."""
    x = np.array(logits_row, dtype=np.float32)[None]
    p = seq.params
    if p.min_tokens or p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
        out = np.concatenate([seq.output_token_ids, np.asarray(accepted, dtype=np.int32)])
        state = _State(p, seq.prompt_token_ids, out)
        apply_min_tokens(x, [state], eos_token_ids)
        apply_penalties(x, [state])
    if mask_row is not None:
        apply_token_bitmask(x, [0], mask_row[None])
    return x[0]


def probs_of(x: np.ndarray, params) -> np.ndarray:
    """Sampling probabilities (float64 [V], summing to 1) of processed logits x for a random request."""
    w = sampling_weights(x, params)
    return w / w.sum()


def draw(w: np.ndarray, rng) -> int:
    """A token drawn from weights w (>= 0, not all zero)."""
    cdf = np.cumsum(w)
    j = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return j if j < len(cdf) else int(np.flatnonzero(w)[-1])


def verify_row(x: np.ndarray, params, draft: int | None, q: np.ndarray | None, rng) -> tuple[int, bool]:
    """One position: (token, accepted). draft None: the bonus position (a plain draw from p). q None:
    the draft was a point mass."""
    if params.greedy:
        best = int(np.argmax(x))
        return best, draft == best
    p = probs_of(x, params)
    if draft is None:
        return draw(p, rng), False
    q_d = 1.0 if q is None else float(q[draft])
    if q_d > 0.0 and rng.random() < accept_probability(float(p[draft]), q_d):
        return draft, True
    if q is None:
        residual = p.copy()
        residual[draft] = 0.0
    else:
        residual = np.maximum(p - q, 0.0)
    return draw(residual if residual.sum() > 0 else p, rng), False


class RejectionSampler:
    """Turns the k + 1 logits rows of a speculating sequence into the tokens it emits this step."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng  # for requests without a seed of their own (the engine sampler's)

    def verify(self, logits: np.ndarray, seq, drafts: np.ndarray, draft_probs,
               eos_token_ids) -> tuple[list[SampleResult], int]:
        """logits: [len(drafts) + 1, V] rows at the positions of the last token and each draft token;
        draft_probs: None (point-mass proposals) or [len(drafts), V]. Returns (1..k+1 results: the
        accepted drafts, then the resampled or bonus token; how many drafts were accepted). The
        sequence's matcher is left as found."""
        p = seq.params
        if p.greedy and seq.matcher is None and not (p.min_tokens or p.repetition_penalty != 1.0 or
                                                     p.frequency_penalty or p.presence_penalty):
            return self._verify_plain_greedy(logits, drafts, p.logprobs)
        rng = self.rng if seq.generator is None else seq.generator
        matcher, consumed = seq.matcher, 0
        mask = None
        if matcher is not None:
            mask = np.empty((logits.shape[1] + 31) // 32, dtype=np.int32)
        accepted: list[int] = []
        tokens: list[int] = []
        try:
            for i in range(len(drafts) + 1):
                if matcher is not None:
                    matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
                x = target_row(logits[i], seq, accepted, eos_token_ids, mask)
                draft = int(drafts[i]) if i < len(drafts) else None
                token, ok = verify_row(x, seq.params, draft, None if draft_probs is None or draft is None
                                       else draft_probs[i], rng)
                tokens.append(token)
                if not ok:
                    break
                accepted.append(token)
                if matcher is not None:  # the next row's mask follows the accepted token
                    ok = matcher.consume_token(token)
                    consumed += bool(ok)
                    if not ok or matcher.is_stopped():
                        break
        finally:
            if consumed:
                matcher.rollback(consumed)  # the scheduler consumes the emitted tokens as it appends them
        return [self._result(logits[i], t, seq.params.logprobs) for i, t in enumerate(tokens)], len(accepted)

    @staticmethod
    def _verify_plain_greedy(logits: np.ndarray, drafts: np.ndarray, k: int | None):
        """Greedy rows that nothing processes (the common case): the argmax of every row at once; the
        drafts up to the first one that differs are accepted, then that row's argmax."""
        best = np.argmax(logits, axis=1)
        miss = np.flatnonzero(best[:len(drafts)] != drafts)
        n = int(miss[0]) if len(miss) else len(drafts)
        return [RejectionSampler._result(logits[i], int(t), k) for i, t in enumerate(best[:n + 1])], n

    @staticmethod
    def _result(row: np.ndarray, token: int, k: int | None) -> SampleResult:
        """The token with its raw logprob (and the k best), computed as the Sampler computes them (float32),
        so logprobs match those of a run without speculation."""
        lse = log_sum_exp(row)[0]
        lp = float(row[token] - lse)
        top = None
        if k is not None:
            top = {token: lp}
            k = min(k, len(row))
            if k > 0:
                best = np.flatnonzero(row >= np.partition(row, -k)[-k])
                for t in best[np.argsort(-row[best], kind="stable")[:k]].tolist():
                    top.setdefault(t, float(row[t] - lse))
        return SampleResult(token, lp, top)
