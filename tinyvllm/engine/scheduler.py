"""Decides which tokens run in the next step: continuous batching with chunked prefill and
preemption by recompute, FCFS."""
from collections import deque

from .block_pool import BlockPool
from .sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int):
        self.pool = pool
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []   # in admission order: the last one is preempted first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """Return (sequence, number of its next uncomputed tokens to run) pairs, with KV blocks
        allocated for them. Running sequences go first (their decodes and prefill chunks), then
        waiting ones are admitted while tokens, sequence slots and blocks last."""
        budget, batch = self.max_num_batched_tokens, []
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue  # preempted while making room for an earlier sequence
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.pool.can_allocate(seq, n) and seq.status is SequenceStatus.RUNNING:
                self.preempt(self.running[-1])
            if seq.status is SequenceStatus.RUNNING:
                self.pool.allocate(seq, n)
                batch.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.pool.can_allocate(seq, n):
                break  # FCFS: later requests wait behind the head of the queue
            self.waiting.popleft()
            self.pool.allocate(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

    def preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks and queue it first in line; it is recomputed on readmission."""
        self.running.remove(seq)
        self.pool.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.free(seq)
        seq.status = SequenceStatus.FINISHED
