"""Structured outputs (llguidance): every constrained completion is valid by an independent check
(the jsonschema package, re.fullmatch, set membership), greedy and sampled, alone and batched with
free sequences; invalid constraints are refused when the request is added."""
import json
import random
import re

import jsonschema
import pytest

from tinyvllm import LLM, SamplingParams, StructuredOutputsParams

NUM_SCHEMAS = 120
MAX_TOKENS = 160  # every generated schema's instances fit well within this (bounded strings and arrays)
PATTERNS = [r"^[a-z]{2,6}$", r"^[A-Z][a-z]{1,5}$", r"^\d{3}-\d{4}$", r"^(red|green|blue)-[0-9]$", r"^[a-f0-9]{4}$"]
WORDS = ["alpha", "beta", "gamma", "delta", "north", "south", "red", "blue", "cat", "dog", "on", "off"]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A JSON schema from a seeded rng: objects (required and optional keys, closed), arrays with
    bounds, enums, integers / numbers with ranges, bounded strings, patterns, booleans, nesting."""
    kinds = ["string", "pattern", "enum", "integer", "number", "boolean"] + ["array", "object"] * (depth < 2)
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(3, 10)}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(PATTERNS)}
    if kind == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(2, 4)) + ([rng.randint(0, 9)] if rng.random() < 0.3 else [])}
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 200)}
    if kind == "number":  # multipleOf bounds the digits: a free fraction lets a small model loop on digits
        lo = rng.choice([-10.5, 0, 0.25, 3, 100])
        return {"type": "number", "minimum": lo, "maximum": lo + rng.choice([1, 7.5, 50, 1000]),
                "multipleOf": rng.choice([0.25, 0.5, 1])}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "array":
        lo = rng.randint(0, 2)
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": lo,
                "maxItems": lo + rng.randint(0, 2)}
    return random_object(rng, depth + 1)


def random_object(rng: random.Random, depth: int = 0) -> dict:
    names = rng.sample(["id", "name", "kind", "count", "score", "tags", "color", "ok", "size", "pos", "meta", "level"],
                       rng.randint(1, 4 if depth else 5))
    props = {n: random_schema(rng, depth) for n in names}
    required = [n for n in names if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


SCHEMAS = [random_object(random.Random(seed)) for seed in range(NUM_SCHEMAS)]


def prompt_for(schema: dict, i: int) -> str:
    return f"Item {i} as JSON with the keys {', '.join(schema['properties'])}: "


@pytest.fixture(scope="module")
def llm(reference_gguf_path):
    return LLM(str(reference_gguf_path), threads=2, max_model_len=512, max_num_seqs=64)


def json_params(schema, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, structured_outputs=StructuredOutputsParams(json=schema), **kw)


GREEDY = dict(temperature=0)
SAMPLED = dict(temperature=0.8, top_p=0.95)
FREE_PROMPTS = ["The weather today is", "Once upon a time", "My favourite food is"]


@pytest.fixture(scope="module")
def batched(llm):
    """Every schema greedy and sampled, and free greedy prompts, all in one generate call (one batch)."""
    prompts = [prompt_for(s, i) for i, s in enumerate(SCHEMAS)] * 2 + FREE_PROMPTS
    params = ([json_params(s, **GREEDY) for s in SCHEMAS]
              + [json_params(s, seed=i, **SAMPLED) for i, s in enumerate(SCHEMAS)]
              + [SamplingParams(max_tokens=12, ignore_eos=True, **GREEDY)] * len(FREE_PROMPTS))
    outs = [o.outputs[0] for o in llm.generate(prompts, params)]
    n = len(SCHEMAS)
    return {"greedy": outs[:n], "sampled": outs[n:2 * n], "free": outs[2 * n:]}


def check_valid(schema, out):
    assert out.finish_reason == "stop", (schema, out.text, out.finish_reason)
    value = json.loads(out.text)
    jsonschema.validate(value, schema)
    return value


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_json_schemas_batched_all_valid(batched, mode):
    for schema, out in zip(SCHEMAS, batched[mode]):
        check_valid(schema, out)


def test_json_schemas_cover_the_features():
    """The generated set really has what it is meant to test (so the validity test means something)."""
    text = json.dumps(SCHEMAS)
    for feature in ['"enum"', '"minItems"', '"maxItems"', '"minimum"', '"maximum"', '"pattern"', '"number"',
                    '"boolean"', '"properties": {"']:
        assert text.count(feature) >= 10, feature
    nested = sum('"type": "object", "properties"' in json.dumps(s["properties"]) for s in SCHEMAS)
    optional = sum(len(s["required"]) < len(s["properties"]) for s in SCHEMAS)
    assert nested >= 20 and optional >= 40


def test_sampled_differs_from_greedy(batched):
    """The sampled run really sampled (a test of validity under sampling must not be greedy in disguise)."""
    assert sum(g.text != s.text for g, s in zip(batched["greedy"], batched["sampled"])) >= len(SCHEMAS) // 4


def test_alone_equals_batched(llm, batched):
    """A constrained sequence alone gives what it gave in the batch, and free sequences batched with
    constrained ones give what they give alone (greedy is batch-independent in this engine)."""
    for i in range(0, NUM_SCHEMAS, 20):
        alone = llm.generate([prompt_for(SCHEMAS[i], i)], json_params(SCHEMAS[i], **GREEDY))[0].outputs[0]
        check_valid(SCHEMAS[i], alone)
        assert alone.token_ids == batched["greedy"][i].token_ids
    for p, out in zip(FREE_PROMPTS, batched["free"]):
        alone = llm.generate([p], SamplingParams(max_tokens=12, ignore_eos=True, **GREEDY))[0].outputs[0]
        assert alone.token_ids == out.token_ids


def test_sampled_alone_valid(llm):
    for i in (3, 17):
        out = llm.generate([prompt_for(SCHEMAS[i], i)], json_params(SCHEMAS[i], seed=100 + i, **SAMPLED))[0].outputs[0]
        check_valid(SCHEMAS[i], out)


# bounded repetitions: under a free `+` a small model can run on until max_tokens
REGEXES = [r"\d{3}-\d{4}", r"[A-Z][a-z]{2,8}( [A-Z][a-z]{2,8})?", r"(yes|no), because [a-z ]{5,20}\.",
           r"#[0-9a-f]{6}", r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9])", r"[a-z]{2,10}@[a-z]{2,10}\.(com|org)"]


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_regex_fullmatch(llm, sampling):
    params = [SamplingParams(max_tokens=40, seed=i, structured_outputs=StructuredOutputsParams(regex=rx), **sampling)
              for i, rx in enumerate(REGEXES)]
    outs = llm.generate([f"Example {i}:" for i in range(len(REGEXES))], params)
    for rx, o in zip(REGEXES, outs):
        out = o.outputs[0]
        assert out.finish_reason == "stop" and re.fullmatch(rx, out.text), (rx, out.text, out.finish_reason)


def test_choice_in_set_with_forks(llm):
    """n > 1 forks share the prompt's blocks but each has its own matcher."""
    choices = ["positive", "negative", "neutral", "mixed feelings"]
    params = SamplingParams(n=6, temperature=1.5, seed=5, max_tokens=10,
                            structured_outputs=StructuredOutputsParams(choice=choices))
    out = llm.generate(["The review 'great food, slow service' is"], params)[0]
    texts = [c.text for c in out.outputs]
    assert all(t in choices for t in texts) and all(c.finish_reason == "stop" for c in out.outputs), texts
    greedy = llm.generate(["Is the sky blue? Answer:"], SamplingParams(
        temperature=0, max_tokens=10, structured_outputs=StructuredOutputsParams(choice=["yes", "no"])))[0]
    assert greedy.outputs[0].text in ("yes", "no")


