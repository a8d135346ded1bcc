"""StructuredOutputs: the engine's side of constrained decoding. It makes one llguidance matcher per
constrained sequence and, each step, the token bitmask of the constrained rows only, so free rows
batched with them pay nothing. The bitmask depends only on the tokens already consumed, so it is
computed on a worker thread while the forward pass runs (both release the GIL)."""
from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..sampling_params import StructuredOutputsParams
from ..tokenizer import Tokenizer
from .grammar import _INSTALL_HINT, _llguidance, compile_grammar
from .tokenizer import ll_tokenizer, ll_tokenizer_bytes, vocab_piece_bytes


def structured_outputs_enabled(enable: bool | None, memory_budget) -> bool:
    """An engine's enable_structured_outputs. None: on when llguidance is installed, except under a
    memory_budget, which would have to reserve their memory (35 MiB at 49K tokens, 164 MiB at 262K) from
    the KV cache of every engine: there they are asked for with True. True without llguidance is an
    ImportError (with the install hint) at engine start."""
    installed = importlib.util.find_spec("llguidance") is not None
    if enable and not installed:
        raise ImportError(_INSTALL_HINT)
    return installed and memory_budget is None if enable is None else bool(enable)


def structured_off_reason(enable: bool | None, memory_budget) -> str:
    """Why structured_outputs_enabled() said no, as a constrained request's error tells it."""
    if enable is False:
        return "the engine was started with enable_structured_outputs=False"
    if memory_budget is not None:
        return ("under a memory_budget they need enable_structured_outputs=True (--enable-structured-outputs), "
                "which reserves llguidance's tokenizer from the budget")
    return _INSTALL_HINT


class StructuredOutputs:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids, threads: int | None = None,
                 enabled: bool = True, off_reason: str = ""):
        self._tokenizer, self.vocab_size, self._eos = tokenizer, vocab_size, frozenset(eos_token_ids)
        self._threads, self.enabled, self._off_reason = threads, enabled, off_reason
        self._ll_tokenizer = self._executor = self._worker = None  # built on the first constrained request
        self._bitmask = np.empty((0, (vocab_size + 31) // 32), dtype=np.int32)

    @staticmethod
    def memory_bytes(tokenizer: Tokenizer, vocab_size: int, metadata: dict | None = None) -> int:
        """What the memory budget reserves for structured outputs (see ll_tokenizer_bytes)."""
        return ll_tokenizer_bytes(vocab_size, vocab_piece_bytes(tokenizer, vocab_size, metadata))

    @property
    def ll_tokenizer(self):
        if self._ll_tokenizer is None:
            self._ll_tokenizer = ll_tokenizer(self._tokenizer, self.vocab_size, self._eos)
        return self._ll_tokenizer

    def check_enabled(self) -> None:
        """ValueError (a 400) when this engine takes no constrained requests, e.g. their memory was not
        reserved from its budget."""
        if not self.enabled:
            raise ValueError(f"structured outputs are off in this engine: {self._off_reason}")

    def matchers(self, params: StructuredOutputsParams, n: int) -> list:
        """n fresh matchers for one request's completions (ValueError when the constraint is invalid)."""
        self.check_enabled()
        ll = _llguidance()
        grammar = compile_grammar(params)
        first = ll.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if first.is_error():
            raise ValueError(f"invalid structured_outputs.{params.kind}: {first.get_error()}")
        return [first] + [first.deep_copy() for _ in range(n - 1)]

    def start_bitmask(self, seqs):
        """Start token_bitmask(seqs) on the worker thread; returns a function that waits for it. The
        matchers must not change until it has returned (the engine consumes tokens after sampling)."""
        if all(s.matcher is None for s in seqs):
            return lambda: None
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="tinyvllm-bitmask")
        return self._worker.submit(self.token_bitmask, list(seqs)).result

    def token_bitmask(self, seqs) -> tuple[list[int], np.ndarray] | None:
        """(rows of `seqs` that are constrained, int32 [len(rows), ceil(V/32)] bitmasks: bit t of a row
        set when token t may come next), or None when no sequence is constrained."""
        rows = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if not rows:
            return None
        if self._bitmask.shape[0] < len(rows):
            self._bitmask = np.empty((len(rows), self._bitmask.shape[1]), dtype=np.int32)
        mask = self._bitmask[:len(rows)]
        if len(rows) == 1:
            seqs[rows[0]].matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        else:
            if self._executor is None:
                self._executor = _llguidance().LLExecutor(num_threads=self._threads)
            self._executor.unsafe_compute_mask_ptr([(seqs[i].matcher, k) for k, i in enumerate(rows)],
                                                   mask.ctypes.data, mask.shape[1] * 4, len(rows))
        return rows, mask
