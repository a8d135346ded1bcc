"""What a request returns, shaped like vLLM's RequestOutput / CompletionOutput."""
from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_output_tokens: int = 0
    itl: list[float] = field(default_factory=list, repr=False)  # gaps between consecutive tokens (s)

    def on_token(self, now: float) -> None:
        if self.first_token_time is None:
            self.first_token_time = now
        else:
            self.itl.append(now - self.last_token_time)
        self.last_token_time = now
        self.num_output_tokens += 1

    @property
    def ttft(self) -> float | None:
        """Time to first token (s)."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (s)."""
        return sum(self.itl) / len(self.itl) if self.itl else None

    @property
    def e2e(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass
class Logprob:
    """One scored token, as vLLM reports it: its log-probability under the raw model logits, its rank
    in the vocabulary (1 = the most likely; ties share the better rank) and its text."""
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Prompt logprobs of a request: None for position 0 (nothing predicts it), then per prompt position
# {token_id: Logprob} holding the actual prompt token and the top-k alternatives (vLLM's shape).
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None  # per generated token: {token_id: logprob}
    # "stop" | "length" | "abort" | "deadline" (SamplingParams.deadline_s passed) | None while running
    finish_reason: str | None = None
    stop_reason: int | str | None = None             # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    prompt_logprobs: PromptLogprobs | None = field(default=None, repr=False)
