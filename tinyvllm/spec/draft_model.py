"""Draft-model proposer: a smaller model with the target's vocabulary proposes k tokens, one batched
draft forward per token, in its own runner.

Its KV cache has as many blocks as the target's and shares the target's block tables: the scheduler
already gave every speculating sequence slots for its draft tokens, and every position the target
computes (prefill chunks, decodes) the draft computes too, in the same step, so a prefix-cache hit
finds the draft's KV in the same block. The draft's weights and KV blocks are paid from the engine's
memory budget (the engine plans both caches together)."""
import numpy as np

from .rejection import probs_of


class DraftModelProposer:
    def __init__(self, runner, rng: np.random.Generator):
        self.runner = runner
        self.rng = rng
        self._computed: dict[int, int] = {}        # seq_id -> leading positions whose draft KV is right
        self._probs: dict[int, np.ndarray] = {}    # seq_id -> q rows of this step's sampled drafts

    def propose(self, seq, k: int) -> np.ndarray:
        """Placeholders: the drafts are computed in prepare(), once the batch has slots for them."""
        return np.zeros(k, dtype=np.int32)

    def draft_probs(self, seq):
        return self._probs.get(seq.seq_id)

    def prepare(self, batch) -> None:
        """Bring the draft's KV up to the target's for every sequence of the batch (the same tokens the
        target runs this step), then draft the tokens of the speculating ones, one forward per token."""
        for src, dst in batch.block_copies:
            self.runner.copy_block(src, dst)
        self._probs.clear()
        tokens, positions, seq_index, rows, spec = [], [], [], [], []
        total = 0
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens)):
            start, own_end = seq.num_computed_tokens, min(len(seq), seq.num_computed_tokens + n)
            first = min(self._computed.get(seq.seq_id, start), start)
            tokens.append(seq.token_ids[first:own_end])
            positions.append(np.arange(first, own_end, dtype=np.int32))
            seq_index.append(np.full(own_end - first, i, dtype=np.int32))
            total += own_end - first
            self._computed[seq.seq_id] = own_end
            if seq.num_computed_tokens + n > len(seq):
                rows.append(total - 1)
                spec.append((i, seq, seq.num_computed_tokens + n - len(seq)))
        if len(self._computed) > 4 * max(1, len(batch.seqs)) + 64:  # forget finished sequences
            live = {s.seq_id for s in batch.seqs}
            self._computed = {k: v for k, v in self._computed.items() if k in live}
        logits = self.runner.forward(np.concatenate(tokens), np.concatenate(positions), np.concatenate(seq_index),
                                     batch.block_tables, np.asarray(rows, dtype=np.int32))
        q_rows = {seq.seq_id: [] for _, seq, _ in spec}
        for j in range(max((n for _, _, n in spec), default=0)):  # logits row r: the r-th of `spec`
            for (_, seq, _), row in zip(spec, logits):
                seq.spec_token_ids[j] = self._draw(seq, row, q_rows[seq.seq_id])
            spec = [(i, seq, n) for i, seq, n in spec if n > j + 1]  # those that need another draft
            if not spec:
                break
            tok = np.asarray([seq.spec_token_ids[j] for _, seq, _ in spec], dtype=np.int32)
            pos = np.asarray([len(seq) + j for _, seq, _ in spec], dtype=np.int32)
            logits = self.runner.forward(tok, pos, np.asarray([i for i, _, _ in spec], dtype=np.int32),
                                         batch.block_tables, np.arange(len(spec), dtype=np.int32))
        for seq_id, qs in q_rows.items():
            if qs:
                self._probs[seq_id] = np.stack(qs)

    def _draw(self, seq, row: np.ndarray, q_rows: list) -> int:
        """Greedy requests: the draft's argmax (a point mass). Others: a draw from the draft's own
        distribution under the request's temperature/top-k/top-p, whose q the verifier needs."""
        if seq.params.greedy:
            return int(np.argmax(row))
        q = probs_of(row, seq.params)
        q_rows.append(q)
        rng = self.rng if seq.generator is None else seq.generator
        return int(np.searchsorted(np.cumsum(q), rng.random() * q.sum(), side="right").clip(0, len(q) - 1))

    def verified(self, seq, num_tokens_before: int, num_accepted: int, num_drafts: int) -> None:
        """The draft wrote KV for the last token and drafts 1..k-1; accepted ones stay right."""
        self._computed[seq.seq_id] = num_tokens_before + min(num_accepted, num_drafts - 1)