def test_json_object(llm):
    few_shot = 'Q: the capital of France, as JSON.\nA: {"capital": "Paris"}\nQ: %s, as JSON.\nA: '
    params = [SamplingParams(max_tokens=100, structured_outputs=StructuredOutputsParams(json_object=True), **s)
              for s in (GREEDY, dict(SAMPLED, seed=1))]
    for x in ("a cat's name and age", "the colour of the sky", "a car's make and year"):
        for out in (o.outputs[0] for o in llm.generate([few_shot % x] * 2, params)):
            assert out.finish_reason == "stop", out.text
            assert isinstance(json.loads(out.text), dict)


def test_grammars_lark_and_gbnf(llm):
    lark = 'start: "x = " NUM " + " NUM\nNUM: /[1-9][0-9]{0,2}/'
    gbnf = 'root ::= "The answer is " ("yes" | "no") "." '
    for grammar, rx in ((lark, r"x = [1-9]\d{0,2} \+ [1-9]\d{0,2}"), (gbnf, r"The answer is (yes|no)\.")):
        for sampling in (GREEDY, dict(SAMPLED, seed=1)):
            out = llm.generate(["Q:"], SamplingParams(max_tokens=30, structured_outputs=StructuredOutputsParams(
                grammar=grammar), **sampling))[0].outputs[0]
            assert out.finish_reason == "stop" and re.fullmatch(rx, out.text), (grammar, out.text)


