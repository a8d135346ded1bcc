"""Chat templates: HF-compatible jinja2 rendering (what `tokenizer.apply_chat_template` does).

Templates are untrusted text shipped with a model, so they run in jinja2's immutable sandbox.
The environment mirrors transformers': trim_blocks/lstrip_blocks, loop controls, `tojson`
without ASCII escaping, `raise_exception`, `strftime_now` and a no-op `{% generation %}` tag.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(ValueError):
    """A chat template rejected the conversation (`raise_exception` in the template)."""


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # HF's tojson: keeps non-ASCII text as is (jinja's builtin escapes it and HTML-quotes).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for HF's training masks;
    for rendering it is a plain block."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True,
                         bos_token: str | None = None, eos_token: str | None = None, **kwargs) -> str:
    return compile_template(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                             bos_token=bos_token or "", eos_token=eos_token or "", **kwargs)


def select_template(templates: dict[str, str], chat_template: str | None = None, tools=None) -> str:
    """Pick a template like HF: an explicit template string or name, else "tool_use" when tools are
    given and the model has one, else "default"."""
    if chat_template is not None:
        if chat_template in templates:
            return templates[chat_template]
        if "{{" in chat_template or "{%" in chat_template:
            return chat_template
        raise ValueError(f"unknown chat template name {chat_template!r}; the model has {sorted(templates)}")
    if tools and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    if len(templates) == 1:  # a single named template is the default
        return next(iter(templates.values()))
    if templates:
        raise ValueError(f"the model has several chat templates {sorted(templates)} and no 'default': "
                         "pick one with chat_template=NAME")
    raise ValueError("this model has no chat template (no tokenizer.chat_template in the GGUF / "
                     "tokenizer_config.json); pass one with apply_chat_template(..., chat_template='...') "
                     "or use plain text generation")
