"""The `tinyvllm` command: generate, chat (interactive when stdin is a terminal) and perplexity."""
import argparse
import sys

from .model.fetch import DEFAULT_MODEL
from .sampling_params import SamplingParams


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"alias, GGUF file, HF directory or HF repo id (default: {DEFAULT_MODEL})")
    p.add_argument("--threads", "-t", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--memory-budget", default=None, help="total bytes for weights + KV + workspace, e.g. 512MB")
    p.add_argument("--device", default="cpu", help="cpu (native core) or tinygrad[:DEV] (pip install tinyvllm[gpu])")
    p.add_argument("--max-tokens", "-n", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _params(a) -> SamplingParams:
    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                          min_p=a.min_p, repetition_penalty=a.repetition_penalty, seed=a.seed, stop=a.stop)


def _llm(a):
    from .llm import LLM  # loads the native core: only when a command really runs
    return LLM(a.model, threads=a.threads, memory_budget=a.memory_budget, device=a.device)


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
    from .bench.progress import Progress
    from .engine import LLMEngine
    from .perplexity import perplexity, windows
    with open(a.file, encoding="utf-8") as f:
        text = f.read()
    rows = a.batch_size or min(a.ctx, 128)
    engine = LLMEngine(a.model, threads=a.threads, memory_budget=a.memory_budget, device=a.device,
                       max_model_len=a.ctx + 1, max_num_seqs=rows, max_num_batched_tokens=max(rows, a.ctx))
    n_windows = len(windows(engine.tokenizer.encode(text), a.ctx, a.stride))
    bar = Progress(n_windows, "perplexity", enabled=not a.quiet, unit="windows")
    result = perplexity(engine, text, a.ctx, a.stride, bar)
    bar.close()
    print(f"perplexity of {a.file}: ctx {a.ctx}, " + (f"stride {a.stride}" if a.stride else
                                                        "non-overlapping windows, second halves scored"))
    print(f"PPL = {result.ppl:.4f} +/- {result.stderr:.5f}")
    print(f"tokens scored: {result.tokens_scored} in {result.num_windows} windows")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tinyvllm", description="A tiny vLLM for edge devices")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="complete raw text prompts")
    g.add_argument("prompt", nargs="*", help="prompt(s); read from stdin when none")
    g.add_argument("--no-stream", action="store_true", help="print each full answer at the end")
    _add_common(g)
    c = sub.add_parser("chat", help="chat with the model's chat template")
    c.add_argument("--message", default=None, help="ask one question and exit")
    c.add_argument("--system", default=None, help="system prompt (default: the template's own)")
    _add_common(c)
    pp = sub.add_parser("perplexity", help="perplexity of a text file, computed as llama.cpp's llama-perplexity")
    pp.add_argument("--model", "-m", default=DEFAULT_MODEL, help="alias, GGUF file, HF directory or HF repo id")
    pp.add_argument("--file", "-f", required=True, help="plain text file to score")
    pp.add_argument("--ctx", "-c", type=int, default=512, help="window length in tokens (default 512)")
    pp.add_argument("--stride", type=int, default=0,
                    help="0 (default): non-overlapping windows, second half scored; S: a window every S tokens, "
                         "its last S tokens scored (llama-perplexity --ppl-stride)")
    pp.add_argument("--batch-size", "-b", type=int, default=None,
                    help="prompt positions scored per step (default min(ctx, 128)); the memory plan pays for them")
    pp.add_argument("--threads", "-t", type=int, default=None)
    pp.add_argument("--memory-budget", default=None)
    pp.add_argument("--device", default="cpu")
    pp.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    # serve and bench live in their own packages; configure() only adds arguments (no heavy imports)
    from .server.cli import configure as configure_serve
    from .bench.cli import configure as configure_bench
    configure_serve(sub.add_parser("serve", help="OpenAI-compatible HTTP server (pip install tinyvllm[server])"))
    configure_bench(sub.add_parser("bench", help="throughput/latency benchmark, offline or against a server URL"))
    a = ap.parse_args(argv)
    try:
        return a.func(a) if hasattr(a, "func") else {"generate": _generate, "chat": _chat,
                                                        "perplexity": _perplexity}[a.command](a)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"tinyvllm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
