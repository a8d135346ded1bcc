"""SamplingParams: vLLM-shaped request sampling options, validated at construction."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any

_SAMPLING_EPS = 1e-5  # temperatures below this are greedy (same threshold as vLLM)
_MAX_LOGPROBS = 20


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


class SamplingType(IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


@dataclass
class StructuredOutputsParams:
    """One constraint on a completion (vLLM's shape): a JSON schema (dict or text), any JSON object, a
    regex, one of a list of strings, or a Lark/GBNF grammar, compiled by llguidance when the request is
    added (ValueError if it refuses). JSON is compact (", " and ": " only: a small model would otherwise
    spend tokens on whitespace) unless `whitespace_pattern` allows more; disable_any_whitespace is
    accepted for vLLM compatibility (tinyvllm does that anyway)."""
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    _KINDS = ("json", "regex", "choice", "grammar", "json_object")

    def __post_init__(self):
        given = [k for k in self._KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("You must use one kind of structured outputs constraint but none are specified"
                             if not given else "You can only use one kind of structured outputs constraint "
                             f"but multiple are specified: {', '.join(given)}")
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice or not all(
                    isinstance(c, str) for c in self.choice):
                raise ValueError("structured_outputs.choice must be a non-empty list of strings")
            self.choice = list(self.choice)

    @property
    def kind(self) -> str:
        return next(k for k in self._KINDS if getattr(self, k) not in (None, False))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StructuredOutputsParams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"structured_outputs has unknown fields: {', '.join(unknown)}")
        return cls(**d)


@dataclass
class SamplingParams:
    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled (vLLM accepts both)
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: until the context is full
    min_tokens: int = 0
    logprobs: int | None = None  # top alternatives to return besides the chosen token
    # top alternatives to return at every prompt position besides the prompt's own token. Such a
    # request skips the prefix cache (as vLLM does): positions served from it would have no logits.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # Not in vLLM: seconds from submission after which the request ends with what it has generated
    # (finish_reason "deadline") and its KV blocks are freed; met within one engine step of its time.
    deadline_s: float | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self):
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        self.stop = [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        self._verify()
        if self.greedy:  # sampling knobs are meaningless when greedy; reset them like vLLM does
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    def _verify(self):
        _need(isinstance(self.n, int) and self.n >= 1, f"n must be at least 1, got {self.n}.")
        _need(self.best_of is None or self.best_of == self.n,
              f"best_of is not supported (must be None or equal to n={self.n}), got {self.best_of}.")
        _need(-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        _need(-2.0 <= self.frequency_penalty <= 2.0,
              f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        _need(self.repetition_penalty > 0.0, f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.")
        _need(self.temperature >= 0.0, f"temperature must be non-negative, got {self.temperature}.")
        _need(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}.")
        _need(isinstance(self.top_k, int) and self.top_k >= -1,
              f"top_k must be -1 (disable), 0 (disable) or at least 1, got {self.top_k}.")
        _need(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}.")
        _need(self.seed is None or isinstance(self.seed, int), f"seed must be an int or None, got {self.seed!r}.")
        _need(self.max_tokens is None or self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}.")
        _need(self.min_tokens >= 0, f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        _need(self.max_tokens is None or self.min_tokens <= self.max_tokens,
              f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}.")
        _need(self.logprobs is None or 0 <= self.logprobs <= _MAX_LOGPROBS,
              f"logprobs must be in [0, {_MAX_LOGPROBS}], got {self.logprobs}.")
        _need(self.prompt_logprobs is None or (isinstance(self.prompt_logprobs, int) and
                                              0 <= self.prompt_logprobs <= _MAX_LOGPROBS),
              f"prompt_logprobs must be in [0, {_MAX_LOGPROBS}], got {self.prompt_logprobs}.")
        _need(self.deadline_s is None or (isinstance(self.deadline_s, (int, float)) and 0 < self.deadline_s < math.inf),
              f"deadline_s must be a positive, finite number of seconds or None, got {self.deadline_s!r}.")
        _need(all(isinstance(s, str) and s for s in self.stop), "stop cannot contain an empty string.")
        _need(all(t >= 0 for t in self.stop_token_ids), f"stop_token_ids must be non-negative, got {self.stop_token_ids}.")
        # n identical greedy completions are pointless; vLLM rejects them too
        _need(not (self.temperature < _SAMPLING_EPS and self.n > 1), f"n must be 1 when using greedy sampling, got {self.n}.")

    @property
    def greedy(self) -> bool:
        return self.temperature < _SAMPLING_EPS

    @property
    def sampling_type(self) -> SamplingType:
        if self.greedy:
            return SamplingType.GREEDY
        return SamplingType.RANDOM if self.seed is None else SamplingType.RANDOM_SEED

    def clone(self) -> SamplingParams:
        return copy.deepcopy(self)


@dataclass
class BeamSearchParams:
    """LLM.beam_search's options (vLLM's shape). Each step every live beam proposes its 2 * beam_width
    likeliest next tokens; candidates ending in EOS (unless ignore_eos) are set aside as finished, and
    the beam_width best of the rest live on. After max_tokens steps the beam_width best of the finished
    and live beams are returned, ranked by cum_logprob / len(tokens) ** length_penalty (tokens count the
    prompt, and not a final EOS). temperature > 0 (vLLM's semantics: its beam search samples each beam's
    next token at that temperature and asks for 2 * beam_width logprobs): the sampled token joins each
    beam's candidates, so the search may explore one token beyond the likeliest; 0 is deterministic.
    include_stop_str_in_output is accepted for vLLM compatibility; beam search has no stop strings."""
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        integer = lambda v: isinstance(v, int) and not isinstance(v, bool)
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
        _need(integer(self.beam_width) and self.beam_width >= 1, f"beam_width must be at least 1, got {self.beam_width!r}.")
        _need(integer(self.max_tokens) and self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens!r}.")
        _need(number(self.temperature) and 0 <= self.temperature < math.inf,
              f"temperature must be a non-negative number, got {self.temperature!r}.")
        _need(number(self.length_penalty) and math.isfinite(self.length_penalty),
              f"length_penalty must be a finite number, got {self.length_penalty!r}.")
