"""LLMEngine: requests in, one batched forward per step(), RequestOutputs out (vLLM's shape)."""
import dataclasses
import itertools
import time
from dataclasses import dataclass

import numpy as np

from ..beam_search import Beam, BeamGroup, NoText, blocks_needed
from ..model import load_model, resolve_model
from ..model.quantize import quantize_weights
from ..outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from ..runner import runner_for
from ..sampler import Sampler, SampleResult, score_tokens
from ..sampling_params import BeamSearchParams, SamplingParams
from ..spec import DraftModelProposer, NgramProposer, SpeculativeConfig, SpeculativeDecoder
from ..structured import StructuredOutputs, structured_off_reason, structured_outputs_enabled
from ..tokenizer import IncrementalDetokenizer, Tokenizer
from .block_manager import BlockManager
from .memory import RUNTIME_RESERVE_BYTES, heap_weight_bytes, plan_kv_blocks, rss_bytes
from .scheduler import Scheduler
from .sequence import Sequence, SequenceStatus

# A beam's sequence only carries tokens and KV: its BeamGroup decides every token and when it ends.
_BEAM_SEQ_PARAMS = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    metrics: RequestMetrics
    deadline: float | None = None  # time.monotonic() after which the request ends with what it has
    beam: BeamGroup | None = None  # a beam-search request: seqs are its live beams


class RequestsFailed(RuntimeError):
    """A step failed (an allocation, the forward, the sampler): the requests of its batch were ended and
    their blocks freed; every other request is untouched and the engine can step on. `outputs` holds
    what the step had finished before it failed (expired deadlines)."""

    def __init__(self, request_ids: list[str], cause: BaseException, outputs: list[RequestOutput]):
        super().__init__(f"the step running requests {request_ids} failed: {cause!r}")
        self.request_ids, self.cause, self.outputs = request_ids, cause, outputs


