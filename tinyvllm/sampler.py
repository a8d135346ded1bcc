"""Sampler: batched float32 logits [B, V] -> one token (+ logprobs) per sequence.

Order follows vLLM: reported logprobs come from the raw model logits; then min_tokens masking,
repetition/frequency/presence penalties, the structured-output bitmask (constrained rows only), and
greedy argmax or temperature -> top-k -> top-p -> min-p -> a draw from the sequence's own generator.
The per-row work over the vocabulary (log-sum-exp, argmax, weights, filters, the draw) is native
(tv_sample, native/src/sampler.cpp); this file keeps the rare row processing and draws each row's one
uniform from its own generator, so a row's token never depends on the other rows.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from tinyvllm._native import NativeError, check, ffi, lib
from tinyvllm.sampling_params import SamplingParams

_INT32_MAX = 2**31 - 1
_GREEDY_ROW = (0.0, 0, 1.0, 0.0, 0.0)  # temperature, top_k, top_p, min_p, u of a greedy row


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


def native_sample(raw: np.ndarray, processed: np.ndarray | None, temperature: np.ndarray, top_k: np.ndarray,
                  top_p: np.ndarray, min_p: np.ndarray, u: np.ndarray, weights: np.ndarray | None = None):
    """tv_sample over C-contiguous float32 rows [B, V] (raw: reported logprobs; processed, None: raw:
    drawn from): (tokens int32 [B], lse float32 [B]). temperature 0: greedy. weights: float64 [B, V]
    to receive each sampled row's filtered, unnormalized weights."""
    B, V = raw.shape
    assert raw.dtype == np.float32 and raw.flags["C_CONTIGUOUS"]
    assert processed is None or (processed.dtype == np.float32 and processed.flags["C_CONTIGUOUS"])
    tokens, lse = np.empty(B, dtype=np.int32), np.empty(B, dtype=np.float32)
    args = [np.ascontiguousarray(a, dtype=np.float64) for a in (temperature, top_p, min_p, u)]
    k = np.ascontiguousarray(top_k, dtype=np.int32)
    assert all(len(a) == B for a in (*args, k)) and (processed is None or processed.shape == raw.shape)
    assert weights is None or (weights.shape == raw.shape and weights.dtype == np.float64 and weights.flags["C_CONTIGUOUS"])
    check(lib.tv_sample(ffi.cast("const float *", raw.ctypes.data),
                        ffi.NULL if processed is None else ffi.cast("const float *", processed.ctypes.data),
                        B, V, V, ffi.cast("const double *", args[0].ctypes.data),
                        ffi.cast("const int32_t *", k.ctypes.data), ffi.cast("const double *", args[1].ctypes.data),
                        ffi.cast("const double *", args[2].ctypes.data), ffi.cast("const double *", args[3].ctypes.data),
                        ffi.cast("int32_t *", tokens.ctypes.data), ffi.cast("float *", lse.ctypes.data),
                        ffi.NULL if weights is None else ffi.cast("double *", weights.ctypes.data)))
    return tokens, lse


def _rows(x: np.ndarray) -> np.ndarray:
    """C-contiguous float32 rows (no copy when they already are)."""
    return np.ascontiguousarray(x, dtype=np.float32)


def _finite(rows: np.ndarray) -> np.ndarray:
    """A copy with NaN as -inf and +inf as the largest float; a row with no finite logit left is
    all zeros (uniform)."""
    y = np.nan_to_num(rows, nan=-np.inf, posinf=np.finfo(np.float32).max, neginf=-np.inf)
    y[y.max(axis=1) == -np.inf] = 0.0
    return _rows(y)


def log_sum_exp(rows: np.ndarray) -> np.ndarray:
    """float32 [n]: each raw row's log-sum-exp, as the Sampler computes it (logprob = row[t] - lse)."""
    rows = _rows(np.atleast_2d(rows))
    zeros = np.zeros(len(rows))
    return native_sample(rows, None, zeros, zeros.astype(np.int32), zeros + 1.0, zeros, zeros)[1]


