"""OpenAI tool calling on /v1/chat/completions: how tools reach the prompt, how tool_choice constrains
the output (structured outputs), and how the output becomes `tool_calls`.

- tool_choice "none": the tools are left out of the prompt and the answer is plain text.
- "auto" (the default when tools are given): the model is free; an answer that is a tool call (a JSON
  object {"name", "arguments"} or a list of them, alone or in <tool_call>...</tool_call> blocks as
  Hermes / Qwen templates ask) becomes tool_calls, anything else stays content.
- "required": the output is constrained to one call of one of the tools, with schema-valid arguments.
- a named function: the output is constrained to that function's arguments.
A chat template that uses `tools` renders them itself. For one that does not (SmolLM2's, for one) the
tools and the reply format are written into the system message instead, and earlier assistant tool
calls and tool results are rendered as plain messages, so the model still sees them.
Streaming: an answer that may still be a tool call is held back and sent whole when it finishes; an
"auto" answer that starts like text is streamed as it comes.
"""
from __future__ import annotations

import json
import re
import uuid

from ..sampling_params import StructuredOutputsParams

_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def template_uses_tools(template: str) -> bool:
    return re.search(r"\btools\b", template) is not None


class ToolCalling:
    def __init__(self, tools: list[dict], tool_choice, parallel_tool_calls: bool = True):
        self.functions = {t["function"]["name"]: t["function"] for t in tools}
        self.tools, self.parallel = tools, parallel_tool_calls
        if tool_choice is None:
            tool_choice = "auto"
        if isinstance(tool_choice, dict):
            name = (tool_choice.get("function") or {}).get("name")
            if name not in self.functions:
                raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools "
                                 f"({', '.join(self.functions)})")
            self.choice, self.named = "named", name
        elif tool_choice in ("none", "auto", "required"):
            self.choice, self.named = tool_choice, None
        else:
            raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or a named function, got {tool_choice!r}")

    @property
    def active(self) -> bool:
        return self.choice != "none"

    # ---- the prompt --------------------------------------------------------------------------
    def messages(self, messages: list[dict], template_supports_tools: bool) -> list[dict]:
        """The conversation to render. With a template that knows tools it is unchanged (the tools go
        in as the template's `tools`); otherwise tools, past calls and results are spelled out."""
        if template_supports_tools or not self.active:
            return messages
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                calls = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"] or "{}")}
                         for c in m.pop("tool_calls")]
                m["content"] = (m.get("content") or "") + json.dumps(calls[0] if len(calls) == 1 else calls)
            if m.get("role") == "tool":
                m = {"role": "user", "content": f"Result of the tool call: {m.get('content', '')}"}
            out.append(m)
        system = ("You can call these functions:\n" + "\n".join(json.dumps(t["function"]) for t in self.tools) +
                  '\nTo call one, answer with only a JSON object {"name": <function name>, "arguments": '
                  "<the arguments as a JSON object>}; otherwise answer normally.")
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{system}"}
        else:
            out.insert(0, {"role": "system", "content": system})
        return out

    # ---- the constraint ----------------------------------------------------------------------
    def constraint(self) -> StructuredOutputsParams | None:
        if self.choice == "named":
            return StructuredOutputsParams(json=self._parameters(self.named))
        if self.choice == "required":
            calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": self._parameters(name)},
                      "required": ["name", "arguments"], "additionalProperties": False} for name in self.functions]
            return StructuredOutputsParams(json=calls[0] if len(calls) == 1 else {"anyOf": calls})
        return None

    def _parameters(self, name: str) -> dict:
        return self.functions[name].get("parameters") or {"type": "object"}

    # ---- the answer --------------------------------------------------------------------------
    def could_be_call(self, prefix: str) -> bool:
        """Whether an answer starting with `prefix` may still turn out to be a tool call (a stream holds
        it back until it is sure)."""
        if self.choice != "auto":
            return True
        s = prefix.lstrip()
        return not s or s[0] in "{[" or s.startswith("<tool_call>") or "<tool_call>".startswith(s)

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, tool_calls) of one finished answer; tool_calls is empty when it is plain text."""
        if self.choice == "named":
            return None, [_call(self.named, text)]
        found = [m.group(1) for m in _TAGGED.finditer(text)] or [text]
        calls = []
        for chunk in found:
            try:
                value = json.loads(chunk)
            except json.JSONDecodeError:
                return text, []
            for c in value if isinstance(value, list) else [value]:
                if not (isinstance(c, dict) and c.get("name") in self.functions):
                    return text, []
                args = c.get("arguments", c.get("parameters", {}))
                calls.append(_call(c["name"], args if isinstance(args, str) else json.dumps(args)))
        if not self.parallel:
            calls = calls[:1]
        return None, calls


def _call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}
