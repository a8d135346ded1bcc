"""LLM: the offline entry point (vLLM's shape): generate, chat and stream over an LLMEngine."""
from collections.abc import Iterator

from .beam_search import BeamSearchOutput, BeamSearchSequence
from .engine import LLMEngine
from .model.fetch import DEFAULT_MODEL
from .outputs import RequestOutput
from .sampling_params import BeamSearchParams, SamplingParams


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, *, threads: int | None = None, device: str = "cpu",
                 quantization: str | None = None, memory_budget=None, enable_prefix_caching: bool = True,
                 **engine_args):
        self.engine = LLMEngine(model, threads=threads, device=device, quantization=quantization,
                                memory_budget=memory_budget, enable_prefix_caching=enable_prefix_caching,
                                **engine_args)
        self.tokenizer = self.engine.tokenizer

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion, batched together; outputs come back in prompt order."""
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        return self._run(prompts, params, len(prompts))

    def beam_search(self, prompts, params: BeamSearchParams,
                    concurrency_limit: int | None = None) -> list[BeamSearchOutput]:
        """Beam search (vLLM's shape): per prompt, a BeamSearchOutput with the beam_width best sequences,
        best first; at most concurrency_limit prompts run at once. Each prompt is one engine request
        (BeamSearchParams), batched with whatever else the engine runs; the beams share KV blocks through
        native forks (tinyvllm/beam_search.py)."""
        if not isinstance(params, BeamSearchParams):
            raise TypeError("params must be a BeamSearchParams")
        if concurrency_limit is not None and not (isinstance(concurrency_limit, int) and concurrency_limit >= 1):
            raise ValueError(f"concurrency_limit must be a positive integer or None, got {concurrency_limit!r}")
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        outs = self._run(prompts, [params] * len(prompts), concurrency_limit or len(prompts))
        return [self._beams(out) for out in outs]

    def _run(self, prompts: list, params: list, limit: int) -> list[RequestOutput]:
        """Step the engine until every prompt's request has finished, at most `limit` of them in flight;
        outputs in prompt order. With limit = len(prompts) all are added before the first step, so one
        refused prompt leaves none of the batch queued."""
        ids: list[str] = []
        done: dict[str, RequestOutput] = {}
        try:
            while len(done) < len(prompts):
                while len(ids) < len(prompts) and len(ids) - len(done) < limit:
                    ids.append(self.engine.add_request(None, prompts[len(ids)], params[len(ids)]))
                wanted = set(ids)  # the engine may run others' requests too (an unfinished stream())
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
        except BaseException:
            for rid in ids:  # refused or interrupted: free the blocks of whatever is still queued or running
                self.engine.abort(rid)
            raise
        return [done[rid] for rid in ids]

    def _beams(self, out: RequestOutput) -> BeamSearchOutput:
        seqs = []
        for c in out.outputs:
            tokens = list(out.prompt_token_ids) + list(c.token_ids)
            seqs.append(BeamSearchSequence(tokens, c.logprobs, c.cumulative_logprob,
                                           self.tokenizer.decode(tokens, skip_special_tokens=False),
                                           c.finish_reason, c.stop_reason))
        return BeamSearchOutput(seqs)

    def chat(self, messages, sampling_params: SamplingParams | None = None, *,
             add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """messages: one conversation (a list of {role, content}) or a list of conversations."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self._chat_prompt(c, add_generation_prompt, chat_template_kwargs) for c in convs]
        return self.generate(prompts, sampling_params)

    def _chat_prompt(self, conversation, add_generation_prompt=True, kwargs=None) -> dict:
        text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                  **(kwargs or {}))
        # The template already wrote any BOS it wants: don't let encode() add a second one.
        return {"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}

    def stream(self, prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """The text of one completion, piece by piece as it is generated (the pieces concatenate to the
        full text). One completion only: n > 1 raises ValueError (generate() returns them all)."""
        if sampling_params is not None and sampling_params.n > 1:  # raised now, not at the first next()
            raise ValueError(f"stream() yields one completion; n={sampling_params.n} needs generate()")
        return self._stream(prompt, sampling_params)

    def _stream(self, prompt, sampling_params) -> Iterator[str]:
        rid = self.engine.add_request(None, prompt, sampling_params)
        sent = 0
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        text = out.outputs[0].text
                        if len(text) > sent:
                            yield text[sent:]
                            sent = len(text)
                        if out.finished:
                            return
        finally:
            self.engine.abort(rid)  # no-op when finished; frees blocks if the consumer stopped early

    def stream_chat(self, messages, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        return self.stream(self._chat_prompt(messages), sampling_params)