def sampling_weights(x: np.ndarray, params: SamplingParams) -> np.ndarray:
    """float64 [V]: the unnormalized weights a random request draws from, for processed logits x
    (temperature, then top-k, top-p, min-p; dropped tokens 0)."""
    x = _rows(x[None])
    w = np.empty(x.shape, dtype=np.float64)
    native_sample(x, None, np.array([params.temperature]), np.array([min(max(params.top_k, 0), _INT32_MAX)]),
                  np.array([params.top_p]), np.array([params.min_p]), np.zeros(1), w)
    return w[0]


class Sampler:
    def __init__(self, seed: int | None = None):
        self.rng = np.random.default_rng(seed)  # for requests without a seed
        # Reused [B, V] scratch for processed logits: a fresh multi-MB temporary per step costs more in
        # page faults (kernel zeroing) than the processing.
        self._scratch = np.empty((0, 0), dtype=np.float32)

    def _buffer(self, shape) -> np.ndarray:
        if self._scratch.shape[0] < shape[0] or self._scratch.shape[1] != shape[1]:
            self._scratch = np.empty(shape, dtype=np.float32)  # exact: the memory budget counts it
        return self._scratch[:shape[0]]

    def sample(self, logits: np.ndarray, states: list[SamplingState], eos_token_ids: Iterable[int] = (),
               token_bitmask: tuple[list[int], np.ndarray] | None = None) -> list[SampleResult]:
        """token_bitmask: (rows, int32 [len(rows), ceil(V/32)]) for structured outputs: in row rows[k]
        only tokens whose bit is set in bitmask[k] may be drawn (reported logprobs stay raw)."""
        logits = _rows(logits)
        assert logits.ndim == 2 and logits.shape[0] == len(states), (logits.shape, len(states))
        B, V = logits.shape
        # (1) min_tokens, penalties, bitmask on a copy (the scratch), only when some row needs them;
        # reported logprobs come from the raw logits
        x = None
        if token_bitmask is not None or any(s.params.min_tokens or s.params.repetition_penalty != 1.0 or
                                            s.params.frequency_penalty or s.params.presence_penalty for s in states):
            x = self._buffer(logits.shape)
            np.copyto(x, logits)
            apply_min_tokens(x, states, eos_token_ids)
            apply_penalties(x, states)
            if token_bitmask is not None:
                apply_token_bitmask(x, *token_bitmask)
            # A row with every token forbidden (a grammar that allows only EOS before min_tokens is out)
            # must not fail the batch it rides in: the grammar outranks min_tokens, and a row with
            # nothing allowed at all draws from its raw logits.
            for i in np.flatnonzero(x.max(axis=1) == -np.inf).tolist():
                x[i] = logits[i]
                if token_bitmask is not None and i in token_bitmask[0]:
                    k = token_bitmask[0].index(i)
                    apply_token_bitmask(x, [i], token_bitmask[1][k:k + 1])
                    if x[i].max() == -np.inf:
                        x[i] = logits[i]
        # (2) per row: temperature 0 (greedy) or the filters and one uniform from the row's own generator
        rows = []
        for s in states:  # in row order: one draw per sampled row and step (batch-independent)
            p = s.params
            rows.append(_GREEDY_ROW if p.greedy else (p.temperature, min(max(p.top_k, 0), _INT32_MAX), p.top_p, p.min_p,
                                                      (self.rng if s.generator is None else s.generator).random()))
        temperature, top_k, top_p, min_p, u = np.array(rows, dtype=np.float64).reshape(-1, 5).T
        try:
            tokens, lse = native_sample(logits, x, temperature, top_k, top_p, min_p, u)
        except NativeError:
            # NaN or infinite logits (a damaged model, random weights): checked only when the native
            # sampler refuses them, so a normal step pays nothing; sampled from finite stand-ins
            logits, x = _finite(logits), None if x is None else _finite(x)
            tokens, lse = native_sample(logits, x, temperature, top_k, top_p, min_p, u)
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
