"""An on-device assistant in the terminal: streaming chat, tools, a hard memory budget.

    python examples/assistant/assistant.py                          # chat with smollm2-135m
    python examples/assistant/assistant.py --model /path/to/model.gguf --memory-budget 1GB

The model runs in this process (tinyvllm.AsyncLLM: no server). The whole conversation is kept and
re-sent every turn, as a chat client does; the prefix cache finds the system prompt and the history
already in KV blocks, so only the new message is prefilled and the time to first token stays flat as
the history grows. Each turn prints how many prompt tokens came from the cache and its TTFT
(`--no-prefix-caching` shows the other case).

Tools (clock, calculator, file lookup over --files) go through tinyvllm's OpenAI tool calling
(tinyvllm/server/tools.py, used here without the server): they are described in the prompt, a reply
that is a JSON call {"name", "arguments"} is parsed into a tool call, the tool runs, its result goes
back into the conversation and the model answers again. With tool choice "auto" the model decides;
a 135M model rarely does, so `--tool-choice required` forces the first reply of each turn to be a
call (schema-constrained by structured outputs) and the reply after the result to be prose (a regex
constraint without braces: a small model would otherwise go on writing calls).

Commands: /reset forgets the conversation, /quit (or end of input) leaves.
"""
from __future__ import annotations

import argparse
import ast
import datetime as dt
import json
import operator
import sys
from pathlib import Path

from tinyvllm import AsyncLLM, SamplingParams, StructuredOutputsParams
from tinyvllm.chat_template import select_template
from tinyvllm.model.fetch import DEFAULT_MODEL
from tinyvllm.server.tools import ToolCalling, template_uses_tools

HERE = Path(__file__).resolve().parent
SYSTEM = "You are a helpful assistant running on this device. Answer briefly."
MAX_TOOL_ROUNDS = 3
PROSE = r"[A-Za-z0-9][^{}\[\]<>]*"  # the answer after a forced tool call: text, not another call