@pytest.mark.parametrize("bad, why", [
    (dict(json={"type": "object", "properties": {"a": {"type": "frobnicate"}}}), "frobnicate"),
    (dict(json="{not json"), "not valid JSON"),
    (dict(regex="(unclosed"), "unclosed"),
    (dict(grammar="start: undefined_rule"), "undefined_rule"),
    (dict(choice=[]), "non-empty"),
])
def test_invalid_constraints_raise_at_add_request(llm, bad, why):
    with pytest.raises(ValueError, match=why):
        llm.engine.add_request("bad", "x", SamplingParams(structured_outputs=StructuredOutputsParams(**bad)))
    assert not llm.engine.has_unfinished_requests()


def test_properties_in_schema_order(llm):
    """llguidance writes properties in the schema's order: the engine must hand the schema over as given."""
    schema = {"type": "object", "properties": {"zeta": {"type": "integer"}, "alpha": {"type": "integer"}},
              "required": ["zeta", "alpha"], "additionalProperties": False}
    tok = llm.engine.tokenizer
    for text, ok in (('{"zeta": 1, "alpha": 2}', True), ('{"alpha": 2, "zeta": 1}', False)):
        (matcher,) = llm.engine.structured.matchers(StructuredOutputsParams(json=schema), 1)
        assert matcher.consume_tokens(tok.encode(text, add_special_tokens=False)) == ok, text


def test_one_constraint_kind():
    with pytest.raises(ValueError, match="only use one kind"):
        StructuredOutputsParams(json={"type": "object"}, regex="a")
    with pytest.raises(ValueError, match="must use one kind"):
        StructuredOutputsParams()
    assert SamplingParams(structured_outputs={"regex": "a+"}).structured_outputs.regex == "a+"


# ---- the server, through the real openai client ------------------------------------------------------
@pytest.fixture(scope="module")
def client(reference_gguf_path):
    import openai
    from test_server import LiveServer
    from tinyvllm import LLMEngine
    from tinyvllm.server.api import build_app
    server = LiveServer(build_app(LLMEngine(str(reference_gguf_path), threads=2, max_model_len=512), "smollm2-135m"))
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    server.stop()


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]},
                                                    "maxItems": 3}},
          "required": ["name", "age", "pets"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


def test_server_chat_json_schema(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    r = client.chat.completions.create(model="smollm2-135m", messages=ASK, response_format=fmt, max_tokens=80,
                                       temperature=0)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    chunks = client.chat.completions.create(model="smollm2-135m", messages=ASK, response_format=fmt, max_tokens=80,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content


def test_server_parse_into_pydantic(client):
    """The openai client's own structured-output path: a pydantic model in, a parsed instance out."""
    from pydantic import BaseModel

    class City(BaseModel):
        city: str
        country: str
        population_millions: int

    r = client.chat.completions.parse(model="smollm2-135m", response_format=City, max_tokens=80, temperature=0,
                                      messages=[{"role": "user", "content": "Name a large city, as JSON."}])
    assert isinstance(r.choices[0].message.parsed, City)


def test_server_json_object_and_extra_body(client):
    few_shot = 'Q: the capital of France, as JSON.\nA: {"capital": "Paris"}\nQ: the colour of the sky, as JSON.\nA: '
    r = client.completions.create(model="smollm2-135m", prompt=few_shot, max_tokens=60, temperature=0,
                                  extra_body={"response_format": {"type": "json_object"}})
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].text), dict)
    r = client.completions.create(model="smollm2-135m", prompt="The weather is", max_tokens=10, n=3,
                                  temperature=1.0, seed=3,
                                  extra_body={"structured_outputs": {"choice": ["sunny", "rainy", "cold"]}})
    assert all(c.text in ("sunny", "rainy", "cold") for c in r.choices)
    r = client.chat.completions.create(model="smollm2-135m", messages=ASK, max_tokens=20, temperature=0,
                                       extra_body={"structured_outputs": {"regex": r"[A-Z][a-z]{2,8}, \d{2}"}})
    assert re.fullmatch(r"[A-Z][a-z]{2,8}, \d{2}", r.choices[0].message.content)


@pytest.mark.parametrize("extra, why", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}},
     "frobnicate"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "unclosed"),
    ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "undefined_rule"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "only use one kind"),
    ({"structured_outputs": {"json": {"type": "object"}}, "response_format": {"type": "json_object"}}, "give one"),
    ({"structured_outputs": {"jsonn": {}}}, "unknown fields"),
    ({"response_format": {"type": "json_schema"}}, "json_schema.schema"),
])
def test_server_bad_constraint_is_400(client, extra, why):
    import openai
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match=why) as e:
            client.chat.completions.create(model="smollm2-135m", messages=ASK, max_tokens=5, stream=stream,
                                           extra_body=extra)
        assert e.value.status_code == 400
    ok = client.completions.create(model="smollm2-135m", prompt="Hi", max_tokens=3)  # the engine still serves
    assert ok.choices[0].finish_reason == "length"
