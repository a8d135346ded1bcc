"""Decides which tokens run in the next step: continuous batching with chunked prefill, prefix
caching and preemption by recompute, FCFS. KV blocks come from the native BlockManager."""
from collections import deque

from ..core import BlockManager
from .sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []   # in admission order: the last one is preempted first
        self.num_preemptions = 0
        self.block_copies: list[tuple[int, int]] = []  # copy-on-write pairs the runner applies before the step

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """Return (sequence, number of its next uncomputed tokens to run) pairs whose KV slots exist.
        Running sequences go first (decodes and prefill chunks), then waiting ones are admitted while
        the token budget, sequence slots and blocks last."""
        budget, batch = self.max_num_batched_tokens, []
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue  # preempted while making room for an earlier sequence
            new = seq.token_ids[seq.num_slots:]  # tokens sampled since the last step need slots
            while new and not self.blocks.can_append_slots(seq.seq_id, len(new)):
                self.preempt(self.running[-1])
                if seq.status is not SequenceStatus.RUNNING:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            if new:
                self.block_copies += self.blocks.append_slots(seq.seq_id, new)
                seq.num_slots = len(seq)
                seq.block_table = self.blocks.block_table(seq.seq_id)
            n = min(seq.num_uncomputed_tokens, budget)
            batch.append((seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = self.blocks.allocate(seq.seq_id, seq.token_ids)
            if cached is None:
                break  # FCFS: later requests wait behind the head of the queue
            self.waiting.popleft()
            seq.num_computed_tokens, seq.num_slots = cached, len(seq)
            seq.block_table = self.blocks.block_table(seq.seq_id)
            self.admit(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            batch.append((seq, n))
            budget -= n
        return batch

    def admit(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` shares all of `parent`'s blocks (n > 1 sampling: one prompt prefill for all)."""
        self.blocks.fork(parent.seq_id, child.seq_id)
        child.num_computed_tokens, child.num_slots = parent.num_computed_tokens, parent.num_slots
        child.block_table = parent.block_table
        self.admit(child)

    def _release(self, seq: Sequence) -> None:
        if seq.seq_id in self.blocks:
            self.blocks.free(seq.seq_id)
        seq.block_table, seq.num_computed_tokens, seq.num_slots = [], 0, 0

    def preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks and queue it first in line; it is recomputed on readmission
        (cheaply where its full blocks are still in the prefix cache)."""
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
