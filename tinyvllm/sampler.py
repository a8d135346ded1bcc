"""Sampler: batched float32 logits [B, V] -> one token (+ logprobs) per sequence.

Order follows vLLM: reported logprobs come from the raw model logits; then min_tokens masking,
repetition/frequency/presence penalties, the structured-output bitmask (constrained rows only), and
greedy argmax or temperature -> top-k -> top-p -> min-p -> a draw from the sequence's own generator.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from tinyvllm.sampling_params import SamplingParams

_TOP_P_HEADS = (8192, 1024)  # top-p sorts only this many best tokens when they already hold top_p of the mass
# Candidate sets of the fast path: the tokens whose weight is at least e^-c of the most likely one's. A
# filter is decided on them when the candidates provably hold every token it keeps; else the next set.
_CANDIDATE_LOGS = (12.0, 30.0)
_CANDIDATE_CUTS = tuple(np.exp(-np.array(_CANDIDATE_LOGS)))
_UNDERFLOW = -700.0  # (logit - max) / temperature above this: exp() > 0 for every token of the row


class SamplingState(Protocol):
    """What the sampler reads of a sequence (the engine passes its Sequence objects)."""
    params: SamplingParams
    generator: np.random.Generator | None  # None: the sampler's shared rng
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]


def make_generator(params: SamplingParams, index: int = 0) -> np.random.Generator | None:
    """Completion `index` of a seeded request draws from default_rng(seed + index): the same tokens
    whatever else is in the batch. None without a seed."""
    return None if params.seed is None else np.random.default_rng((params.seed + index) % 2**64)


@dataclass
class SampleResult:
    token_id: int
    logprob: float  # raw log_softmax of the model output at token_id
    top_logprobs: dict[int, float] | None  # chosen token first, then the k best, when params.logprobs


def apply_min_tokens(logits: np.ndarray, states: list[SamplingState], eos_token_ids: Iterable[int]) -> np.ndarray:
    """Forbid eos and stop_token_ids until min_tokens are out (in place). ignore_eos does not lift
    this: like vLLM, it only changes when the engine stops."""
    eos, V = list(eos_token_ids), logits.shape[1]
    for i, s in enumerate(states):
        if len(s.output_token_ids) < s.params.min_tokens:  # a user's out-of-vocab stop id can't mask
            logits[i, [t for t in eos + s.params.stop_token_ids if t < V]] = -np.inf
    return logits


def apply_penalties(logits: np.ndarray, states: list[SamplingState]) -> np.ndarray:
    """vLLM penalties (in place): repetition over prompt+output (positive logits divided, others
    multiplied), then frequency (x count) and presence (x seen) over the output only. Works on the
    unique seen ids, never on V-sized temporaries."""
    for i, s in enumerate(states):
        p, row = s.params, logits[i]
        if p.repetition_penalty != 1.0:
            seen = np.unique(np.concatenate([np.asarray(s.prompt_token_ids, dtype=np.int64),
                                             np.asarray(s.output_token_ids, dtype=np.int64)]))
            v = row[seen]
            row[seen] = np.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and len(s.output_token_ids):
            ids, counts = np.unique(np.asarray(s.output_token_ids, dtype=np.int64), return_counts=True)
            row[ids] -= p.frequency_penalty * counts + p.presence_penalty
    return logits


def apply_token_bitmask(logits: np.ndarray, rows: list[int], bitmask: np.ndarray) -> np.ndarray:
    """-inf (in place) wherever a constrained row's bitmask forbids the token; other rows untouched."""
    V = logits.shape[1]
    for k, i in enumerate(rows):
        allowed = np.unpackbits(bitmask[k].view(np.uint8), bitorder="little", count=V)
        np.copyto(logits[i], -np.inf, where=allowed == 0)
    return logits


