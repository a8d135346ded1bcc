"""StructuredOutputsParams -> an llguidance grammar, checked: ValueError naming what the library
rejected (a bad schema, regex or grammar), so a server can answer 400 before anything is queued."""
from __future__ import annotations

import json
from functools import lru_cache

from ..sampling_params import StructuredOutputsParams

_INSTALL_HINT = "structured outputs need llguidance: pip install 'tinyvllm[structured]'"


def _llguidance():
    try:
        import llguidance
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    return llguidance


def compile_grammar(params: StructuredOutputsParams) -> str:
    """The llguidance grammar (its JSON text) for one constraint; ValueError when it is invalid."""
    kind = params.kind
    if kind in ("json", "json_object"):
        schema = {"type": "object"} if kind == "json_object" else params.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError("structured_outputs.json must be a JSON schema (an object)")
        options = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
        if params.whitespace_pattern is not None:
            options["whitespace_pattern"] = params.whitespace_pattern
        if params.disable_additional_properties and isinstance(schema, dict):
            schema = _closed(schema)
        text = json.dumps(schema)  # key order kept: llguidance writes properties in the schema's order
        return _checked(kind, ("json", text, json.dumps(options, sort_keys=True)))
    if kind == "regex":
        return _checked(kind, ("regex", params.regex, ""))
    if kind == "choice":
        return _checked(kind, ("choice", json.dumps(params.choice), ""))
    return _checked(kind, ("grammar", params.grammar, ""))


def _closed(schema: dict) -> dict:
    """vLLM's disable_additional_properties: objects that do not say otherwise take no extra keys."""
    def walk(node):
        if isinstance(node, dict):
            node = {k: walk(v) for k, v in node.items()}
            if node.get("type") == "object" and "additionalProperties" not in node:
                node["additionalProperties"] = False
            return node
        return [walk(v) for v in node] if isinstance(node, list) else node
    return walk(schema)


def _checked(kind: str, key: tuple) -> str:
    if not isinstance(key[1], str):
        raise ValueError(f"structured_outputs.{kind} must be a string")
    return _compile(key)


@lru_cache(maxsize=256)  # the server checks a request's grammar, then the engine compiles it again
def _compile(key: tuple) -> str:
    ll = _llguidance()
    what, text, options = key
    try:
        if what == "json":
            grammar = ll.LLMatcher.grammar_from_json_schema(text, defaults=json.loads(options))
        else:
            grammar = ll.grammar_from(what, text)
    except ValueError as e:
        raise ValueError(f"invalid structured_outputs.{what}: {e}") from None
    is_error, messages = ll.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(f"invalid structured_outputs.{what}: {messages[0] if messages else 'rejected by llguidance'}")
    return grammar
