"""One completion being generated: the one owner of its token ids, its text and why it stopped."""
from enum import Enum, auto

import numpy as np

from ..sampler import make_generator


_NO_DRAFTS = np.empty(0, dtype=np.int32)


class SequenceStatus(Enum):
    WAITING = auto()   # not admitted yet, or preempted: no KV blocks, recomputed from scratch
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Token ids live in a growable int32 buffer: the native block manager borrows it (prefix-cache
    keys), the sampler reads views of it (penalties), nothing else keeps a copy."""

    def __init__(self, seq_id: int, request_id: str, index: int, prompt_token_ids, params, detokenizer,
                 arrival_time: float, matcher=None):
        self.seq_id, self.request_id, self.index = seq_id, request_id, index
        self.num_prompt_tokens = self.num_tokens = len(prompt_token_ids)
        self._set_buffer(np.empty(self.num_tokens + min(params.max_tokens or 64, 256), dtype=np.int32))
        self._buf[:self.num_tokens] = prompt_token_ids
        self.num_computed_tokens = 0          # leading tokens whose K/V are in the cache (the scheduler's count)
        self.status = SequenceStatus.WAITING
        self.params, self.detokenizer, self.arrival_time = params, detokenizer, arrival_time
        self.generator = make_generator(params, index)  # None: the sampler's shared rng
        self.matcher = matcher  # structured outputs: an llguidance matcher fed every sampled token
        self.seats = 1  # sequence slots its request holds while it runs (a beam search: its width)
        # speculative decoding: draft tokens proposed for the positions after the last one (set before
        # each step by the speculative decoder, verified by the step that runs them; never part of len)
        self.spec_token_ids = _NO_DRAFTS
        self.text = ""
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        # prompt logprobs belong to the request: its first sequence scores the prompt as it prefills
        self.prompt_logprobs: list | None = [None] if params.prompt_logprobs is not None and index == 0 else None
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    def _set_buffer(self, buf: np.ndarray) -> None:
        self._buf, self.tokens_address = buf, buf.ctypes.data  # the address goes to the block manager

    def __len__(self) -> int:
        return self.num_tokens

    @property
    def token_ids(self) -> np.ndarray:
        return self._buf[:self.num_tokens]

    @property
    def prompt_token_ids(self) -> np.ndarray:
        return self._buf[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> np.ndarray:
        return self._buf[self.num_prompt_tokens:self.num_tokens]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def needs_prompt_logprobs(self) -> bool:
        """True until every prompt position is scored: each prefill chunk then needs logits at every
        position, so the prompt must run in full (no prefix-cache hits)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    def append_token(self, result, eos_token_ids, max_model_len: int) -> bool:
        """Add one sampled token (a SampleResult); True when the sequence should stop here
        (finish_reason and stop_reason then say why)."""
        token = int(result.token_id)
        if self.num_tokens == len(self._buf):
            grown = np.empty(2 * len(self._buf), dtype=np.int32)
            grown[:self.num_tokens] = self._buf[:self.num_tokens]
            self._set_buffer(grown)
        self._buf[self.num_tokens] = token
        self.num_tokens += 1
        self.cumulative_logprob += float(result.logprob)
        if self.logprobs is not None:
            self.logprobs.append(result.top_logprobs or {token: float(result.logprob)})
        self.text += self.detokenizer.add(token)
        reason = self._grammar_stop(token) or self._stop_reason(token, eos_token_ids, max_model_len)
        if reason is not None:
            self.finish_reason, self.stop_reason = reason
        return reason is not None

    def _grammar_stop(self, token: int):
        """A constrained sequence stops once its grammar is complete (only EOS could follow), without a
        step to sample that EOS. The mask lets only grammar tokens through, so a refused token means
        the library and tokenizer disagree: the sequence is cut off rather than left unconstrained."""
        if self.matcher is None:
            return None
        if not self.matcher.consume_token(token):
            return "abort", f"structured outputs: {self.matcher.get_error()}"
        return ("stop", None) if self.matcher.is_stopped() else None

    def _stop_reason(self, token: int, eos_token_ids, max_model_len: int):
        p, n_out = self.params, self.num_output_tokens
        if n_out >= p.min_tokens:
            if token in eos_token_ids and not p.ignore_eos:
                return "stop", None
            if token in p.stop_token_ids:
                return "stop", token
            if p.stop:
                # Only the tail can hold a new match: the new token added at most len(delta) chars.
                window = max(0, len(self.text) - max(map(len, p.stop)) - 64)
                hits = [(i, s) for s in p.stop if (i := self.text.find(s, window)) >= 0]
                if hits:
                    i, s = min(hits)
                    self.text = self.text[:i + len(s) if p.include_stop_str_in_output else i]
                    return "stop", s
        if (p.max_tokens is not None and n_out >= p.max_tokens) or self.num_tokens >= max_model_len:
            return "length", None
        return None

    def visible_text(self) -> str:
        """The text so far, less what may still turn out to start a stop string."""
        if self.is_finished or not self.params.stop:
            return self.text
        return self.text[:max(0, len(self.text) - max(map(len, self.params.stop)) + 1)]
