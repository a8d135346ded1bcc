"""Beam search on the engine's scheduler and runner (vLLM's LLM.beam_search semantics), on native forks.

Every live beam is one engine Sequence. Each step all live beams of all prompts run in one batched
forward; each beam proposes its 2 * beam_width likeliest next tokens (log-softmax of its logits row,
accumulated in float64); candidates ending in EOS (unless ignore_eos) are set aside as finished, and the
beam_width best of the rest live on. A parent with several surviving children is forked (the children
share its blocks; a block is copied only when a beam writes into a shared one); a parent with none is
freed. After max_tokens steps the beam_width best of the finished and live beams are returned, ranked by
cum_logprob / len(tokens) ** length_penalty (tokens count the prompt, not a final EOS), as vLLM does.

The search drives the engine's scheduler step by step itself, so the engine must be idle while it runs.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .engine.sequence import Sequence
from .outputs import Logprob
from .sampler import SampleResult
from .sampling_params import BeamSearchParams, SamplingParams


@dataclass
class BeamSearchSequence:
    """One returned beam (vLLM's shape): tokens include the prompt; logprobs holds, per generated token,
    the candidates its step considered ({token_id: Logprob}, rank 1 = likeliest); text decodes tokens."""
    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (ended with EOS) | "length" (max_tokens or the context)
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    """The beam_width best beams of one prompt, best first."""
    sequences: list[BeamSearchSequence]


def beam_search_score(tokens, cum_logprob: float, eos_token_ids, length_penalty: float) -> float:
    """vLLM's (and HF transformers') ranking: cum_logprob / len ** length_penalty, where len counts the
    prompt and every generated token except a final EOS."""
    n = len(tokens) - (1 if tokens and tokens[-1] in eos_token_ids else 0)
    return cum_logprob / max(n, 1) ** length_penalty


class _NoText:
    """Beams are decoded once, at the end: their sequences keep no running text."""

    @staticmethod
    def add(token: int) -> str:
        return ""


@dataclass
class _Beam:
    seq: Sequence | None               # carries the beam's KV blocks (None once the search is over)
    tokens: list[int]                  # prompt + generated
    cum_logprob: float
    logprobs: list[dict[int, Logprob]]
    candidates: list[tuple[int, float]] | None = None  # (token, logprob) of this position, once computed


class _Group:
    """One prompt's search."""

    def __init__(self, index: int, prompt_ids: list[int], seq: Sequence, steps: int, blocks: int):
        # steps: max_tokens, or fewer where the context ends first (so a beam's sequence never stops by
        # itself); blocks: the most this search can hold (blocks_needed)
        self.index, self.steps_left, self.blocks = index, steps, blocks
        self.beams = [_Beam(seq, list(prompt_ids), 0.0, [])]
        self.finished: list[BeamSearchSequence] = []


