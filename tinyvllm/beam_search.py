"""Beam search (vLLM's semantics) as the engine runs it: one BeamGroup per beam-search request.

Every live beam is one engine Sequence; the group decides, the engine applies. Each step every live beam
proposes its 2 * beam_width likeliest next tokens (log-softmax of its logits row, accumulated in
float64; with a temperature, as in vLLM, also the token its sampler draws at that temperature); once all of a group's beams have proposed (a preempted beam is recomputed first), candidates
ending in EOS (unless ignore_eos) are set aside as finished and the beam_width best of the rest live on.
A parent with several surviving children is forked (the children share its blocks; a block is copied
only when a beam writes into a shared one); a parent with none is freed. After max_tokens steps the
beam_width best of the finished and live beams are returned, ranked by
cum_logprob / len(tokens) ** length_penalty (tokens count the prompt, not a final EOS), as vLLM does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .outputs import Logprob
from .sampling_params import BeamSearchParams
from .spec.rejection import draw


@dataclass
class BeamSearchSequence:
    """One returned beam (vLLM's shape): tokens include the prompt; logprobs holds, per generated token,
    the candidates its step considered ({token_id: Logprob}, rank 1 = likeliest); text decodes tokens."""
    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (ended with EOS) | "length" (max_tokens or the context) | "abort"
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    """The beam_width best beams of one prompt, best first."""
    sequences: list[BeamSearchSequence]


def beam_search_score(tokens, cum_logprob: float, eos_token_ids, length_penalty: float) -> float:
    """vLLM's (and HF transformers') ranking: cum_logprob / len ** length_penalty, where len counts the
    prompt and every generated token except a final EOS."""
    n = len(tokens) - (1 if tokens and tokens[-1] in eos_token_ids else 0)
    try:  # the formula's limits where a huge |length_penalty| leaves floats (any finite one is allowed)
        scale = float(max(n, 1)) ** length_penalty
    except OverflowError:
        scale = math.inf
    if scale == 0.0:
        return -math.inf if cum_logprob < 0 else 0.0
    return cum_logprob / scale


def top_candidates(logits: np.ndarray, k: int, temperature: float = 0.0,
                   rng: np.random.Generator | None = None) -> list[tuple[int, float, int]]:
    """The k likeliest tokens of one logits row as (token, log-softmax in float64, rank), likeliest first
    (equal logprobs: lower token id first). With a temperature, as vLLM's beam search asks its sampler for
    2 * width logprobs at that temperature: the token drawn from softmax(logits / temperature) joins them
    when it is not among them already (with its raw logprob and its rank in the whole vocabulary)."""
    x = logits.astype(np.float64)
    m = x.max()
    lsm = x - (m + np.log(np.exp(x - m).sum()))
    k = min(k, len(x))
    ids = np.argpartition(-lsm, k - 1)[:k] if k < len(x) else np.arange(len(x))
    ids = ids[np.lexsort((ids, -lsm[ids]))]
    cands = [(t, lp, rank) for rank, (t, lp) in enumerate(zip(ids.tolist(), lsm[ids].tolist()), 1)]
    if temperature > 0:
        drawn = draw(np.exp((x - m) / temperature), rng)
        if drawn not in ids:
            cands.append((drawn, float(lsm[drawn]), 1 + int((lsm > lsm[drawn]).sum())))
    return cands


def blocks_needed(prompt_len: int, steps: int, width: int, block_size: int, shared_prompt: bool = True) -> int:
    """The most KV blocks one search can hold at once. shared_prompt: the prompt's full blocks are never
    written again, so every beam shares them (also after a preemption, through the prefix cache); each
    beam may own the rest of its table. Without the prefix cache a recomputed beam holds its own copy."""
    total = -(-(prompt_len + steps) // block_size)
    shared = prompt_len // block_size if shared_prompt else 0
    return shared + width * (total - shared)


class NoText:
    """Beams are decoded once, at the end: their sequences keep no running text."""

    @staticmethod
    def add(token: int) -> str:
        return ""


@dataclass
class Beam:
    seq: object                        # the engine Sequence carrying this beam's tokens and KV blocks
    cum_logprob: float
    logprobs: list[dict[int, Logprob]]


class BeamGroup:
    """One beam-search request's state. steps: max_tokens, or fewer where the context ends first (so a
    beam's sequence never stops by itself)."""

    def __init__(self, params: BeamSearchParams, first_seq, steps: int, eos_token_ids, rng=None):
        self.width, self.steps_left, self.length_penalty = params.beam_width, steps, params.length_penalty
        self.temperature, self.rng = params.temperature, rng  # rng: draws the tokens a temperature adds
        self.eos = frozenset(() if params.ignore_eos else eos_token_ids)
        self.beams = [Beam(first_seq, 0.0, [])]
        self.finished: list[BeamSearchSequence] = []
        self.candidates: dict[int, list[tuple[int, float, int]]] = {}  # seq_id -> this step's (token, logprob, rank)
        self.done = False
        self.end_reason: str | None = None  # set when the request is ended early ("abort", "deadline")

    def propose(self, seq, logits_row: np.ndarray) -> None:
        self.candidates[seq.seq_id] = top_candidates(logits_row, 2 * self.width, self.temperature, self.rng)

    def ready(self, is_current) -> bool:
        """Every beam has proposed for its current last token (is_current(seq): its KV is complete and it
        holds its blocks; a preempted beam's old proposal waits for its recompute)."""
        return all(b.seq.seq_id in self.candidates and is_current(b.seq) for b in self.beams)

    def select(self) -> list[tuple[Beam, list[tuple[int, float, dict]]]]:
        """One step: per current beam (in order), its surviving children (token, cum_logprob, the step's
        logprobs), best first. When this was the last step (self.done), the survivors join
        self.finished instead and the caller frees every beam."""
        cands = []  # (parent, token, cum_logprob, step logprobs) of the candidates that go on
        for beam in self.beams:
            proposed = self.candidates.pop(beam.seq.seq_id)
            step_lps = {t: Logprob(lp, rank) for t, lp, rank in proposed}
            for t, lp, _ in proposed:
                cum = beam.cum_logprob + lp
                if t in self.eos:
                    self.finished.append(BeamSearchSequence(beam.seq.token_ids.tolist() + [t],
                                                            beam.logprobs + [step_lps], cum, finish_reason="stop"))
                else:
                    cands.append((beam, t, cum, step_lps))
        self.candidates.clear()
        cands.sort(key=lambda c: c[2], reverse=True)  # stable; one length for all, so cum ranks as the score
        survivors = cands[:self.width]
        self.steps_left -= 1
        self.done = self.steps_left == 0 or not survivors
        if self.done:
            self.finished += [BeamSearchSequence(b.seq.token_ids.tolist() + [t], b.logprobs + [lps], cum,
                                                 finish_reason="length") for b, t, cum, lps in survivors]
        # A finished beam's score is final: only the width best can be returned (a stable sort keeps ties in
        # the order they finished, as ranking the whole list at the end would)
        self.finished = self._ranked(self.finished)
        children: dict[int, list] = {}
        for b, t, cum, lps in survivors:
            children.setdefault(id(b), []).append((t, cum, lps))
        return [(b, children.get(id(b), [])) for b in self.beams]

    def best(self) -> list[BeamSearchSequence]:
        """The beam_width best beams, best first: the finished ones, and while the search runs (an abort,
        a deadline) the live beams as they are (finish_reason: end_reason)."""
        live = [] if self.done else [BeamSearchSequence(b.seq.token_ids.tolist(), b.logprobs, b.cum_logprob,
                                                        finish_reason=self.end_reason or "abort") for b in self.beams]
        return self._ranked(self.finished + live)

    def _ranked(self, seqs: list[BeamSearchSequence]) -> list[BeamSearchSequence]:
        score = lambda s: beam_search_score(s.tokens, s.cum_logprob, self.eos, self.length_penalty)
        return sorted(seqs, key=score, reverse=True)[:self.width]
