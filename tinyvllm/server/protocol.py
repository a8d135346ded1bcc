"""Request bodies of the OpenAI API (the fields tinyvllm honours) and their mapping to SamplingParams.
A field tinyvllm does not honour (logit_bias, functions, audio, a misspelt name...) fails validation
like a wrong type does: a 400 naming it (in api.py), never a 200 that silently ignored it. The one
exception is `user`, OpenAI's end-user id for abuse monitoring: it changes no output, so it is accepted."""
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..sampling_params import BeamSearchParams, SamplingParams, StructuredOutputsParams
from .tools import ToolCalling


class _Body(BaseModel):
    # strict: JSON types as the schema says them (lax mode read `false` as token id 0 and `0` as false)
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")  # "schema" would shadow BaseModel's
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def structured_outputs(self) -> StructuredOutputsParams | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.json_schema is None or self.json_schema.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        return StructuredOutputsParams(json=self.json_schema.json_schema)


class _Sampling(_Body):
    model: str | None = None
    user: str | None = None  # accepted, unused: see the module's docstring
    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None  # vLLM's extra body: StructuredOutputsParams' fields
    use_beam_search: bool = False  # vLLM's extra body: beam search, beam width n, the n best beams as choices
    length_penalty: float = 1.0    # vLLM's extra body, beam search only
    deadline_s: float | None = None  # extra body (SamplingParams.deadline_s): ends with what it has by then

    def constraint(self) -> StructuredOutputsParams | None:
        from_format = self.response_format.structured_outputs() if self.response_format else None
        if from_format is not None and self.structured_outputs is not None:
            raise ValueError("response_format and structured_outputs both constrain the output: give one")
        if self.structured_outputs is not None:
            return StructuredOutputsParams.from_dict(self.structured_outputs)
        return from_format

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None,
                        constraint: StructuredOutputsParams | None = None) -> SamplingParams:
        """SamplingParams validates every value; its ValueError becomes a 400."""
        if self.length_penalty != 1.0:
            raise ValueError("length_penalty is not supported without use_beam_search.")
        asked = self.constraint()
        if asked is not None and constraint is not None:
            raise ValueError("tool_choice already constrains the output: drop response_format / structured_outputs")
        return SamplingParams(structured_outputs=constraint or asked,
            n=self.n, best_of=self.best_of, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
            ignore_eos=self.ignore_eos, min_tokens=self.min_tokens, skip_special_tokens=self.skip_special_tokens,
            max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs, deadline_s=self.deadline_s)

    def beam_search_params(self, max_tokens: int) -> BeamSearchParams:
        """use_beam_search (vLLM's mapping: beam_width = n). A sampling field set to anything but its
        default would be ignored by a beam search: refused, naming it. temperature is 0 unless given."""
        for name in sorted(self.model_fields_set - _BEAM_SEARCH_FIELDS):
            if getattr(self, name) != type(self).model_fields[name].default:
                raise ValueError(f"{name} is not supported with use_beam_search (it takes n, max_tokens, "
                                 "length_penalty, ignore_eos).")
        if self.n < 1:
            raise ValueError(f"n must be at least 1 (the beam width), got {self.n}.")
        return BeamSearchParams(beam_width=self.n, max_tokens=max_tokens, ignore_eos=self.ignore_eos,
                                temperature=self.temperature if "temperature" in self.model_fields_set else 0.0,
                                length_penalty=self.length_penalty,
                                include_stop_str_in_output=self.include_stop_str_in_output)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


# what a beam-search request may set (the rest must keep its default)
_BEAM_SEARCH_FIELDS = {"model", "user", "n", "temperature", "ignore_eos", "length_penalty",
                       "include_stop_str_in_output", "stream", "stream_options", "use_beam_search", "prompt",
                       "max_tokens", "max_completion_tokens", "messages", "add_generation_prompt"}


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    prompt_logprobs: int | None = None  # vLLM's extra parameter: choices carry vLLM-shaped prompt logprobs
    suffix: None = None

    @property
    def scores_prompt_only(self) -> bool:
        """echo with max_tokens 0 (how lm-evaluation-harness scores a text): the prompt, nothing generated.
        One token is generated and dropped, as vLLM does."""
        return self.echo and self.max_tokens == 0

    def to_params(self) -> SamplingParams:
        if self.echo and self.stream:  # answered whole: refused rather than silently ignored
            raise ValueError("echo is not supported with stream.")
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs is not supported with stream.")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be at least 1, got 0 (0 needs echo).")
        # echo with logprobs scores the prompt too (OpenAI's legacy shape); vLLM's prompt_logprobs can ask more
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        if self.prompt_logprobs is not None:
            prompt_logprobs = max(prompt_logprobs or 0, self.prompt_logprobs) if prompt_logprobs is not None \
                else self.prompt_logprobs
        return self.sampling_params(1 if self.scores_prompt_only else self.max_tokens, self.logprobs,
                                    prompt_logprobs)


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # name, tool_calls...: passed on to the template
    role: str
    content: str | list[ContentPart] | None = None


class FunctionDefinition(_Body):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Body):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # None: until the context is full
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def tool_calling(self) -> ToolCalling | None:
        if not self.tools:
            if self.tool_choice not in (None, "none", "auto"):
                raise ValueError("tool_choice requires tools.")
            return None
        choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, NamedToolChoice) else self.tool_choice
        return ToolCalling([t.model_dump(exclude_none=True) for t in self.tools], choice, self.parallel_tool_calls)

    def to_params(self, tools: ToolCalling | None = None) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true.")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.sampling_params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None,
                                    constraint=tools.constraint() if tools else None)


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


# ---- responses: what the server sends, for its OpenAPI schema (the API property test holds it to them) ----
class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body: OpenAI's error shape."""
    error: ErrorBody


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape; with echo the prompt's first token has no score (None)."""
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(BaseModel):
    logprob: float
    rank: int | None
    decoded_token: str | None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None  # only when asked for


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None  # only when the answer is a tool call


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length", "tool_calls"] | None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str | None] | None


class DetokenizeResponse(BaseModel):
    prompt: str