class LLMEngine:
    def __init__(self, model: str, *, tokenizer: str | None = None, threads: int | None = None,
                 device: str = "cpu", quantization: str | None = None, memory_budget=None,
                 kv_cache_bytes=None, kv_cache_dtype: str = "float16", block_size: int = 16,
                 max_model_len: int | None = None, max_num_seqs: int = 32,
                 max_num_batched_tokens: int = 512, long_prefill_token_threshold: int = 0,
                 decode_stall_ratio: float = 3.0, enable_prefix_caching: bool = True, seed: int = 0,
                 speculative_config=None, enable_structured_outputs: bool | None = None):
        runner_cls, runner_kwargs = runner_for(device)  # ValueError / ImportError (with install hint) up front
        spec_cfg = SpeculativeConfig.parse(speculative_config)  # ValueError up front too
        budget = memory_budget if kv_cache_bytes is None else None  # kv_cache_bytes sizes the pool: no budget in play
        structured_on = structured_outputs_enabled(enable_structured_outputs, budget)  # ImportError up front
        rss_before = rss_bytes()
        self.model_path = resolve_model(model)
        self.weights = quantize_weights(load_model(self.model_path), quantization)
        cfg = self.config = self.weights.config
        self.tokenizer = (Tokenizer.from_dir(tokenizer) if tokenizer else
                          Tokenizer.from_gguf_metadata(self.weights.metadata) if self.weights.kind == "gguf"
                          else Tokenizer.from_dir(self.weights.path))
        # What loading left resident besides weights (parsed metadata, tokenizer) is paid from the budget too.
        weight_bytes = sum(t.data.nbytes for t in self.weights.tensors.values())
        self.load_overhead_bytes = max(0, rss_bytes() - rss_before - heap_weight_bytes(self.weights.tensors.values()))
        # the runner says what it will allocate; the budget pays for exactly that
        block_bytes = runner_cls.kv_bytes_per_block(cfg, block_size, kv_cache_dtype)
        workspace = runner_cls.workspace_bytes(cfg, max_num_batched_tokens, max_num_seqs, threads)
        wanted_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        draft = None
        if spec_cfg is not None:  # logits rows at every draft position; a draft model's weights, KV, workspace
            workspace += 4 * max_num_seqs * spec_cfg.num_speculative_tokens * cfg.vocab_size
            if spec_cfg.method == "draft_model":
                draft = self._load_draft(spec_cfg)
                weight_bytes += sum(t.data.nbytes for t in draft.tensors.values())
                block_bytes += runner_cls.kv_bytes_per_block(draft.config, block_size, kv_cache_dtype)
                workspace += runner_cls.workspace_bytes(draft.config, max_num_batched_tokens + max_num_seqs,
                                                        max_num_seqs, threads)
                wanted_len = min(wanted_len, draft.config.max_position_embeddings)
        # structured outputs build llguidance's tokenizer on the first constrained request: a budget reserves it now
        self.structured_reserve_bytes = (StructuredOutputs.memory_bytes(self.tokenizer, cfg.vocab_size, self.weights.metadata)
                                         if structured_on and budget is not None else 0)
        num_blocks = plan_kv_blocks(
            weight_bytes=weight_bytes, block_bytes=block_bytes, memory_budget=memory_budget,
            workspace=workspace + RUNTIME_RESERVE_BYTES + self.load_overhead_bytes,
            kv_cache_bytes=kv_cache_bytes, extra_blocks=runner_cls.extra_kv_blocks,
            structured_bytes=self.structured_reserve_bytes,
            default_kv_bytes=min(256 * 2**20, block_bytes * max_num_seqs * -(-wanted_len // block_size)))
        # A lone sequence must always fit in the pool, or preemption could never make room for it.
        self.max_model_len = min(wanted_len, num_blocks * block_size)
        cfg.serve_len = self.max_model_len  # LongRoPE (phi3) picks its factors by the context served
        self.runner = runner_cls(self.weights, num_blocks, block_size, kv_cache_dtype, threads, **runner_kwargs)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids)
        self.scheduler = Scheduler(BlockManager(num_blocks, block_size, enable_prefix_caching), max_num_seqs,
                                   max_num_batched_tokens, self.max_model_len, self.eos_token_ids,
                                   max_prompt_logits_rows=max_num_seqs,
                                   long_prefill_token_threshold=long_prefill_token_threshold,
                                   decode_stall_ratio=decode_stall_ratio)
        self.sampler = Sampler(seed)  # draws for requests without a seed of their own
        self.spec = None
        if spec_cfg is not None:
            proposer = (NgramProposer(spec_cfg.prompt_lookup_min, spec_cfg.prompt_lookup_max) if draft is None else
                        DraftModelProposer(runner_cls(draft, num_blocks, block_size, kv_cache_dtype, threads,
                                                      **runner_kwargs), self.sampler.rng))
            self.spec = SpeculativeDecoder(spec_cfg, proposer, self.max_model_len, self.sampler.rng)
        self.structured = StructuredOutputs(self.tokenizer, cfg.vocab_size, self.eos_token_ids, threads, structured_on,
                                            structured_off_reason(enable_structured_outputs, budget))
        self.requests: dict[str, _Request] = {}
        self._deadlines: dict[str, float] = {}  # request id -> deadline, for the requests that have one
        self._seq_ids, self._request_ids = itertools.count(), itertools.count()
        # cumulative counters for serving metrics; last_batch_size = sequences in the latest step
        self.num_steps = self.num_scheduled_tokens = self.num_generated_tokens = self.last_batch_size = 0
        self.num_beam_steps = self.num_beam_rows = 0  # steps that ran beams; beam logits rows scored

    def _load_draft(self, spec_cfg: SpeculativeConfig):
        draft = quantize_weights(load_model(resolve_model(spec_cfg.model)), spec_cfg.draft_quantization)
        if draft.config.vocab_size != self.config.vocab_size:
            raise ValueError(f"speculative_config.model {spec_cfg.model!r} has a vocabulary of "
                             f"{draft.config.vocab_size} tokens; the target's has {self.config.vocab_size}: "
                             "a draft model must share the target's tokenizer")
        return draft

    # ---- requests -------------------------------------------------------------------------
    def _prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
        if isinstance(prompt, dict) and "prompt" in prompt:
            return self._prompt_ids(prompt["prompt"])
        raise TypeError("a prompt is a string or a dict with 'prompt_token_ids' (or 'prompt')")

    def add_request(self, request_id: str | None, prompt, params: SamplingParams | BeamSearchParams | None = None,
                    arrival_time: float | None = None) -> str:
        """params: SamplingParams, or BeamSearchParams for a beam search (its output, when finished, holds the
        beam_width best beams as completions, best first, as vLLM's beam search returns them)."""
        params = params or SamplingParams()
        if not isinstance(params, (SamplingParams, BeamSearchParams)):
            raise TypeError("params must be a SamplingParams or a BeamSearchParams")
        beam = isinstance(params, BeamSearchParams)
        request_id = str(next(self._request_ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self._prompt_ids(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if min(ids) < 0 or max(ids) >= self.config.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.config.vocab_size})")
        width, name = (params.beam_width, "beam_width") if beam else (params.n, "n")
        if width > self.scheduler.max_num_seqs:  # its sequences run together: it could never be admitted
            raise ValueError(f"{name}={width} is more than this engine's max_num_seqs ({self.scheduler.max_num_seqs})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; this engine's max_model_len is "
                             f"{self.max_model_len}, which leaves no room to generate")
        if beam:
            return self._add_beam_search(request_id, text, ids, params, arrival_time)
        matchers = ([None] * params.n if params.structured_outputs is None else  # ValueError if invalid
                    self.structured.matchers(params.structured_outputs, params.n))
        now = time.monotonic() if arrival_time is None else arrival_time
        seqs = [Sequence(next(self._seq_ids), request_id, i, ids, params,
                         IncrementalDetokenizer(self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens), now,
                         matchers[i])
                for i in range(params.n)]
        deadline = None if params.deadline_s is None else now + params.deadline_s
        self.requests[request_id] = _Request(request_id, text, ids, seqs, RequestMetrics(arrival_time=now), deadline)
        if deadline is not None:
            self._deadlines[request_id] = deadline
        self.scheduler.add(seqs)
        return request_id

    def check_beam_search(self, num_prompt_tokens: int, params: BeamSearchParams) -> int:
        """The search's steps (max_tokens, or fewer where the context ends first); ValueError when a search
        of that prompt length could not fit the KV cache with all its beams (it would never finish):
        refused up front. Reads only fixed sizes (safe from any thread)."""
        blocks = self.scheduler.blocks
        steps = min(params.max_tokens, self.max_model_len - num_prompt_tokens)
        need = blocks_needed(num_prompt_tokens, steps, params.beam_width, blocks.block_size,
                             blocks.enable_prefix_caching)
        if need > blocks.num_blocks:
            raise ValueError(f"beam search of a {num_prompt_tokens}-token prompt with beam_width={params.beam_width} "
                             f"and max_tokens={params.max_tokens} may need {need} KV blocks; the KV cache has "
                             f"{blocks.num_blocks}")
        return steps

    def _add_beam_search(self, request_id: str, text, ids: list[int], params: BeamSearchParams, arrival_time) -> str:
        steps = self.check_beam_search(len(ids), params)
        now = time.monotonic() if arrival_time is None else arrival_time
        seq = self._beam_seq(request_id, ids, params.beam_width, now)
        group = BeamGroup(params, seq, steps, self.eos_token_ids, self.sampler.rng)
        self.requests[request_id] = _Request(request_id, text, ids, [seq], RequestMetrics(arrival_time=now), beam=group)
        self.scheduler.add([seq])
        return request_id

    def _beam_seq(self, request_id: str, tokens, width: int, now: float) -> Sequence:
        seq = Sequence(next(self._seq_ids), request_id, 0, tokens, _BEAM_SEQ_PARAMS, NoText(), now)
        seq.seats = width  # the group's sequence slots are held from its admission (its forks need no room)
        return seq

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks. Returns its final output (finish_reason "abort" on
        the completions that were still running); None when it is unknown or already done."""
        return self._end(str(request_id), "abort") if str(request_id) in self.requests else None

    def _end(self, request_id: str, reason: str) -> RequestOutput:
        req = self.requests.pop(request_id)
        self._deadlines.pop(request_id, None)
        if req.beam is not None:
            req.beam.end_reason = reason
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, reason)
        self.scheduler.flush()  # the blocks are free when this returns
        return self._output(req)

    def _expire_deadlines(self) -> list[RequestOutput]:
        """End the requests whose deadline has passed with what they have (finish_reason "deadline").
        Checked before every step, so a deadline is met within one step of its time."""
        if not self._deadlines:
            return []
        now = time.monotonic()
        return [self._end(rid, "deadline") for rid, t in list(self._deadlines.items()) if now >= t]

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        expired = self._expire_deadlines()
        if self.spec is not None:  # draft tokens for the running decodes, which the scheduler makes room for
            self.spec.plan(self.scheduler.running)  # (the whole batch counts for disable_by_batch_size)
            for seq in self.scheduler.running:
                if self._is_beam(seq):  # a beam scores one position per step: it never speculates
                    seq.spec_token_ids = seq.spec_token_ids[:0]
        batch = self.scheduler.schedule()
        if batch is None and self.scheduler.waiting:
            batch = self._unblock_beams()
        if batch is None:
            return expired
        try:
            changed = self._run(batch)
        except Exception as e:  # fail this batch's requests, not the engine
            failed = list(dict.fromkeys(s.request_id for s in batch.seqs if s.request_id in self.requests))
            for rid in failed:
                self._end(rid, "abort")
            raise RequestsFailed(failed, e, expired) from e
        return expired + [self._output(self._pop(rid) if self._done(rid) else self.requests[rid]) for rid in changed]

    def _is_beam(self, seq: Sequence) -> bool:
        req = self.requests.get(seq.request_id)
        return req is not None and req.beam is not None

    def _unblock_beams(self):
        """Nothing could run and the queue's head does not fit: every running sequence is a beam waiting
        for group mates that were preempted (a group steps only once all its beams have proposed). The
        oldest such group goes first: the other groups' waiting beams are preempted (to the back of the
        queue; their full blocks stay in the prefix cache) and its preempted beams go to the head. Its
        worst case fits the pool (add_request checks), so it completes its step."""
        first = next((r for r in self.requests.values() if r.beam is not None
                      and any(s.status is SequenceStatus.WAITING for s in r.seqs)), None)
        if first is None:
            return None
        for seq in [s for s in self.scheduler.running if s.request_id != first.request_id and self._is_beam(s)
                    and s.num_uncomputed_tokens == 0]:
            self.scheduler.preempt(seq, requeue_last=True)
        self.scheduler.requeue_first([s for s in first.seqs if s.status is SequenceStatus.WAITING])
        return self.scheduler.schedule()

    def _run(self, batch) -> list[str]:
        """One scheduled batch: forward, sample, update the sequences; returns the ids of the requests with
        new output (a beam search: when it finished)."""
        for src, dst in batch.block_copies:  # copy-on-write: split shared blocks first
            self.runner.copy_block(src, dst)
        beam_rows = [(s, r) for s, r in zip(batch.sampled, batch.sample_rows) if self._is_beam(s)]
        if beam_rows:  # beams are not sampled: their groups read their logits rows
            rows = [(s, r) for s, r in zip(batch.sampled, batch.sample_rows) if not self._is_beam(s)]
            batch = dataclasses.replace(batch, sampled=[s for s, _ in rows], sample_rows=[r for _, r in rows])
        if self.spec is not None:
            self.spec.prepare(batch)  # a draft model drafts now that the drafts have slots
        bitmask = self.structured.start_bitmask(batch.sampled)  # structured outputs: overlaps the forward
        logits = self.runner.forward(*batch.model_inputs())
        for seq, row, n in batch.prompt_rows:
            self._score_prompt(seq, logits[row:row + n], seq.num_computed_tokens)
        for seq, row in beam_rows:
            self.requests[seq.request_id].beam.propose(seq, logits[row])
        verified = self.spec.verify(logits, batch, self.eos_token_ids) if batch.spec_rows else []
        if batch.sample_rows != list(range(len(logits))):  # n > 1 forks share a row; prompt rows are not sampled
            logits = logits[batch.sample_rows]
        results = self.sampler.sample(logits, batch.sampled, self.eos_token_ids, bitmask()) if batch.sampled else []
        sampled = self.scheduler.postprocess(batch, results, verified)
        beams_done = self._advance_beams(dict.fromkeys(s.request_id for s, _ in beam_rows)) if beam_rows else []
        self._record(batch, sampled, len(beam_rows))
        return list(dict.fromkeys(s.request_id for s in sampled)) + beams_done

    def _advance_beams(self, request_ids) -> list[str]:
        """Beam groups whose beams have all proposed take their step: surviving children fork from their
        parent (the first child continues the parent's sequence), parents without one are freed. Returns
        the groups that finished."""
        done, now = [], time.monotonic()
        current = lambda s: s.status is SequenceStatus.RUNNING and s.num_uncomputed_tokens == 0
        for rid in request_ids:
            req = self.requests[rid]
            group = req.beam
            if not group.ready(current):
                continue
            beams = []
            for parent, children in group.select():
                if group.done or not children:
                    self.scheduler.finish(parent.seq)  # its blocks go back (those shared live on in its children)
                    continue
                seqs = [parent.seq] + [self._beam_seq(rid, parent.seq.token_ids, group.width, now)
                                       for _ in children[1:]]
                for child in seqs[1:]:  # forked before the parent takes its token: they share every block so far
                    self.scheduler.fork(parent.seq, child)
                for seq, (token, cum, lps) in zip(seqs, children):  # (no stop: steps_left ends the search first)
                    seq.append_token(SampleResult(token, lps[token].logprob, None), (), self.max_model_len)
                    beams.append(Beam(seq, cum, parent.logprobs + [lps]))
            group.beams, req.seqs = beams, [b.seq for b in beams]
            req.metrics.on_token(now)
            if group.done:
                done.append(rid)
        if not self.scheduler.has_work():
            self.scheduler.flush()  # the last beams' blocks go back now
        return done

    def _pop(self, request_id: str) -> _Request:
        self._deadlines.pop(request_id, None)
        return self.requests.pop(request_id)

    def _score_prompt(self, seq: Sequence, logits: np.ndarray, start: int) -> None:
        """Prompt logprobs of one chunk: logits row j (position start + j) scores prompt token start + j + 1.
        Only the k + 1 entries per position are kept. Positions scored before a preemption are skipped."""
        first = len(seq.prompt_logprobs) - 1 - start  # the first row not scored yet
        last = min(len(logits), seq.num_prompt_tokens - 1 - start)
        if last <= first:
            return
        targets = seq.prompt_token_ids[start + first + 1:start + last + 1]
        for ids, lps, ranks in score_tokens(logits[first:last], targets, seq.params.prompt_logprobs):
            seq.prompt_logprobs.append({t: Logprob(lp, r, self.tokenizer.decode([t], skip_special_tokens=False))
                                        for t, lp, r in zip(ids, lps, ranks)})

    def _record(self, batch, sampled, num_beam_rows: int) -> None:
        now = time.monotonic()
        self.num_steps, self.last_batch_size = self.num_steps + 1, len(batch.seqs)
        self.num_scheduled_tokens += sum(batch.num_tokens)
        self.num_generated_tokens += len(sampled)
        if num_beam_rows:
            self.num_beam_steps, self.num_beam_rows = self.num_beam_steps + 1, self.num_beam_rows + num_beam_rows
        for seq in batch.seqs:
            metrics = self.requests[seq.request_id].metrics
            metrics.first_scheduled_time = metrics.first_scheduled_time or now
        for seq in sampled:
            self.requests[seq.request_id].metrics.on_token(now)

    def _done(self, request_id: str) -> bool:
        req = self.requests[request_id]
        return req.beam.done if req.beam is not None else all(s.is_finished for s in req.seqs)

    def _output(self, req: _Request) -> RequestOutput:
        if req.beam is not None:
            return self._beam_output(req)
        finished = all(s.is_finished for s in req.seqs)
        if finished:
            req.metrics.finished_time = time.monotonic()
        outs = [CompletionOutput(s.index, s.visible_text(), s.output_token_ids.tolist(), s.cumulative_logprob,
                                 list(s.logprobs) if s.logprobs is not None else None, s.finish_reason, s.stop_reason)
                for s in req.seqs]
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, finished, req.metrics,
                             req.seqs[0].prompt_logprobs)

    def _beam_output(self, req: _Request) -> RequestOutput:
        """A beam search's output (vLLM's shape): once it ends, one completion per returned beam, best first
        (token ids: the generated ones; text: without a final EOS; logprobs: each step's candidates)."""
        group, n = req.beam, len(req.prompt_token_ids)
        finished = group.done or group.end_reason is not None
        outs = []
        if finished:
            req.metrics.finished_time = time.monotonic()
            for i, b in enumerate(group.best()):
                gen = b.tokens[n:]
                shown = gen[:-1] if gen and gen[-1] in group.eos else gen
                outs.append(CompletionOutput(i, self.tokenizer.decode(shown), gen, b.cum_logprob, b.logprobs,
                                             b.finish_reason, b.stop_reason))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, finished, req.metrics, None)

    # ---- stats ----------------------------------------------------------------------------
    def stats(self) -> dict:
        sched, blocks = self.scheduler, self.scheduler.blocks
        return {"running": len(sched.running), "waiting": len(sched.waiting),
                "blocks_total": blocks.num_blocks, "blocks_free": blocks.num_free_blocks,
                "preemptions": sched.num_preemptions, "prefix_cache": blocks.prefix_cache_stats,
                "steps": self.num_steps, "last_batch_size": self.last_batch_size,
                "scheduled_tokens": self.num_scheduled_tokens, "generated_tokens": self.num_generated_tokens,
                "spec_decode": self.spec.stats() if self.spec is not None else None,
                "beam_search": {"requests": sum(r.beam is not None for r in self.requests.values()),
                                "steps": self.num_beam_steps, "beam_rows": self.num_beam_rows}}


__all__ = ["LLMEngine", "RequestsFailed", "SequenceStatus"]
