"""SpeculativeDecoder: what the engine calls around its step. Before scheduling it asks the proposer
for draft tokens for the running decodes (or none: per-step off switches); once the batch is
scheduled the proposer may run (a draft model); after the forward the rejection sampler turns each
speculating sequence's k + 1 logits rows into its tokens. Keeps the acceptance statistics."""
import numpy as np

from .config import SpeculativeConfig
from .rejection import RejectionSampler

_EMA = 0.5  # weight of the latest step in a sequence's acceptance average


class SpeculativeDecoder:
    def __init__(self, config: SpeculativeConfig, proposer, max_model_len: int, rng: np.random.Generator):
        self.config, self.proposer, self.max_model_len = config, proposer, max_model_len
        self.rejection = RejectionSampler(rng)
        k = config.num_speculative_tokens
        self.num_drafts = self.num_draft_tokens = self.num_accepted_tokens = 0
        self.num_accepted_per_pos = [0] * k   # drafts accepted at position 1..k (vLLM's per-position counter)
        self.num_steps_off = 0                 # steps in which the batch-size switch turned drafting off
        self._acceptance: dict[int, list] = {}  # seq_id -> [average acceptance, steps to sit out]

    # ---- before scheduling ----------------------------------------------------------------------
    def plan(self, running) -> None:
        """Set spec_token_ids of every running sequence: drafts for decodes that may speculate, else none."""
        dbs, empty = self.config.disable_by_batch_size, np.empty(0, dtype=np.int32)
        on = dbs is None or len(running) <= dbs
        if not on and running:
            self.num_steps_off += 1
        if len(self._acceptance) > 2 * len(running) + 64:  # forget finished sequences
            live = {s.seq_id for s in running}
            self._acceptance = {k: v for k, v in self._acceptance.items() if k in live}
        for seq in running:
            k = self._room(seq) if on else 0
            seq.spec_token_ids = self.proposer.propose(seq, k) if k > 0 else empty

    def _room(self, seq) -> int:
        """Drafts worth proposing: only for a decode (one uncomputed token), within max_model_len and
        max_tokens (the token after the drafts counts too), unless its acceptance made it sit out."""
        if seq.num_uncomputed_tokens != 1 or seq.needs_prompt_logprobs:
            return 0
        acc = self._acceptance.get(seq.seq_id)
        if acc is not None and acc[1] > 0:
            acc[1] -= 1
            return 0
        p = seq.params
        left = self.max_model_len - len(seq) - 1
        if p.max_tokens is not None:
            left = min(left, p.max_tokens - seq.num_output_tokens - 1)
        return max(0, min(self.config.num_speculative_tokens, left))

    # ---- after scheduling, before the forward ---------------------------------------------------
    def prepare(self, batch) -> None:
        prepare = getattr(self.proposer, "prepare", None)
        if prepare is not None:
            prepare(batch)

    # ---- after the forward ----------------------------------------------------------------------
    def verify(self, logits: np.ndarray, batch, eos_token_ids) -> list:
        """Per batch.spec_rows entry: the SampleResults it emits (accepted drafts, then one more)."""
        out = []
        for seq, row, n_spec in batch.spec_rows:
            drafts = seq.spec_token_ids[:n_spec]
            results, accepted = self.rejection.verify(logits[row:row + n_spec + 1], seq, drafts,
                                                      self._draft_probs(seq), eos_token_ids)
            self._count(seq, n_spec, accepted)
            verified = getattr(self.proposer, "verified", None)
            if verified is not None:
                verified(seq, len(seq), accepted, n_spec)
            out.append(results)
        return out

    def _draft_probs(self, seq):
        f = getattr(self.proposer, "draft_probs", None)
        return None if f is None else f(seq)

    def _count(self, seq, n_spec: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += n_spec
        self.num_accepted_tokens += accepted
        for i in range(accepted):
            self.num_accepted_per_pos[i] += 1
        floor = self.config.min_acceptance_rate
        if floor > 0.0:
            acc = self._acceptance.setdefault(seq.seq_id, [1.0, 0])
            acc[0] = (1 - _EMA) * acc[0] + _EMA * accepted / n_spec
            if acc[0] < floor:  # sit out a while, then try again from the floor
                acc[:] = [floor, 8]

    def stats(self) -> dict:
        return {"method": self.config.method, "num_speculative_tokens": self.config.num_speculative_tokens,
                "num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted_tokens,
                "acceptance_rate": self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0,
                "mean_acceptance_length": (1 + self.num_accepted_tokens / self.num_drafts) if self.num_drafts else 0.0,
                "num_accepted_tokens_per_pos": list(self.num_accepted_per_pos), "steps_off": self.num_steps_off}