TOOLS = [
    {"type": "function", "function": {
        "name": "clock", "description": "The current local date and time.",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression (+ - * / ** % and parentheses).",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string", "pattern": "^[0-9(-][0-9+*/%(). -]{0,39}$"}},
                       "required": ["expression"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "lookup", "description": "Find the lines of the user's notes that mention a word.",
        "parameters": {"type": "object", "properties": {"word": {"type": "string", "pattern": "^[A-Za-z]{2,24}$"}},
                       "required": ["word"], "additionalProperties": False}}},
]

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
        ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculate(expression: str) -> float | int:
    """Arithmetic only: the expression is parsed, never executed (no names, calls or attributes)."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"not arithmetic: {ast.dump(node)[:40]}")
    return ev(ast.parse(expression, mode="eval"))


class Tools:
    def __init__(self, files: Path, now=dt.datetime.now):
        self.files, self.now = files, now

    def __call__(self, name: str, arguments: dict) -> str:
        try:
            if name == "clock":
                return self.now().strftime("%A %d %B %Y, %H:%M")
            if name == "calculator":
                return str(calculate(str(arguments.get("expression", ""))))
            if name == "lookup":
                return self.lookup(str(arguments.get("word", "")))
            return f"error: no tool named {name!r}"
        except (ValueError, SyntaxError, ZeroDivisionError, OverflowError) as e:
            return f"error: {e}"

    def lookup(self, word: str) -> str:
        word = word.strip().lower()
        if not word:
            return "error: no word given"
        hits = [f"{p.name}: {line.strip()}" for p in sorted(self.files.glob("**/*")) if p.is_file()
                for line in p.read_text(encoding="utf-8", errors="replace").splitlines() if word in line.lower()]
        return "\n".join(hits[:10]) or f"nothing in the notes mentions {word!r}"


class Assistant:
    """The conversation and one turn of it. `out` receives the streamed text and the per-turn stats."""

    def __init__(self, llm: AsyncLLM, tools: Tools, *, tool_choice: str = "auto", max_tokens: int = 128,
                 out=sys.stdout):
        self.llm, self.tools, self.out, self.max_tokens = llm, tools, out, max_tokens
        self.calling = ToolCalling(TOOLS, "auto" if tool_choice == "required" else tool_choice)
        self.forced = ToolCalling(TOOLS, "required") if tool_choice == "required" else None
        tok = llm.tokenizer
        self.template_has_tools = template_uses_tools(select_template(tok.chat_templates, None, TOOLS))
        self.turns: list[dict] = []  # per turn: prompt tokens, cached tokens, TTFT, tool calls
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": SYSTEM}]

    def _prompt(self) -> dict:
        """The conversation as a prompt. When it no longer fits the KV pool the budget allows (or the
        model's context) with room for the reply, the oldest exchanges go, the system prompt stays
        (this changes the prompt's start: the next turn is prefilled in full once)."""
        tok = self.llm.tokenizer
        room = self.llm.engine.max_model_len - self.max_tokens
        while True:
            messages = self.calling.messages(self.messages, self.template_has_tools)
            extra = {"tools": TOOLS} if self.template_has_tools and self.calling.active else {}
            text = tok.apply_chat_template(messages, **extra)
            ids = tok.encode(text, add_special_tokens=False)
            users = [i for i, m in enumerate(self.messages) if m["role"] == "user"]
            if len(ids) <= room or len(users) < 2:
                return {"prompt": text, "prompt_token_ids": ids}
            del self.messages[1:users[1]]  # the oldest exchange, with its tool calls and results

    def _generate(self, round_: int) -> tuple[str, object]:
        """One reply, streamed to `out` unless it may be a tool call (then it is held back)."""
        prefix_hits = self.llm.stats["prefix_cache"]["hit_tokens"]
        forced = self.forced if round_ == 0 else None
        constraint = None
        if self.forced is not None:
            constraint = self.forced.constraint() if round_ == 0 else StructuredOutputsParams(regex=PROSE)
        params = SamplingParams(temperature=0.0, max_tokens=self.max_tokens, structured_outputs=constraint)
        handle = self.llm.submit(self._prompt(), params)
        shown, out = 0, None
        for out in handle:
            text = out.outputs[0].text
            if forced is None and (shown or not self.calling.could_be_call(text)):
                self.out.write(text[shown:])
                self.out.flush()
                shown = len(text)
        out = handle.result()
        self.llm.wait_until(lambda llm: llm.stats["running"] == 0, timeout=10)
        cached = self.llm.stats["prefix_cache"]["hit_tokens"] - prefix_hits
        return out, {"prompt_tokens": len(out.prompt_token_ids), "cached_tokens": cached,
                     "ttft_s": out.metrics.ttft, "streamed": shown}

    def turn(self, user: str) -> str:
        self.messages.append({"role": "user", "content": user})
        calls_made, first = [], None
        for round_ in range(MAX_TOOL_ROUNDS + 1):
            out, stats = self._generate(round_)
            first = first or stats
            text = out.outputs[0].text
            if self.forced is not None:  # one forced call, then the answer
                content, calls = self.forced.parse(text) if round_ == 0 else (text, [])
            else:
                content, calls = self.calling.parse(text) if self.calling.active and round_ < MAX_TOOL_ROUNDS else (text, [])
            if not calls:
                if stats["streamed"] < len(text):  # held back as a possible tool call: show it now
                    self.out.write(text[stats["streamed"]:])
                self.out.write("\n")
                self.messages.append({"role": "assistant", "content": text})
                break
            self.messages.append({"role": "assistant", "content": None, "tool_calls": calls})
            for call in calls:
                name, args = call["function"]["name"], json.loads(call["function"]["arguments"] or "{}")
                result = self.tools(name, args)
                calls_made.append({"name": name, "arguments": args, "result": result})
                self.out.write(f"  [tool {name}({json.dumps(args)}) -> {result!r}]\n")
                self.messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
        self.turns.append({**first, "tool_calls": calls_made})
        self.out.write(f"  [turn {len(self.turns)}: prompt {first['prompt_tokens']} tokens, "
                       f"{first['cached_tokens']} from the prefix cache, TTFT {first['ttft_s'] * 1000:.0f} ms]\n")
        self.out.flush()
        return self.messages[-1]["content"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"alias or .gguf path (default: {DEFAULT_MODEL})")
    p.add_argument("--memory-budget", default="256MB", help="hard budget for weights + KV cache + workspace")
    p.add_argument("--threads", "-t", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=128, help="per reply")
    p.add_argument("--tool-choice", choices=("auto", "required", "none"), default="auto")
    p.add_argument("--files", default=str(HERE / "notes"), help="folder the lookup tool searches")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="cap the conversation's tokens (default: what the model and the budget allow)")
    p.add_argument("--no-prefix-caching", action="store_true", help="to compare TTFT without the prefix cache")
    p.add_argument("--stats-json", help="write the per-turn stats here at the end")
    return p.parse_args(argv)


def main(argv=None, lines=None, out=sys.stdout) -> int:
    """lines: the user's messages (default: read from the terminal / stdin until /quit or EOF)."""
    a = parse_args(argv)
    interactive = lines is None and sys.stdin.isatty()
    lines = iter(lines) if lines is not None else iter(sys.stdin.readline, "")
    try:
        llm = AsyncLLM(a.model, threads=a.threads, memory_budget=a.memory_budget,
                       enable_prefix_caching=not a.no_prefix_caching, max_num_seqs=1,
                       max_model_len=a.max_model_len,  # one conversation
                       enable_structured_outputs=True)  # forced tool calls are constrained: the budget pays for it
    except ValueError as e:  # a budget too small for the model says so and by how much
        print(f"error: {e}", file=sys.stderr)
        return 2
    with llm:
        assistant = Assistant(llm, Tools(Path(a.files)), tool_choice=a.tool_choice, max_tokens=a.max_tokens, out=out)
        out.write(f"[{a.model} under {a.memory_budget}: {llm.stats['blocks_total']} KV blocks, "
                  f"conversations up to {llm.engine.max_model_len} tokens; /reset, /quit]\n")
        while True:
            if interactive:
                out.write("> ")
                out.flush()
            line = next(lines, None)
            if line is None or line.strip() == "/quit":
                break
            line = line.strip()
            if not line:
                continue
            if line == "/reset":
                assistant.reset()
                continue
            if not interactive:
                out.write(f"> {line}\n")
            assistant.turn(line)
        if a.stats_json:
            Path(a.stats_json).write_text(json.dumps(assistant.turns, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