def filter_probs(w: np.ndarray, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> np.ndarray:
    """Zero out (in place) the probs [V] dropped by top-k, then top-p (on the top-k renormalized
    mass), then min-p; returns w, unnormalized. Masking beats gathering id lists (fresh arrays fault
    pages). Ties with the k-th value are kept (vLLM masks `< kth`); top-p keeps the smallest prefix
    of the descending order (ties: lower id first) whose mass reaches top_p, i.e. a token survives
    iff the mass strictly before it is < top_p; min-p drops p < min_p * max p (ratio-invariant)."""
    nz = np.count_nonzero(w)
    pos = w if nz == len(w) else w[w > 0]  # underflowed exp() zeros make np.partition crawl (~10 ms)
    if 0 < top_k < nz:
        w[w < np.partition(pos, -top_k)[-top_k]] = 0.0
        pos = w[w > 0]  # ~k left
    if top_p < 1.0:
        target = top_p * pos.sum()
        head = pos
        for n in _TOP_P_HEADS:  # shrink to the best n while they still hold the nucleus: skips a full sort
            if len(head) > n:
                h = head[head >= np.partition(head, -n)[-n]]
                if h.sum() < target:
                    break
                head = h
        s = np.sort(head)[::-1]  # values only (argsort is ~3x dearer); ids are recovered by value
        before = np.concatenate(([0.0], np.cumsum(s)[:-1]))  # mass strictly before each, exact prefix sums
        k = int(np.count_nonzero(before < target)) or 1  # nucleus size; before[0] = 0 keeps at least one
        t = s[k - 1]
        tied = np.flatnonzero(w == t)
        w[tied[k - int(np.count_nonzero(w > t)):]] = 0.0  # ties at the edge: lower ids first
        w[w < t] = 0.0
    if min_p > 0.0:
        w[w < min_p * w.max()] = 0.0
    return w


def filtered_candidates(w: np.ndarray, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                        total: float | None = None, vocab: int | None = None, cuts=_CANDIDATE_CUTS):
    """What filter_probs(w, ...) keeps, as (ids ascending, weights), decided on a candidate set (every
    token with w >= cut) when it provably holds every survivor, with filter_probs' arithmetic in the same
    order: the same survivors. w: exp weights, all > 0, max 1; total: w.sum() if known; vocab: w holds
    only the tokens with w >= cuts[0] of a vocabulary this big (top-k only: it needs no total).
    None: no filter applies, or no candidate set decides (the caller falls back to filter_probs)."""
    vocab = len(w) if vocab is None else vocab
    if not (0 < top_k < vocab or top_p < 1.0 or min_p > 0.0):
        return None
    for cut in cuts:
        ids = np.flatnonzero(w >= cut)
        cw = w[ids]
        complete = False  # True once ids hold exactly the survivors so far (not only the candidates)
        if 0 < top_k < vocab:
            if top_k > len(ids):
                continue
            keep = cw >= np.partition(cw, -top_k)[-top_k]  # every token >= the k-th is a candidate
            ids, cw, complete = ids[keep], cw[keep], True
        if top_p < 1.0:
            target = top_p * (cw.sum() if complete else (w.sum() if total is None else total))
            s = np.sort(cw)[::-1]
            before = np.concatenate(([0.0], np.cumsum(s)[:-1]))
            k = int(np.count_nonzero(before < target)) or 1
            if k == len(s) and not complete:  # the nucleus may reach past the candidates
                continue
            t = s[k - 1]  # t >= cut: every token tied with it is a candidate
            keep = cw > t
            keep[np.flatnonzero(cw == t)[:k - int(np.count_nonzero(keep))]] = True  # ties: lower ids first
            ids, cw, complete = ids[keep], cw[keep], True
        if min_p > 0.0:
            floor = min_p * cw.max()  # the most likely token survives top-k and top-p
            if not complete and floor < cut:
                continue
            keep = cw >= floor
            ids, cw = ids[keep], cw[keep]
        return ids, cw
    return None


def draw(cdf: np.ndarray, u: float) -> int:
    """Index of the first cdf entry > u * total (the inverse-cdf draw; u in [0, 1))."""
    j = int(np.searchsorted(cdf, u * cdf[-1], side="right"))  # first cdf > u*total: never a zero weight
    return j if j < len(cdf) else int(np.searchsorted(cdf, cdf[-1]))  # u*total rounded up to total


def _best(row: np.ndarray, k: int) -> list[int]:
    """The k highest-scoring ids of row, best first (ties: lower ids first)."""
    best = np.flatnonzero(row >= np.partition(row, -k)[-k])  # >= the k-th: every tie is in
    return best[np.argsort(-row[best], kind="stable")[:k]].tolist()


def score_tokens(logits: np.ndarray, token_ids, k: int, rows_at_once: int = 4):
    """Per row of raw logits [n, V]: (ids, logprobs, ranks) of token_ids[i], then the k best others.
    Rank: the number of tokens at least as likely (vLLM's: 1 is the best). A few rows at a time, so
    temporaries stay a few vocabulary rows."""
    out = []
    k = min(k, logits.shape[1])
    for lo in range(0, len(logits), rows_at_once):
        x = np.asarray(logits[lo:lo + rows_at_once], dtype=np.float32)
        m = x.max(axis=1, keepdims=True)
        lse = m[:, 0].astype(np.float64) + np.log(np.exp(x - m).sum(axis=1, dtype=np.float64))
        for row, lse_i, tok in zip(x, lse, token_ids[lo:lo + rows_at_once]):
            tok = int(tok)
            ids = [tok] + [t for t in (_best(row, k) if k > 0 else []) if t != tok]
            out.append((ids, [float(row[t] - lse_i) for t in ids],
                        [int(np.count_nonzero(row >= row[t])) for t in ids]))
    return out


class Sampler:
    def __init__(self, seed: int | None = None):
        self.rng = np.random.default_rng(seed)  # for requests without a seed
        # Reused [B, V] scratch: a fresh multi-MB temporary per step costs more in page faults
        # (kernel zeroing) than the exp over it (~4 ms vs ~1 ms at 16 x 49152).
        self._scratch = np.empty((0, 0), dtype=np.float32)
        self._row = np.empty(0, dtype=np.float64)  # one row's weights in float64, reused row after row

    def _row_buffer(self, vocab: int) -> np.ndarray:
        if self._row.shape[0] != vocab:
            self._row = np.empty(vocab, dtype=np.float64)
        return self._row

    def _buffer(self, shape) -> np.ndarray:
        if self._scratch.shape[0] < shape[0] or self._scratch.shape[1] != shape[1]:
            self._scratch = np.empty(shape, dtype=np.float32)  # exact: the memory budget counts it
        return self._scratch[:shape[0]]

    def sample(self, logits: np.ndarray, states: list[SamplingState], eos_token_ids: Iterable[int] = (),
               token_bitmask: tuple[list[int], np.ndarray] | None = None) -> list[SampleResult]:
        """token_bitmask: (rows, int32 [len(rows), ceil(V/32)]) for structured outputs: in row rows[k]
        only tokens whose bit is set in bitmask[k] may be drawn (reported logprobs stay raw)."""
        logits = np.asarray(logits, dtype=np.float32)
        assert logits.ndim == 2 and logits.shape[0] == len(states), (logits.shape, len(states))
        # (1) reporting logprobs from the raw logits: keep only log-sum-exp per row, gather later
        m = logits.max(axis=1, keepdims=True)
        buf = np.subtract(logits, m, out=self._buffer(logits.shape))
        lse = m[:, 0] + np.log(np.exp(buf, out=buf).sum(axis=1))
        # (2)+(3) processed logits on a copy (the scratch again), only when some row needs processing
        x = logits
        if token_bitmask is not None or any(s.params.min_tokens or s.params.repetition_penalty != 1.0 or
                                            s.params.frequency_penalty or s.params.presence_penalty for s in states):
            x = np.copyto(buf, logits) or buf
            apply_min_tokens(x, states, eos_token_ids)
            apply_penalties(x, states)
            if token_bitmask is not None:
                apply_token_bitmask(x, *token_bitmask)
        tokens = np.argmax(x, axis=1)  # greedy rows: first max => lowest id on ties
        rows = [i for i, s in enumerate(states) if not s.params.greedy]
        if rows:
            top = (m[:, 0] if x is logits else x.max(axis=1))[rows]  # no [rows] copy of the logits
            bottom = x.min(axis=1)[rows]
            w = self._row_buffer(x.shape[1])
            for i, hi, lo in zip(rows, top.tolist(), bottom.tolist()):
                s = states[i]
                p, inv_t = s.params, 1.0 / s.params.temperature
                u = (self.rng if s.generator is None else s.generator).random()  # one draw per step: batch-independent
                if 0 < p.top_k < len(w) and (lo - hi) * inv_t >= _UNDERFLOW:
                    # top-k needs no total mass: exp only the tokens near the max (every one with w >= the
                    # first cut; the same float64 arithmetic as the whole row's, so the same weights)
                    near = np.flatnonzero(x[i] >= hi - (_CANDIDATE_LOGS[0] + 1.0) / inv_t)
                    wn = np.exp((x[i, near].astype(np.float64) - hi) * inv_t)
                    found = filtered_candidates(wn, p.top_k, p.top_p, p.min_p, vocab=len(w), cuts=_CANDIDATE_CUTS[:1])
                    if found is not None:
                        tokens[i] = near[found[0][draw(np.cumsum(found[1]), u)]]
                        continue
                np.subtract(x[i], hi, out=w, dtype=np.float64)  # w = (x - max) / T in float64, exp'd in place
                w *= inv_t
                np.exp(w, out=w)
                if not (0 < p.top_k < len(w) or p.top_p < 1.0 or p.min_p > 0.0):  # no filter: all of the vocabulary
                    tokens[i] = draw(np.cumsum(w, out=w), u)
                    continue
                found = None if (lo - hi) * inv_t < _UNDERFLOW else filtered_candidates(w, p.top_k, p.top_p, p.min_p)
                if found is not None:
                    ids, weights = found
                    tokens[i] = ids[draw(np.cumsum(weights), u)]
                else:  # zeros in w (masked or underflowed tokens) or no candidate set decided: the full path
                    tokens[i] = draw(np.cumsum(filter_probs(w, p.top_k, p.top_p, p.min_p), out=w), u)
        results = []
        chosen = (logits[np.arange(len(states)), tokens] - lse).tolist()  # every row's logprob at once
        for i, (s, tok, lp) in enumerate(zip(states, tokens.tolist(), chosen)):
            top = None
            if s.params.logprobs is not None:
                top = {tok: lp}
                k = min(s.params.logprobs, logits.shape[1])
                for t in (_best(logits[i], k) if k > 0 else []):
                    top.setdefault(t, float(logits[i, t] - lse[i]))
            results.append(SampleResult(tok, lp, top))
        return results