def top_candidates(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k likeliest tokens of one logits row and their log-softmax in float64, likeliest first (equal
    logprobs: lower token id first)."""
    x = logits.astype(np.float64)
    m = x.max()
    lsm = x - (m + np.log(np.exp(x - m).sum()))
    k = min(k, len(x))
    ids = np.argpartition(-lsm, k - 1)[:k] if k < len(x) else np.arange(len(x))
    ids = ids[np.lexsort((ids, -lsm[ids]))]
    return ids, lsm[ids]


def blocks_needed(prompt_len: int, steps: int, width: int, block_size: int) -> int:
    """The most KV blocks one prompt's search can hold at once: the prompt's full blocks are never written
    again, so every beam shares them; each beam may own the rest of its table."""
    shared = prompt_len // block_size
    return shared + width * (-(-(prompt_len + steps) // block_size) - shared)


def run_beam_search(engine, prompts, params: BeamSearchParams, concurrency_limit: int | None = None,
                    on_step: Callable[[], None] | None = None) -> list[BeamSearchOutput]:
    """Beam search over `prompts` (strings or {"prompt_token_ids": [...]} dicts) on an idle LLMEngine, at
    most concurrency_limit prompts at a time (fewer where max_num_seqs or the KV cache says so).
    on_step (benchmarks, tests) is called after each step's blocks are allocated, before its forward."""
    if not isinstance(params, BeamSearchParams):
        raise TypeError("params must be a BeamSearchParams")
    if concurrency_limit is not None and not (isinstance(concurrency_limit, int) and concurrency_limit >= 1):
        raise ValueError(f"concurrency_limit must be a positive integer or None, got {concurrency_limit!r}")
    sched = engine.scheduler
    if engine.has_unfinished_requests() or sched.has_work():
        raise RuntimeError("beam search drives the engine step by step: finish or abort its running requests first")
    width = params.beam_width
    if width > sched.max_num_seqs:  # a prompt's beams run together in one step
        raise ValueError(f"beam_width={width} is more than this engine's max_num_seqs ({sched.max_num_seqs})")
    prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
    parsed = []
    for p in prompts:  # every prompt is checked before anything runs
        _, ids = engine._prompt_ids(p)
        if not ids:
            raise ValueError("the prompt is empty")
        if min(ids) < 0 or max(ids) >= engine.config.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {engine.config.vocab_size})")
        if len(ids) >= engine.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; this engine's max_model_len is "
                             f"{engine.max_model_len}, which leaves no room to generate")
        need = blocks_needed(len(ids), min(params.max_tokens, engine.max_model_len - len(ids)), width,
                             sched.blocks.block_size)
        if need > sched.blocks.num_blocks:
            raise ValueError(f"beam search of a {len(ids)}-token prompt with beam_width={width} and max_tokens="
                             f"{params.max_tokens} may need {need} KV blocks; the KV cache has {sched.blocks.num_blocks}")
        parsed.append(ids)
    search = _Search(engine, params, on_step, concurrency_limit)
    try:
        return search.run(parsed)
    finally:
        search.release()


