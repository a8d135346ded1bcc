"""One sequence being generated: its tokens, how many of them have KV in the cache, its blocks."""
from enum import Enum, auto


class SequenceStatus(Enum):
    WAITING = auto()   # not admitted yet, or preempted: no KV blocks, recomputed from scratch
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    def __init__(self, seq_id: int, request_id: str, index: int, prompt_token_ids: list[int], params,
                 sampling_state, detokenizer, arrival_time: float):
        self.seq_id, self.request_id, self.index = seq_id, request_id, index
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0          # tokens whose K/V are in the cache
        self.num_slots = 0                    # tokens with a KV slot in the block manager
        self.block_table = []                 # physical block ids (an int32 array from the manager)
        self.status = SequenceStatus.WAITING
        self.awaiting_fork = False            # n > 1: joins when the request's first sequence has prefilled
        self.params, self.sampling_state, self.detokenizer = params, sampling_state, detokenizer
        self.arrival_time = arrival_time
        self.text = ""
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens
