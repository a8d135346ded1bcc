"""The `tinyvllm` command: generate, chat (interactive when stdin is a terminal) and perplexity."""
import argparse
import sys

from .engine_args import EngineArgs, HelpFormatter, add_version
from .sampling_params import SamplingParams


TEMPERATURE_HELP = ("0 = greedy: the same answer every run, and a small model's best (requests to `serve` "
                    "default to 1.0, as in OpenAI's API, whose clients expect sampling)")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (as in the API's requests)")
    g.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most per answer")
    g.add_argument("--temperature", type=float, default=0.0, help=TEMPERATURE_HELP)
    g.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens with this mass")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0 = all)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the likeliest's probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeating tokens")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _params(a) -> SamplingParams:
    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                          min_p=a.min_p, repetition_penalty=a.repetition_penalty, stop=a.stop)


def _llm(a):
    from .llm import LLM  # loads the native core: only when a command really runs
    e = EngineArgs.from_cli_args(a)
    return LLM(e.model, **e.engine_kwargs())


def _generate(a) -> int:
    llm, params = _llm(a), _params(a)
    prompts = a.prompt or [sys.stdin.read()]
    if len(prompts) == 1 and not a.no_stream:
        for piece in llm.stream(prompts[0], params):
            print(piece, end="", flush=True)
        print()
        return 0
    for out in llm.generate(prompts, params):
        print(out.outputs[0].text)
    return 0


def _chat(a) -> int:
    llm, params = _llm(a), _params(a)
    history = [{"role": "system", "content": a.system}] if a.system else []

    def answer(user: str) -> None:
        history.append({"role": "user", "content": user})
        reply = ""
        for piece in llm.stream_chat(history, params):
            reply += piece
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": reply})

    if a.message or not sys.stdin.isatty():
        answer(a.message or sys.stdin.read())
        return 0
    print(f"tinyvllm chat with {a.model} (Ctrl-D or /exit to quit, /reset to forget)", file=sys.stderr)
    while True:
        try:
            user = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if user in ("/exit", "/quit"):
            return 0
        if user == "/reset":
            del history[1 if a.system else 0:]
        elif user:
            try:
                answer(user)
            except KeyboardInterrupt:  # stop this answer, keep the session
                print(file=sys.stderr)
                history.pop()


def _perplexity(a) -> int:
    from dataclasses import replace
    from .bench.progress import Progress
    from .engine import LLMEngine
    from .perplexity import perplexity, windows
    with open(a.file, encoding="utf-8") as f:
        text = f.read()
    e = EngineArgs.from_cli_args(a)
    if e.max_model_len is None:  # room for one window and its one sampled token
        e = replace(e, max_model_len=a.ctx + 1)
    engine = LLMEngine(e.model, **e.engine_kwargs())
    n_windows = len(windows(engine.tokenizer.encode(text), a.ctx, a.stride))
    bar = Progress(n_windows, "perplexity", enabled=not a.no_progress, unit="windows")
    result = perplexity(engine, text, a.ctx, a.stride, bar)
    bar.close()
    print(f"perplexity of {a.file}: ctx {a.ctx}, " + (f"stride {a.stride}" if a.stride else
                                                        "non-overlapping windows, second halves scored"))
    print(f"PPL = {result.ppl:.4f} +/- {result.stderr:.5f}")
    print(f"tokens scored: {result.tokens_scored} in {result.num_windows} windows")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tinyvllm", description="A tiny vLLM for edge devices",
                                 formatter_class=HelpFormatter)
    add_version(ap)
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="complete raw text prompts", formatter_class=HelpFormatter,
                       description="Complete raw text prompts (no chat template); one prompt streams.")
    g.add_argument("prompt", nargs="*", help="prompt(s); read from stdin when none")
    g.add_argument("--no-stream", action="store_true", help="print each full answer at the end")
    _add_sampling(g)
    EngineArgs.add_cli_args(g)
    c = sub.add_parser("chat", help="chat with the model's chat template", formatter_class=HelpFormatter,
                       description="Chat with the model's chat template: interactive in a terminal, else one "
                                   "answer to --message or to stdin.")
    c.add_argument("--message", default=None, help="ask one question and exit")
    c.add_argument("--system", default=None, help="system prompt (default: the template's own)")
    _add_sampling(c)
    EngineArgs.add_cli_args(c)
    pp = sub.add_parser("perplexity", help="perplexity of a text file, computed as llama.cpp's llama-perplexity",
                        formatter_class=HelpFormatter,
                        description="Perplexity of a text file as llama.cpp's llama-perplexity computes it; prints "
                                    "PPL +/- its standard error and the tokens scored. A step scores at most "
                                    "--max-num-seqs prompt positions (the memory plan pays for their logits).")
    pp.add_argument("--file", "-f", required=True, help="plain text file to score")
    pp.add_argument("--ctx", "-c", type=int, default=512, help="window length in tokens")
    pp.add_argument("--stride", type=int, default=0,
                    help="0: non-overlapping windows, second half of each scored (llama-perplexity's default); "
                         "S: a window every S tokens, its last S tokens scored (llama-perplexity --ppl-stride)")
    pp.add_argument("--no-progress", action="store_true", help="no progress bar")
    EngineArgs.add_cli_args(pp)
    # serve and bench live in their own packages; configure() only adds arguments (no heavy imports)
    from .server.cli import configure as configure_serve
    from .bench.cli import configure as configure_bench
    configure_serve(sub.add_parser("serve", help="OpenAI-compatible HTTP server (pip install tinyvllm[server])",
                                   formatter_class=HelpFormatter))
    configure_bench(sub.add_parser("bench", help="throughput/latency benchmark, offline or against a server URL",
                                   formatter_class=HelpFormatter))
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        return a.func(a) if hasattr(a, "func") else {"generate": _generate, "chat": _chat,
                                                        "perplexity": _perplexity}[a.command](a)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"tinyvllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: stop quietly with the shell's status for SIGINT, no traceback
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