class _Search:
    def __init__(self, engine, params: BeamSearchParams, on_step, concurrency_limit: int | None):
        self.engine, self.sched, self.params, self.on_step = engine, engine.scheduler, params, on_step
        self.max_groups = self.sched.max_num_seqs // params.beam_width  # every group's beams fit one step
        if concurrency_limit is not None:
            self.max_groups = min(self.max_groups, concurrency_limit)
        self.eos = frozenset(() if params.ignore_eos else engine.eos_token_ids)
        # the sequences only carry KV: the search decides every token and when each beam ends
        self.seq_params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
        self.live: list[_Group] = []
        self.request_id = f"beam-search-{time.monotonic_ns()}"

    def _new_seq(self, tokens) -> Sequence:
        return Sequence(next(self.engine._seq_ids), self.request_id, 0, tokens, self.seq_params, _NoText(),
                        time.monotonic())

    def run(self, prompts: list[list[int]]) -> list[BeamSearchOutput]:
        outputs: list[BeamSearchOutput | None] = [None] * len(prompts)
        todo = list(enumerate(prompts))
        width, blocks = self.params.beam_width, self.sched.blocks
        while todo or self.live:
            # A prompt starts once its worst case fits beside the running ones' (blocks_needed): the search
            # then never preempts, which could leave a prompt's beams waiting on each other for blocks.
            while todo and len(self.live) < self.max_groups:
                i, ids = todo[0]
                steps = min(self.params.max_tokens, self.engine.max_model_len - len(ids))
                need = blocks_needed(len(ids), steps, width, blocks.block_size)
                if self.live and sum(g.blocks for g in self.live) + need > blocks.num_blocks:
                    break
                todo.pop(0)
                seq = self._new_seq(ids)
                self.live.append(_Group(i, ids, seq, steps, need))
                self.sched.add([seq])
            batch = self.sched.schedule()
            if batch is None:
                raise RuntimeError("beam search: nothing could be scheduled (the KV cache is smaller than planned)")
            if self.on_step is not None:
                self.on_step()
            for src, dst in batch.block_copies:  # copy-on-write first, as LLMEngine._run does
                self.engine.runner.copy_block(src, dst)
            logits = self.engine.runner.forward(*batch.model_inputs())
            self._propose(batch, logits)
            # computed counts advance; the search appends tokens itself (no sampler)
            self.sched.postprocess(dataclasses.replace(batch, sampled=[], sample_rows=[], forks=[]), [])
            for group in [g for g in self.live if all(b.candidates is not None for b in g.beams)]:
                if self._select(group):
                    outputs[group.index] = self._finish(group)
        return outputs

    def _propose(self, batch, logits: np.ndarray) -> None:
        beam_of = {b.seq.seq_id: b for g in self.live for b in g.beams}
        k = 2 * self.params.beam_width
        for seq, row in zip(batch.sampled, batch.sample_rows):
            ids, lps = top_candidates(logits[row], k)
            beam_of[seq.seq_id].candidates = list(zip(ids.tolist(), lps.tolist()))

    def _select(self, group: _Group) -> bool:
        """One step of one prompt's search; True when the prompt is done."""
        candidates = []  # (parent beam, token, cum_logprob, the step's logprobs) of the beams that go on
        for beam in group.beams:
            step_logprobs = {t: Logprob(lp, rank) for rank, (t, lp) in enumerate(beam.candidates, 1)}
            for t, lp in beam.candidates:
                cum = beam.cum_logprob + lp
                if t in self.eos:
                    group.finished.append(BeamSearchSequence(beam.tokens + [t], beam.logprobs + [step_logprobs],
                                                             cum, finish_reason="stop"))
                else:
                    candidates.append((beam, t, cum, step_logprobs))
            beam.candidates = None
        candidates.sort(key=lambda c: c[2], reverse=True)  # stable; one length for all, so cum ranks as the score
        survivors = candidates[:self.params.beam_width]
        group.steps_left -= 1
        if group.steps_left == 0 or not survivors:  # the prompt is done: no beam needs its KV any more
            for beam in group.beams:
                self.sched.finish(beam.seq)
            group.beams = [_Beam(None, b.tokens + [t], cum, b.logprobs + [lps]) for b, t, cum, lps in survivors]
            return True
        children: dict[int, list] = {}
        for c in survivors:
            children.setdefault(id(c[0]), []).append(c)
        beams = []
        for parent in group.beams:
            mine = children.get(id(parent))
            if not mine:
                self.sched.finish(parent.seq)  # no surviving child: its blocks go back
                continue
            # the first child continues the parent's sequence; the others fork it before it takes its token,
            # sharing every block computed so far
            seqs = [parent.seq] + [self._new_seq(parent.seq.token_ids) for _ in mine[1:]]
            for seq in seqs[1:]:
                self.sched.fork(parent.seq, seq)
            for seq, (_, t, cum, lps) in zip(seqs, mine):  # (no stop: _Group.steps_left ends the search first)
                seq.append_token(SampleResult(t, lps[t].logprob, None), (), self.engine.max_model_len)
                beams.append(_Beam(seq, parent.tokens + [t], cum, parent.logprobs + [lps]))
        group.beams = beams
        return False

    def _finish(self, group: _Group) -> BeamSearchOutput:
        self.live.remove(group)
        done = group.finished + [BeamSearchSequence(b.tokens, b.logprobs, b.cum_logprob, finish_reason="length")
                                 for b in group.beams]
        lp, eos = self.params.length_penalty, self.eos
        done.sort(key=lambda s: beam_search_score(s.tokens, s.cum_logprob, eos, lp), reverse=True)
        best = done[:self.params.beam_width]
        for s in best:
            s.text = self.engine.tokenizer.decode(s.tokens, skip_special_tokens=False)
        return BeamSearchOutput(best)

    def release(self) -> None:
        """Free every sequence of this search still holding blocks or queued (after an error or an interrupt,
        wherever it struck), and send the frees now."""
        for seq in list(self.sched.running) + list(self.sched.waiting):
            if seq.request_id == self.request_id:
                self.sched.finish(seq, "abort")
        self.live.clear()
        self.sched.flush()
