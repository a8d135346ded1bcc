"""build_app: the FastAPI app of the OpenAI-compatible server, over one AsyncLLM.

Every error leaves as OpenAI's shape {"error": {"message", "type", "param", "code"}}: bad fields 400
(FastAPI's 422 included; a field the server does not honour too), wrong API key 401, unknown model 404,
request body over max_request_bytes 413, full waiting queue 429.

Resource limits, checked before anything costly (parsing, tokenizing, the engine): the body's size in
bytes (max_request_bytes), the prompt's size in characters before it is tokenized (max_prompt_chars),
n against the engine's max_num_seqs, max_tokens against the context (a 400, not a clamp, like vLLM),
logprobs within SamplingParams' bounds. Outputs reach each request through its own queue, so a client
that reads slowly (or not at all) never holds up the engine thread."""
import asyncio
import json
import secrets
import time
import uuid
from contextlib import aclosing, asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..async_llm import AsyncLLM
from ..chat_template import select_template
from ..engine import LLMEngine
from ..sampling_params import BeamSearchParams
from ..structured import compile_grammar
from .metrics import ServerMetrics
from .protocol import (ChatCompletionRequest, ChatCompletionResponse, ChatMessage, CompletionRequest,
                       CompletionResponse, DetokenizeRequest, DetokenizeResponse, ErrorResponse, ModelList,
                       TokenizeRequest, TokenizeResponse)
from .tools import template_uses_tools

_FIELDS = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)
# finish reasons OpenAI's schema lacks: a request cut by its deadline_s ended at a limit, as at max_tokens
_OPENAI_FINISH = {"deadline": "length"}
_OPEN_PATHS = {"/health", "/metrics"}  # monitoring stays reachable without the API key
DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20
# A prompt longer than this many characters per token of context is refused before it is tokenized:
# BPE tokens of real text average 3-5 characters, so a prompt that long could not fit the context anyway.
PROMPT_CHARS_PER_TOKEN = 32
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks its client is still there


# One server-sent event of a stream: a JSON chunk, an in-band error after the status line went out, or [DONE].
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
    {"const": "[DONE]"},
    {"type": "string", "contentMediaType": "application/json", "contentSchema": {"type": "object", "oneOf": [
        {"required": ["id", "object", "created", "model", "choices"],
         "properties": {"object": {"enum": ["text_completion", "chat.completion.chunk"]},
                        "choices": {"type": "array", "items": {"type": "object", "required": ["index"]}}}},
        {"required": ["error"], "properties": {"error": {"type": "object", "required": ["message", "type"]}}}]}}]}}}


def _responses(ok, *, errors=(400, 404, 413), stream=False, auth=False) -> dict:
    """The `responses` of a route's OpenAPI entry: its 200 body (`ok`, a model; with `stream`,
    text/event-stream too) and the error statuses it can answer."""
    out = {200: {"model": ok}}
    if stream:
        out[200]["content"] = {"text/event-stream": {"schema": _SSE_EVENT}}
    for status in (*errors, *((401,) if auth else ())):
        out[status] = {"model": ErrorResponse}
    return out


def _without_validation_errors(schema: dict) -> dict:
    """FastAPI documents a 422 for every route with a body; this server answers those cases 400."""
    for path in schema.get("paths", {}).values():
        for op in path.values():
            op.get("responses", {}).pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(name, None)
    return schema


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


