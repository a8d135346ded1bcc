"""The scheduler owns KV bookkeeping: it decides which tokens run next (continuous batching with
chunked prefill, prefix caching, FCFS, preemption by recompute), keeps the native block manager's
state in step with the sequences, and applies what a step produced. In the steady state every step
costs one native block-manager call: the ops a step needs (the last step's frees and forks, this
step's marks and slots, the head of the queue) go in one list."""
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .block_manager import ALLOCATE, ALLOCATE_UNCACHED, APPEND, FORK, FREE, OP_DTYPE, TRUNCATE, BlockManager
from .sequence import Sequence, SequenceStatus

# A step's fixed cost (reading every weight once, launching the layers) in prefill tokens: on the
# reference machine a step costs about 10 ms + 0.75 ms per token, so the fixed part is ~14 tokens.
STEP_FIXED_TOKENS = 16


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]            # sequences that run tokens this step; row k of block_tables
    num_tokens: list[int]           # how many of each one's uncomputed tokens run
    block_tables: np.ndarray        # int32 [len(seqs), max_blocks]
    block_copies: list[tuple[int, int]]  # copy-on-write (src, dst) blocks to copy before the forward
    sampled: list[Sequence] = field(default_factory=list)  # sequences that get a token (n > 1 forks included)
    sample_rows: list[int] = field(default_factory=list)   # each one's row among the logits rows
    forks: list[tuple[Sequence, Sequence]] = field(default_factory=list)  # (parent, child) joining after this step
    # prompt logprobs: (sequence, its first logits row, how many) for chunks that want logits at every position
    prompt_rows: list[tuple[Sequence, int, int]] = field(default_factory=list)
    # speculative decoding: (sequence, its first logits row, number of draft tokens) for sequences that run
    # their last token and draft tokens after it, with logits at each of those 1 + k positions
    spec_rows: list[tuple[Sequence, int, int]] = field(default_factory=list)

    def model_inputs(self):
        """(tokens, positions, seq index of each token, block tables, logits rows) for a model runner."""
        tokens, positions, seq_index, rows, total = [], [], [], [], 0
        for k, (seq, n) in enumerate(zip(self.seqs, self.num_tokens)):
            start = seq.num_computed_tokens
            n_spec = max(0, start + n - len(seq))  # draft tokens after the sequence's own
            tokens.append(seq.token_ids[start:start + n - n_spec])
            if n_spec:
                tokens.append(seq.spec_token_ids[:n_spec])
            positions.append(np.arange(start, start + n, dtype=np.int32))
            seq_index.append(np.full(n, k, dtype=np.int32))
            total += n
            if seq.needs_prompt_logprobs or n_spec:  # every position: scores the next prompt / draft token
                rows.extend(range(total - n, total))
            elif start + n == len(seq):
                rows.append(total - 1)
        return (np.concatenate(tokens), np.concatenate(positions), np.concatenate(seq_index), self.block_tables,
                np.asarray(rows, dtype=np.int32))


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 eos_token_ids=(), max_prompt_logits_rows: int | None = None, long_prefill_token_threshold: int = 0,
                 decode_stall_ratio: float = 3.0):
        self.blocks = blocks
        # Prefill chunks: at most long_prefill_token_threshold tokens of one prompt per step (vLLM's knob;
        # 0: no cap), and while sequences decode, the prefill tokens of a step are limited so that the step
        # costs about decode_stall_ratio times a decode-only step at most (0: no limit, prefills fill the
        # token budget and stall every decode for their whole chunk).
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.decode_stall_ratio = decode_stall_ratio
        # Prefill chunks of requests with prompt logprobs need logits at every position; a step computes at
        # most this many such rows (the memory plan pays for them), so those prompts run in chunks this long.
        self.max_prompt_logits_rows = max(1, max_prompt_logits_rows or max_num_seqs)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []   # in admission order: the last one is preempted first
        self.num_preemptions = 0
        self._pending: list[tuple[tuple, Sequence]] = []  # FREE / FORK ops sent with the next list
        self._forks: dict[int, list[Sequence]] = {}       # n > 1: siblings waiting for a prompt's prefill

    def add(self, seqs: list[Sequence]) -> None:
        """A request's sequences: the first prefills the prompt; the others fork from it (sharing its
        blocks, copy-on-write) when its prefill completes, and sample from the same logits."""
        self.waiting.append(seqs[0])
        if len(seqs) > 1:
            self._forks[seqs[0].seq_id] = list(seqs[1:])

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # ---- schedule ------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        """Running sequences go first (decodes and prefill chunks), then waiting ones are admitted while
        the token budget, sequence slots and blocks last."""
        budget, plan = self.max_num_batched_tokens, []  # plan: [sequence, chunk size, table row]
        self._rows_left = self.max_prompt_logits_rows
        self._prefill_left = self.prefill_budget(sum(s.num_uncomputed_tokens <= 1 for s in self.running))
        for seq in self.running:
            if budget == 0:
                break
            n = self._chunk(seq, budget, speculate=True)
            if n:
                plan.append([seq, n, len(plan)])
                budget -= n
        head = self.waiting[0] if self.waiting and self._can_admit(self.waiting[0], budget) else None
        width = -(-max([max(len(s), s.num_computed_tokens + n) for s, n, _ in plan] + [len(head) if head else 1])
                  // self.blocks.block_size)
        tables = np.empty((len(plan) + 1, width), dtype=np.int32)
        todo = [(self._append_op(e), e) for e in plan]
        if head:  # the head of the queue rides on the same call; if it does not fit, nothing is admitted (FCFS)
            todo.append(((self._allocate_kind(head), len(head), 0, len(plan), head.seq_id, 0, head.tokens_address),
                         None))
        copies, admitted = [], False
        while True:
            ops = np.array([op for op, _ in self._pending] + [op for op, _ in todo], dtype=OP_DTYPE)
            done, cow = self.blocks.apply(ops, tables)
            copies += cow
            done -= len(self._pending)
            self._pending.clear()
            if done == len(todo) or todo[done][1] is None:  # all ran, or only the head did not fit
                admitted = head is not None and done == len(todo)
                break
            # An APPEND found no free block: free the latest admitted sequence and send the rest again.
            victim, head = self.running[-1], None  # no admissions in a step that preempts
            self.preempt(victim)
            plan = [e for e in plan if e[0] is not victim]
            todo = [(op, e) for op, e in todo[done:] if e is not None and e[0] is not victim]
        if admitted:
            head.num_computed_tokens = int(ops[-1]["num_computed"])
            self._admit(self.waiting.popleft())
            plan.append([head, self._chunk(head, budget), len(tables) - 1])
            budget -= plan[-1][1]
        if not plan:
            return None
        tables = tables[[row for _, _, row in plan]] if [r for _, _, r in plan] != list(range(len(tables))) else tables
        if admitted:
            tables = self._admit_more(plan, tables, budget)
        return self._batch(plan, tables, copies)

    def prefill_budget(self, num_decodes: int) -> int:
        """Prefill tokens one step may run beside num_decodes decoding sequences (decode priority). A
        step costs about STEP_FIXED_TOKENS + its tokens; with decodes running, the prefill part is held
        to (ratio - 1) decode-only steps, so no stream waits much longer than ratio times its usual gap
        for a token. The decodes themselves always keep their tokens. Without decodes: the whole budget."""
        if num_decodes == 0 or self.decode_stall_ratio <= 0:
            return self.max_num_batched_tokens
        cap = int((self.decode_stall_ratio - 1) * (STEP_FIXED_TOKENS + num_decodes))
        return max(1, min(cap, self.max_num_batched_tokens - num_decodes))

    def _chunk(self, seq: Sequence, budget: int, speculate: bool = False) -> int:
        """How many of seq's uncomputed tokens run this step (takes prompt-logits rows when it needs them),
        plus the draft tokens after its last one when it speculates and the budget has room for them."""
        if speculate and seq.num_uncomputed_tokens == 1 and len(seq.spec_token_ids):
            return min(1 + len(seq.spec_token_ids), budget)
        n = min(seq.num_uncomputed_tokens, budget)
        prefill = n > 1  # a prefill chunk (or a recompute): held to the prefill budget and the per-prompt cap
        if prefill:
            n = min(n, self._prefill_left, self.long_prefill_token_threshold or n)
        if seq.needs_prompt_logprobs:
            n = min(n, self._rows_left)
            self._rows_left -= n
        if prefill:
            self._prefill_left -= n
        return n

    def _can_admit(self, seq: Sequence, budget: int) -> bool:
        return (budget > 0 and self._prefill_left > 0 and self._has_room(seq)
                and (self._rows_left > 0 or not seq.needs_prompt_logprobs))

    @staticmethod
    def _allocate_kind(seq: Sequence) -> int:
        # Prefix-cache hits would leave positions without logits: a prompt still being scored runs in full.
        return ALLOCATE_UNCACHED if seq.needs_prompt_logprobs else ALLOCATE

    def _append_op(self, entry) -> tuple:
        # marks what the last step computed, then slots for every token (the sampled one and drafts included)
        seq, n, row = entry
        return (APPEND, max(len(seq), seq.num_computed_tokens + n), seq.num_computed_tokens, row, seq.seq_id, 0,
                seq.tokens_address)

    def _has_room(self, seq: Sequence) -> bool:
        """Admitting seq keeps at most max_num_seqs running once every fork has joined: per request, its
        running sequences and the siblings still to fork from them, or the seats it holds (a beam search
        holds its width from admission on) where that is more."""
        held, seats = {}, {}
        for s in self.running + [seq]:
            held[s.request_id] = held.get(s.request_id, 0) + 1 + len(self._forks.get(s.seq_id, ()))
            seats[s.request_id] = s.seats
        return sum(max(n, seats[r]) for r, n in held.items()) <= self.max_num_seqs

    def _admit_more(self, plan: list, tables: np.ndarray, budget: int) -> np.ndarray:
        """Admit further waiting sequences, one call each (their cached prefixes decide the budget left)."""
        while self.waiting and self._can_admit(self.waiting[0], budget):
            seq = self.waiting[0]
            op = np.array([(self._allocate_kind(seq), len(seq), 0, 0, seq.seq_id, 0, seq.tokens_address)],
                          dtype=OP_DTYPE)
            row = np.empty((1, -(-len(seq) // self.blocks.block_size)), dtype=np.int32)
            if self.blocks.apply(op, row)[0] == 0:
                break
            seq.num_computed_tokens = int(op[0]["num_computed"])
            self._admit(self.waiting.popleft())
            plan.append([seq, self._chunk(seq, budget), len(plan)])
            budget -= plan[-1][1]
            width = max(tables.shape[1], row.shape[1])
            tables = np.concatenate([np.pad(tables, ((0, 0), (0, width - tables.shape[1]))),
                                     np.pad(row, ((0, 0), (0, width - row.shape[1])))])
        return tables

    def _batch(self, plan: list, tables: np.ndarray, copies: list) -> ScheduledBatch:
        batch = ScheduledBatch([s for s, _, _ in plan], [n for _, n, _ in plan], tables, copies)
        row = 0  # logits rows come in model_inputs' order: a whole chunk when scoring the prompt, else the last
        for seq, n, _ in plan:
            n_spec = seq.num_computed_tokens + n - len(seq)
            if n_spec > 0:  # verified by the speculative decoder, not sampled
                batch.spec_rows.append((seq, row, n_spec))
                row += n
                continue
            if seq.needs_prompt_logprobs:
                batch.prompt_rows.append((seq, row, n))
                row += n
            elif seq.num_computed_tokens + n == len(seq):
                row += 1
            if seq.num_computed_tokens + n == len(seq):  # the chunk reaches the end: a new token
                batch.sampled.append(seq)
                batch.sample_rows.append(row - 1)
                for child in self._forks.pop(seq.seq_id, []):  # n > 1: siblings share this prompt's logits
                    batch.forks.append((seq, child))
                    batch.sampled.append(child)
                    batch.sample_rows.append(row - 1)
        return batch

    # ---- postprocess ---------------------------------------------------------------------------
    def postprocess(self, batch: ScheduledBatch, results, spec_results=()) -> list[Sequence]:
        """Apply a step: computed counts advance, forks join, sampled tokens are appended and stopped
        sequences finish; speculating sequences append their verified tokens (spec_results: a list of
        SampleResults per batch.spec_rows entry) and give back the slots of rejected drafts. Returns
        the sequences that got a token, once per token."""
        for seq, n in zip(batch.seqs, batch.num_tokens):
            seq.num_computed_tokens += min(n, len(seq) - seq.num_computed_tokens)
        for parent, child in batch.forks:
            self.fork(parent, child)
        for seq, result in zip(batch.sampled, results):
            if seq.append_token(result, self.eos_token_ids, self.max_model_len):
                self.finish(seq)
        got = list(batch.sampled)
        for (seq, _, n_spec), verified in zip(batch.spec_rows, spec_results):
            got += [seq] * self._append_verified(seq, n_spec, verified)
        if not self.has_work():
            self.flush()  # nothing will run soon: hand the blocks back now
        return got

    def _append_verified(self, seq: Sequence, n_spec: int, verified) -> int:
        """The accepted drafts and the token after them; the KV of every position but the new last one is
        now right. Slots past that (rejected drafts) go back with the next list. Returns the tokens added."""
        slots = len(seq) + n_spec
        for i, result in enumerate(verified):
            stop = seq.append_token(result, self.eos_token_ids, self.max_model_len)
            seq.num_computed_tokens = len(seq) - 1
            if stop:
                self.finish(seq)
                return i + 1
        if slots > len(seq):
            self._pending.append(((TRUNCATE, len(seq), seq.num_computed_tokens, -1, seq.seq_id, 0,
                                   seq.tokens_address), seq))
        return len(verified)

    # ---- sequence state ------------------------------------------------------------------------
    def _admit(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child (a new sequence holding parent's tokens) joins the running ones, sharing parent's blocks
        as they are now (after a step); a block is copied only when one of them writes into it."""
        self._pending.append(((FORK, 0, 0, -1, child.seq_id, parent.seq_id, 0), child))
        child.num_computed_tokens = parent.num_computed_tokens
        self._admit(child)

    def _free_op(self, seq: Sequence) -> None:
        # marks what it computed (full blocks become cache entries), then frees its blocks
        self._pending.append(((FREE, 0, seq.num_computed_tokens, -1, seq.seq_id, 0, seq.tokens_address), seq))

    def preempt(self, seq: Sequence, requeue_last: bool = False) -> None:
        """Free the sequence's blocks and queue it first in line (last: requeue_last); it is recomputed on
        readmission (cheaply where its full blocks are still in the prefix cache)."""
        self.running.remove(seq)
        self._free_op(seq)
        seq.status, seq.num_computed_tokens = SequenceStatus.WAITING, 0
        self.waiting.append(seq) if requeue_last else self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def requeue_first(self, seqs: list[Sequence]) -> None:
        """Move these waiting sequences to the head of the queue, in this order."""
        for seq in reversed(seqs):
            self.waiting.remove(seq)
            self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str | None = None) -> None:
        """Stop a sequence (reason: set it, e.g. "abort"); its blocks are freed with the next list."""
        if reason:
            seq.finish_reason = reason
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._free_op(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        for parent_id, children in list(self._forks.items()):
            if seq in children:
                children.remove(seq)
            if not children or parent_id == seq.seq_id:
                del self._forks[parent_id]
        seq.status = SequenceStatus.FINISHED

    def flush(self) -> None:
        """Send the pending frees and forks now (an abort, or nothing left to run)."""
        if self._pending:
            ops = np.array([op for op, _ in self._pending], dtype=OP_DTYPE)
            self._pending.clear()
            self.blocks.apply(ops)
