"""Chat templates: HF-compatible jinja2 rendering (what `tokenizer.apply_chat_template` does).

Templates are untrusted text shipped with a model: they run in jinja2's immutable sandbox under a time
and an output size limit (a TemplateError instead of a hang or gigabytes). The environment mirrors
transformers': trim/lstrip blocks, loop controls, `tojson` without ASCII escaping, `raise_exception`,
`strftime_now` and a no-op `{% generation %}` tag. jinja2 is imported on the first template, not with
this module: a model without a template never pays its import (~30 ms).
"""
from __future__ import annotations

import ctypes
import json
import threading
from datetime import datetime
import re
from functools import lru_cache
from types import SimpleNamespace


# Real chat templates render a conversation in milliseconds into at most a few MB.
MAX_RENDER_SECONDS = 5.0
MAX_OUTPUT_CHARS = 16 << 20


class TemplateError(ValueError):
    """A chat template rejected the conversation (`raise_exception` in the template), broke a limit,
    does not compile, or failed while rendering (a ValueError: the server answers 400)."""


class _RenderTimeout(BaseException):
    """Raised inside the rendering thread by the watchdog (a BaseException so templates cannot catch it)."""


_FORMAT_WIDTH = re.compile(r"%[-+ #0]*(\d*)(?:\.(\d+))?")  # printf-style width and precision


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # HF's tojson: keeps non-ASCII text as is (jinja's builtin escapes it and HTML-quotes).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _width_checked(f):
    def checked(value, width=80, *args, **kwargs):
        if isinstance(width, int) and width > MAX_OUTPUT_CHARS:
            raise TemplateError(f"chat template asks for a width of {width} characters")
        return f(value, width, *args, **kwargs)
    return checked


@lru_cache(maxsize=1)
def _jinja() -> SimpleNamespace:
    """jinja2 and the two classes built on it, made on first use."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

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

    class _LimitedSandbox(ImmutableSandboxedEnvironment):
        """The sandbox, plus size checks on the operators that make big values from small ones
        (`'x' * 10**12`, `10 ** 10 ** 10`, `'%999999999d' % 1`) before they run."""
        intercepted_binops = frozenset({"*", "**", "%"})

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                seq, n = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(n, int) and hasattr(seq, "__len__") and len(seq) * max(n, 0) > MAX_OUTPUT_CHARS:
                    raise TemplateError(f"chat template builds a value of {len(seq) * n} items "
                                        f"(limit {MAX_OUTPUT_CHARS})")
            elif operator == "**":
                if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 4096:
                    raise TemplateError(f"chat template computes an integer power too large ({left} ** {right})")
            elif operator == "%" and isinstance(left, str):
                widths = [int(w) for pair in _FORMAT_WIDTH.findall(left) for w in pair if w]
                if widths and max(widths) > MAX_OUTPUT_CHARS:
                    raise TemplateError(f"chat template formats a field {max(widths)} characters wide")
            return super().call_binop(context, operator, left, right)

    return SimpleNamespace(jinja2=jinja2, GenerationTag=_GenerationTag, LimitedSandbox=_LimitedSandbox)


def check_template(template):
    """The compiled template; TemplateError naming the problem (with the line) when it is not jinja2 text
    that compiles (loaders check every template a model ships: a damaged one fails at load)."""
    if not isinstance(template, str):
        raise TemplateError(f"chat template is a {type(template).__name__}, not text")
    jinja = _jinja()
    try:
        return _compile_template(template)
    except jinja.jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template does not compile: line {e.lineno}: {e.message}") from None
    except (RecursionError, MemoryError) as e:  # deeply nested text exhausts the parser
        raise TemplateError(f"chat template does not compile: {type(e).__name__}") from None


@lru_cache(maxsize=16)
def _compile_template(template: str):
    jinja = _jinja()
    env = jinja.LimitedSandbox(trim_blocks=True, lstrip_blocks=True,
                               extensions=[jinja.GenerationTag, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    for name in ("center", "indent"):  # width arguments make big strings from small ones
        env.filters[name] = _width_checked(env.filters[name])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True,
                         bos_token: str | None = None, eos_token: str | None = None, *,
                         time_limit: float = MAX_RENDER_SECONDS, max_chars: int = MAX_OUTPUT_CHARS, **kwargs) -> str:
    """Render; raises TemplateError when the template runs past `time_limit` seconds or its output
    passes `max_chars` characters."""
    chunks = check_template(template).generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 bos_token=bos_token or "", eos_token=eos_token or "", **kwargs)
    out, n = [], 0
    try:
        with _Watchdog(time_limit):
            for c in chunks:
                n += len(c)
                if n > max_chars:
                    raise TemplateError(f"chat template output passed {max_chars} characters: stopped")
                out.append(c)
    except MemoryError:
        raise TemplateError("chat template ran out of memory: stopped") from None
    except TemplateError:
        raise
    except Exception as e:  # the template's own bug (undefined attribute, bad operand, sandbox refusal)
        where = _template_line(e)
        raise TemplateError(f"chat template failed while rendering{where}: {type(e).__name__}: {e}") from None
    return "".join(out)


def _template_line(e: BaseException) -> str:
    """' (line N)' of the innermost template frame in the traceback (jinja2 rewrites the traceback so
    that frames of template code carry the template's own line numbers), when there is one."""
    line, tb = None, e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return f" (line {line})" if line else ""


class _Watchdog:
    """Interrupts the current thread with _RenderTimeout after `seconds` (a template's loop is Python
    bytecode, which checks for such asynchronous exceptions); turns it into a TemplateError."""

    def __init__(self, seconds: float):
        self.seconds, self.tid, self.lock, self.done = seconds, threading.get_ident(), threading.Lock(), False

    def _fire(self):
        with self.lock:
            if not self.done:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.tid), ctypes.py_object(_RenderTimeout))

    def __enter__(self):
        self.timer = threading.Timer(self.seconds, self._fire)
        self.timer.daemon = True
        self.timer.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.timer.cancel()
        with self.lock:
            self.done = True
            # a timeout that fired after the last check must not surface later, somewhere else
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.tid), None)
        if exc_type is _RenderTimeout:
            raise TemplateError(f"chat template rendering took longer than {self.seconds:g} s: stopped") from None
        return False


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
