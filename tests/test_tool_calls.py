"""Tool calling on /v1/chat/completions through the real openai client: tool_choice none / auto /
required / a named function, tool_calls in the message and in streamed deltas, finish_reason
"tool_calls"; arguments validated with jsonschema against the tool's own parameters."""
import json

import jsonschema
import openai
import pytest

from tinyvllm.server.tools import ToolCalling, template_uses_tools

MODEL = "smollm2-135m"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone.",
    "parameters": {"type": "object",
                   "properties": {"zone": {"type": "string", "pattern": "^[A-Z][a-z]{2,10}/[A-Z][a-z]{2,10}$"}},
                   "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


@pytest.fixture(scope="module")
def client(reference_gguf_path):
    from test_server import LiveServer
    from tinyvllm import LLMEngine
    from tinyvllm.server.api import build_app
    server = LiveServer(build_app(LLMEngine(str(reference_gguf_path), threads=2, max_model_len=768), MODEL))
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    server.stop()


def check_calls(calls, names):
    assert calls
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_") and c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), PARAMS[c.function.name])


def streamed(chunks):
    """(content, tool calls as {index: (id, name, arguments)}, finish_reason) from streamed deltas."""
    content, calls, finish = "", {}, None
    for ch in chunks:
        for c in ch.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                cid, name, args = calls.get(tc.index, (None, None, ""))
                calls[tc.index] = (tc.id or cid, (tc.function.name if tc.function else None) or name,
                                   args + ((tc.function.arguments or "") if tc.function else ""))
            finish = c.finish_reason or finish
    return content, calls, finish


@pytest.mark.parametrize("temperature", [0, 0.9])
def test_named_function(client, temperature):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice,
                                       max_tokens=60, temperature=temperature, seed=1)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    check_calls(r.choices[0].message.tool_calls, {"get_weather"})
    content, calls, finish = streamed(client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=60,
        temperature=temperature, seed=1, stream=True))
    assert finish == "tool_calls" and content == "" and len(calls) == 1
    cid, name, args = calls[0]
    assert cid.startswith("call_") and name == "get_weather"
    assert json.loads(args) == json.loads(r.choices[0].message.tool_calls[0].function.arguments)


def test_required(client):
    for messages in (ASK, [{"role": "user", "content": "What time is it in Europe/Paris?"}]):
        r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, TIME],
                                           tool_choice="required", max_tokens=60, temperature=0)
        assert r.choices[0].finish_reason == "tool_calls"
        check_calls(r.choices[0].message.tool_calls, {"get_weather", "get_time"})


def test_none_leaves_tools_out(client):
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0)
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none",
                                       max_tokens=8, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content == plain.choices[0].message.content
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens


def test_auto_renders_tools_and_answers_well_formed(client):
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=40, temperature=0)
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=40, temperature=0)
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 40  # SmolLM2's template: tools in the system message
    m = r.choices[0].message
    if m.tool_calls:
        assert r.choices[0].finish_reason == "tool_calls"
        check_calls(m.tool_calls, {"get_weather"})
    else:
        assert m.content and r.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=40,
                                                 temperature=0, stream=True))
    content, calls, finish = streamed(chunks)
    if m.tool_calls:
        assert finish == "tool_calls" and [c[1] for c in calls.values()] == [c.function.name for c in m.tool_calls]
    else:  # text streams as it comes, not in one piece at the end
        assert content == m.content and finish == r.choices[0].finish_reason
        assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) > 1


def test_could_be_call():
    auto = ToolCalling([WEATHER], "auto")
    for prefix in ("", "  ", "{", ' {"na', "[", "<tool", "<tool_call>\n{"):
        assert auto.could_be_call(prefix), prefix
    for prefix in ("The", " It is", "<b>"):
        assert not auto.could_be_call(prefix), prefix
    assert ToolCalling([WEATHER], "required").could_be_call("The")


def test_conversation_with_tool_results(client):
    """A follow-up turn: the assistant's earlier call and the tool's answer go back into the prompt."""
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                           max_tokens=60, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                      {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=20, temperature=0)
    # the same tools rendered, plus the call's JSON and the result
    assert r.usage.prompt_tokens > first.usage.prompt_tokens + len(call.function.arguments) // 4 + 10
    assert r.choices[0].message.content or r.choices[0].message.tool_calls


@pytest.mark.parametrize("kwargs, why", [
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "nope"),
    (dict(tool_choice="required"), "requires tools"),
    (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}), "tool_choice"),
])
def test_bad_tool_requests_are_400(client, kwargs, why):
    with pytest.raises(openai.BadRequestError, match=why):
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, **kwargs)


# ---- parsing and rendering, without the model ------------------------------------------------------
def test_parse_auto_formats():
    tc = ToolCalling([WEATHER, TIME], "auto")
    args = {"city": "Oslo", "unit": "celsius"}
    for text in (json.dumps({"name": "get_weather", "arguments": args}),
                 json.dumps([{"name": "get_weather", "arguments": args},
                             {"name": "get_time", "parameters": {"zone": "Europe/Oslo"}}]),
                 "<tool_call>\n" + json.dumps({"name": "get_weather", "arguments": args}) + "\n</tool_call>"):
        content, calls = tc.parse(text)
        assert content is None and calls[0]["function"]["name"] == "get_weather"
        assert json.loads(calls[0]["function"]["arguments"]) == args
    assert len(tc.parse(json.dumps([{"name": "get_weather", "arguments": args}] * 2))[1]) == 2
    assert len(ToolCalling([WEATHER], "auto", parallel_tool_calls=False).parse(
        json.dumps([{"name": "get_weather", "arguments": args}] * 2))[1]) == 1
    for text in ("It is sunny.", '{"name": "unknown_tool", "arguments": {}}', '{"name": "get_weather"'):
        assert tc.parse(text) == (text, [])


def test_rendering_with_and_without_template_support():
    tc = ToolCalling([WEATHER], "auto")
    msgs = [{"role": "user", "content": "hi"}]
    assert tc.messages(msgs, template_supports_tools=True) == msgs
    spelled = tc.messages(msgs, template_supports_tools=False)
    assert spelled[0]["role"] == "system" and "get_weather" in spelled[0]["content"] and spelled[1:] == msgs
    assert template_uses_tools("{% if tools %}{{ tools | tojson }}{% endif %}")
    assert not template_uses_tools("{% for m in messages %}{{ m.content }}{% endfor %}")