class _APIKeyCheck:
    """Pure ASGI middleware (runs before the body is parsed): `Authorization: Bearer <key>`."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in _OPEN_PATHS:
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(got, self.expected):
                err = APIError(401, "Incorrect or missing API key (send 'Authorization: Bearer <key>').",
                               "authentication_error", code="invalid_api_key")
                return await err.response()(scope, receive, send)
        await self.app(scope, receive, send)


class _BodySizeLimit:
    """Pure ASGI middleware: a request body over `limit` bytes gets a 413 before it is read whole, from
    its Content-Length when it has one, else as soon as the chunks received pass the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def _error(self):
        return APIError(413, f"The request body is larger than this server's limit of {self.limit} bytes "
                        "(see --max-request-bytes).", code="request_too_large").response()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._error()(scope, receive, send)
        received, refused = 0, False

        async def counted_receive():
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:  # answer now; the app sees a client that went away
                    refused = True
                    await self._error()(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not refused:  # after the 413 whatever the app says goes nowhere
                await send(message)
        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:  # the app's complaint that its client left: the 413 already went out
            if not refused:
                raise


def _conversation(messages: list[ChatMessage]) -> list[dict]:
    """Messages as plain dicts for the chat template; text content parts are joined."""
    out = []
    for m in messages:
        d = m.model_dump(exclude_none=True)
        d["content"] = "".join(p.text for p in m.content) if isinstance(m.content, list) else (m.content or "")
        out.append(d)
    return out


def build_app(engine: LLMEngine | AsyncLLM, served_model_name: str, *, api_key: str | None = None,
              max_waiting: int = 256, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
              max_prompt_chars: int | None = None) -> FastAPI:
    """An app serving `engine`. Given an LLMEngine, the app owns an AsyncLLM over it (started and
    stopped with the app); given an AsyncLLM, several apps may share it and it is only started.
    max_prompt_chars defaults to PROMPT_CHARS_PER_TOKEN characters per token of max_model_len."""
    owned = isinstance(engine, LLMEngine)
    aeng = AsyncLLM.from_engine(engine, start=False) if owned else engine
    tok, max_len, vocab = aeng.engine.tokenizer, aeng.engine.max_model_len, aeng.engine.config.vocab_size
    metrics = ServerMetrics(aeng, served_model_name)
    max_seqs = aeng.engine.scheduler.max_num_seqs
    max_chars = max_prompt_chars if max_prompt_chars is not None else PROMPT_CHARS_PER_TOKEN * max_len

    @asynccontextmanager
    async def lifespan(app):
        aeng.start()
        yield
        if owned:  # by now uvicorn has let in-flight requests finish (or cancelled them: aborted)
            aeng.shutdown()

    app = FastAPI(title="tinyvllm", lifespan=lifespan)
    app.state.async_llm, app.state.metrics = aeng, metrics
    fastapi_openapi = app.openapi
    app.openapi = lambda: app.openapi_schema or _without_validation_errors(fastapi_openapi())
    auth = api_key is not None
    generation = dict(errors=(400, 404, 413, 429, 503), stream=True, auth=auth)
    app.add_middleware(_BodySizeLimit, limit=max_request_bytes)
    if api_key is not None:  # added last: runs first, so a stranger's body is never read
        app.add_middleware(_APIKeyCheck, api_key=api_key)

    # ---- errors ------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        errs = e.errors()
        extra = [err for err in errs if err.get("type") == "extra_forbidden"]
        if extra:  # fields we would otherwise silently ignore: all of them named
            fields = [".".join(str(x) for x in err["loc"][1:]) for err in extra]
            return APIError(400, f"{', '.join(fields)} {'is' if len(fields) == 1 else 'are'} not supported by this "
                            "server.", param=str(extra[0]["loc"][1]), code="unsupported_field").response()
        locs = [".".join(str(x) for x in err.get("loc", ()) if x != "body") for err in errs]
        msg = "; ".join(f"{loc}: {err['msg']}" if loc else err["msg"] for loc, err in zip(locs, errs[:3]))
        if errs and errs[0].get("type") == "json_invalid":
            msg, locs = f"Invalid JSON body: {errs[0].get('ctx', {}).get('error', msg)}", [None]
        param = str(errs[0]["loc"][1]) if errs and len(errs[0].get("loc", ())) > 1 and locs[0] else None
        return APIError(400, msg or "invalid request", param=param).response()

    @app.exception_handler(ValueError)  # SamplingParams and the chat template say what is wrong
    async def _bad_value(_, e: ValueError):
        word = str(e).split(" ", 1)[0]
        return APIError(400, str(e), param=word if word in _FIELDS else None).response()

    @app.exception_handler(HTTPException)
    async def _http(_, e: HTTPException):
        response = APIError(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else
                            "invalid_request_error").response()
        response.headers.update(e.headers or {})  # a 405's Allow (RFC 9110 requires it)
        return response

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        return APIError(500, f"internal error: {e!r}", "internal_error").response()

    # ---- checks ------------------------------------------------------------------------------
    def check_model(name: str | None) -> None:
        if name is not None and name != served_model_name:
            raise APIError(404, f"The model `{name}` does not exist.", "not_found_error", "model", "model_not_found")

    def check_prompt(ids: list[int], max_tokens: int | None, field: str = "prompt") -> None:
        if not ids:
            raise APIError(400, "The prompt is empty.", param=field)
        if min(ids) < 0 or max(ids) >= vocab:
            raise APIError(400, f"Prompt token ids must be in [0, {vocab}).", param=field)
        want = len(ids) + (max_tokens or 1)
        if want > max_len:
            raise APIError(400, f"This model's maximum context length is {max_len} tokens. However, you requested "
                           f"{want} tokens ({len(ids)} in the prompt, {max_tokens or 1} for the completion).",
                           param="max_tokens" if len(ids) < max_len else field, code="context_length_exceeded")

    def check_prompt_chars(num_chars: int, field: str) -> None:
        """Before tokenizing: a huge text costs seconds of tokenizer time just to be refused."""
        if num_chars > max_chars:
            raise APIError(400, f"The prompt has {num_chars} characters; this server takes at most {max_chars} "
                           "(see --max-prompt-chars).", param=field, code="context_length_exceeded")

    def check_capacity(params) -> None:
        """What the engine can hold, before admitting: its sequences (a beam search's beams) run together,
        so n > max_num_seqs could never be scheduled."""
        if choices_per_prompt(params) > max_seqs:
            raise APIError(400, f"n={choices_per_prompt(params)} is more than this server's max_num_seqs "
                           f"({max_seqs}).", param="n")

    def check_kv(num_prompt_tokens: int, params) -> None:
        """A beam search whose beams could never all fit the KV cache: 400 now, not an error mid-stream."""
        if isinstance(params, BeamSearchParams):
            try:
                aeng.engine.check_beam_search(num_prompt_tokens, params)
            except ValueError as e:
                raise APIError(400, str(e), param="n") from e

    def check_constraint(params) -> None:
        if params.structured_outputs is not None:  # a schema llguidance rejects: 400 now, not mid-stream
            aeng.engine.structured.check_enabled()
            compile_grammar(params.structured_outputs)

    def admit(num_prompts: int) -> None:
        if not aeng.alive:
            raise APIError(503, "The engine is not running.", "service_unavailable")
        if aeng.num_waiting + num_prompts > max_waiting:
            raise APIError(429, f"The server is busy: {aeng.num_waiting} requests are already waiting "
                           f"(at most {max_waiting}). Retry later.", "rate_limit_exceeded")

    # ---- generation --------------------------------------------------------------------------
    def choices_per_prompt(params) -> int:
        return params.beam_width if isinstance(params, BeamSearchParams) else params.n

    def token_str(t: int) -> str:
        return tok.decode([t], skip_special_tokens=False)

    def logprobs_json(chat: bool, toks: list[int], lps: list[dict], top: int, offset: int):
        if chat:
            def entry(t, lp):
                s = token_str(t)
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}
            return {"content": [{**entry(t, d[t]), "top_logprobs": [entry(a, lp) for a, lp in sorted(
                d.items(), key=lambda kv: -kv[1])[:top]]} for t, d in zip(toks, lps)]}
        strs = [token_str(t) for t in toks]
        offsets = [offset + sum(map(len, strs[:i])) for i in range(len(strs))]
        return {"tokens": strs, "token_logprobs": [d[t] for t, d in zip(toks, lps)],
                "top_logprobs": [{token_str(a): lp for a, lp in d.items()} for d in lps], "text_offset": offsets}

    def prompt_logprobs_json(plp) -> list:
        """vLLM's shape: None for position 0, then {token id: {logprob, rank, decoded_token}}."""
        return [None if d is None else {str(t): {"logprob": lp.logprob, "rank": lp.rank,
                                                 "decoded_token": lp.decoded_token} for t, lp in d.items()}
                for d in plp]

    def echo_logprobs_json(prompt_ids: list[int], plp, top: int) -> dict:
        """The prompt's part of OpenAI's legacy logprobs when echo is on: nothing scores the first token."""
        strs = [token_str(t) for t in prompt_ids]
        return {"tokens": strs, "token_logprobs": [None] + [d[t].logprob for t, d in zip(prompt_ids[1:], plp[1:])],
                "top_logprobs": [None] + [{token_str(a): lp.logprob for a, lp in d.items() if a == t or lp.rank <= top}
                                          for t, d in zip(prompt_ids[1:], plp[1:])],
                "text_offset": [sum(map(len, strs[:i])) for i in range(len(strs))]}

    async def deltas(outputs, n: int, usage: dict, prompt_outputs: dict | None = None):
        """Per choice update: (choice index, new text, new token ids, new logprobs, finish, stop_reason).
        prompt_outputs, when given, gets each prompt's finished RequestOutput (echo, prompt logprobs)."""
        sent = {}  # choice index -> [chars sent, tokens sent, finished]
        async with aclosing(outputs):
            async for k, out in outputs:
                if out.finished and prompt_outputs is not None:
                    prompt_outputs[k] = out
                for c in out.outputs:
                    chars, ntok, done = sent.setdefault(k * n + c.index, [0, 0, False])
                    if done:
                        continue
                    text, toks = c.text[chars:], c.token_ids[ntok:]
                    sent[k * n + c.index] = [max(chars, len(c.text)), len(c.token_ids), c.finish_reason is not None]
                    if text or toks or c.finish_reason:
                        yield (k * n + c.index, text, toks, c.logprobs[ntok:] if c.logprobs is not None else None,
                               _OPENAI_FINISH.get(c.finish_reason, c.finish_reason), c.stop_reason)
                if out.finished:
                    metrics.on_finished(out)
                    usage["completion_tokens"] = usage.get("completion_tokens", 0) + sum(
                        len(c.token_ids) for c in out.outputs)
        usage["total_tokens"] = usage["prompt_tokens"] + usage.setdefault("completion_tokens", 0)

    def message(text: str, finish, tools):
        """A chat answer's message and finish_reason: with tools, a tool call becomes tool_calls."""
        content, calls = tools.parse(text) if tools is not None and finish != "length" else (text, [])
        msg = {"role": "assistant", "content": content}
        if calls:
            msg["tool_calls"], finish = calls, "tool_calls"
        return msg, finish

    async def respond(body, prompts: list[dict], params, chat: bool, request: Request, tools=None):
        """params: SamplingParams, or BeamSearchParams (use_beam_search: the n best beams of each prompt
        are its choices, all sent when the search ends, streamed or not)."""
        admit(len(prompts))
        n = choices_per_prompt(params)
        logprobs = None if isinstance(params, BeamSearchParams) else params.logprobs
        try:
            outputs = aeng.generate_batch(prompts, params)  # queued now: the next admit() counts these
        except RuntimeError as e:  # shutting down, or the engine thread died
            raise APIError(503, str(e), "service_unavailable") from e
        usage = {"prompt_tokens": sum(len(p["prompt_token_ids"]) for p in prompts)}
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": served_model_name}
        top = (body.top_logprobs or 0) if chat else (body.logprobs or 0)
        if body.stream:
            return StreamingResponse(sse(body, outputs, len(prompts), n, logprobs, chat, head, top, usage, tools),
                                     media_type="text/event-stream")
        choices = {}  # choice index -> [text, token ids, logprobs, finish, stop_reason]
        finished = {}  # prompt index -> its final RequestOutput

        async def collect() -> bool:
            async with aclosing(deltas(outputs, n, usage, finished)) as updates:
                async for i, text, toks, lps, finish, stop in updates:
                    ch = choices.setdefault(i, ["", [], [], None, None])
                    ch[0] += text
                    ch[1] += toks
                    ch[2] += lps or []
                    ch[3], ch[4] = finish, stop
                    if await request.is_disconnected():
                        return False
            return True
        # A client that hangs up is noticed at its next update, or within DISCONNECT_POLL_S where updates
        # are rare (a beam search has none until it ends): nobody will read the answer, so stop generating
        # (cancelling the collection aborts the requests and frees their blocks).
        collecting = asyncio.ensure_future(collect())
        try:
            while not (await asyncio.wait({collecting}, timeout=DISCONNECT_POLL_S))[0]:
                if await request.is_disconnected():
                    break
        except BaseException:  # this handler was cancelled (shutdown): the requests go too
            collecting.cancel()
            raise
        if not collecting.done():  # the client left
            collecting.cancel()
            await asyncio.wait({collecting})
            return Response(status_code=499)
        if not collecting.result():
            return Response(status_code=499)
        echo = not chat and body.echo
        if echo and body.scores_prompt_only:  # the one token generated to get there is dropped
            choices = {i: ["", [], [], finish, stop] for i, (_, _, _, finish, stop) in choices.items()}
            usage["completion_tokens"], usage["total_tokens"] = 0, usage["prompt_tokens"]
        out = []
        for i, (text, toks, lps, finish, stop) in sorted(choices.items()):
            request_out = finished[i // n]
            lp = logprobs_json(chat, toks, lps, top, 0) if logprobs is not None else None
            if echo:
                prompt_text = request_out.prompt if request_out.prompt is not None else \
                    tok.decode(request_out.prompt_token_ids, skip_special_tokens=False)
                if lp is not None:
                    head_lp = echo_logprobs_json(request_out.prompt_token_ids, request_out.prompt_logprobs, top)
                    shift = sum(map(len, head_lp["tokens"]))
                    lp = {key: head_lp[key] + ([o + shift for o in lp[key]] if key == "text_offset" else lp[key])
                          for key in lp}
                text = prompt_text + text
            if chat:
                msg, finish = message(text, finish, tools)
                body_part = {"message": msg}
            else:
                body_part = {"text": text}
            choice = {"index": i, **body_part, "logprobs": lp, "finish_reason": finish, "stop_reason": stop}
            if not chat and body.prompt_logprobs is not None:
                choice["prompt_logprobs"] = prompt_logprobs_json(request_out.prompt_logprobs)
            out.append(choice)
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": out, "usage": usage}

    async def sse(body, outputs, num_prompts, n, logprobs, chat, head, top, usage, tools=None):
        """With tools, an answer that may be a tool call is held back and sent whole when it finishes
        (as tool_calls or as content); one that starts like text is streamed. Logprobs are not streamed
        with tools."""
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        event = lambda choices, **extra: f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"
        if chat:  # the role first, like OpenAI
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(num_prompts * n)])
        offsets, held, plain = {}, {}, set()  # plain: answers known to be text, streamed as they come
        try:
            async with aclosing(deltas(outputs, n, usage)) as updates:
                async for i, text, toks, lps, finish, stop in updates:
                    if tools is not None and i not in plain:
                        held[i] = held.get(i, "") + text
                        if finish:
                            msg, finish = message(held.pop(i), finish, tools)
                            delta = ({"tool_calls": [{"index": k, **c} for k, c in enumerate(msg["tool_calls"])]}
                                     if "tool_calls" in msg else {"content": msg["content"]})
                            yield event([{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish,
                                          "stop_reason": stop}])
                            continue
                        if tools.could_be_call(held[i]):
                            continue
                        plain.add(i)  # text after all: what was held goes out now, the rest as it comes
                        text = held.pop(i)
                    if tools is not None or logprobs is None:  # (a beam search's outputs carry its candidates)
                        lps = None
                    lp = None
                    if lps is not None:
                        lp = logprobs_json(chat, toks, lps, top, offsets.get(i, 0))
                        offsets[i] = offsets.get(i, 0) + sum(len(token_str(t)) for t in toks)
                    elif not text and not finish:
                        continue  # text held back (a possible stop string, an unfinished character)
                    part = {"delta": {"content": text} if text or not finish else {}} if chat else {"text": text}
                    yield event([{"index": i, **part, "logprobs": lp, "finish_reason": finish,
                                  "stop_reason": stop}])
            if body.include_usage:
                yield event([], usage=usage)
        except Exception as e:  # the status line is long gone: report in-band, then end the stream
            err = {"message": str(e), "type": "internal_error", "param": None, "code": None}
            yield f"data: {json.dumps({'error': err})}\n\n"
        yield "data: [DONE]\n\n"

    # ---- routes ------------------------------------------------------------------------------
    @app.post("/v1/completions", responses=_responses(CompletionResponse, **generation))
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        params = None if body.use_beam_search else body.to_params()
        if params is not None:
            check_capacity(params)
            check_constraint(params)
        p = body.prompt
        items = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not items:
            raise APIError(400, "The prompt is empty.", param="prompt")
        check_prompt_chars(sum(len(x) for x in items if isinstance(x, str)), "prompt")
        prompts = [{"prompt": x, "prompt_token_ids": tok.encode(x)} if isinstance(x, str) else
                   {"prompt": None, "prompt_token_ids": list(x)} for x in items]
        if params is None:  # max_tokens None: what the longest prompt leaves of the context
            longest = max(len(x["prompt_token_ids"]) for x in prompts)
            asked = body.max_tokens if body.max_tokens is not None else max(1, max_len - longest)
            params = body.beam_search_params(asked)
            check_capacity(params)
        for x in prompts:
            check_prompt(x["prompt_token_ids"], params.max_tokens)
            check_kv(len(x["prompt_token_ids"]), params)
        return await respond(body, prompts, params, False, request)

    @app.post("/v1/chat/completions",
              responses=_responses(ChatCompletionResponse, **generation))
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        tools = body.tool_calling()
        params = None if body.use_beam_search else body.to_params(tools)
        if params is not None:
            check_capacity(params)
            check_constraint(params)
        conversation, extra = _conversation(body.messages), {}
        check_prompt_chars(sum(len(m["content"]) for m in conversation), "messages")
        if tools is not None and tools.active:
            supported = template_uses_tools(select_template(tok.chat_templates, None, tools.tools))
            conversation = tools.messages(conversation, supported)
            extra = {"tools": tools.tools} if supported else {}
        text = tok.apply_chat_template(conversation, add_generation_prompt=body.add_generation_prompt, **extra)
        check_prompt_chars(len(text), "messages")  # the template may add a lot (tools)
        ids = tok.encode(text, add_special_tokens=False)  # the template already wrote any BOS it wants
        if params is None:
            asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            params = body.beam_search_params(asked if asked is not None else max(1, max_len - len(ids)))
            check_capacity(params)
        check_prompt(ids, params.max_tokens, "messages")
        check_kv(len(ids), params)
        return await respond(body, [{"prompt": text, "prompt_token_ids": ids}], params, True, request,
                             tools if tools is not None and tools.active else None)

    @app.get("/v1/models", responses=_responses(ModelList, errors=(), auth=auth))
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": 0,
                                            "owned_by": "tinyvllm", "root": str(aeng.engine.model_path),
                                            "max_model_len": max_len}]}

    @app.post("/tokenize", responses=_responses(TokenizeResponse, auth=auth))
    async def tokenize(body: TokenizeRequest):
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "Give exactly one of prompt or messages.", param="prompt")
        if body.messages is not None:
            conversation = _conversation(body.messages)
            check_prompt_chars(sum(len(m["content"]) for m in conversation), "messages")
            text = tok.apply_chat_template(conversation, add_generation_prompt=body.add_generation_prompt)
            check_prompt_chars(len(text), "messages")
            ids = tok.encode(text, add_special_tokens=False)
        else:
            check_prompt_chars(len(body.prompt), "prompt")
            ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": max_len, "tokens": ids,
                "token_strs": tok.convert_ids_to_tokens(ids) if body.return_token_strs else None}

    @app.post("/detokenize", responses=_responses(DetokenizeResponse, auth=auth))
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model)
        if body.tokens and (min(body.tokens) < 0 or max(body.tokens) >= vocab):
            raise APIError(400, f"Token ids must be in [0, {vocab}).", param="tokens")
        return {"prompt": tok.decode(body.tokens, skip_special_tokens=False)}

    @app.get("/health", response_class=Response, responses={200: {"description": "the engine is running"},
                                   503: {"description": "the engine is not running"}})
    async def health():
        return Response(status_code=200 if aeng.alive else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
