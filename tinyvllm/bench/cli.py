"""`tinyvllm bench`: arguments only at import time; the engine, httpx and matplotlib load when it runs.

    tinyvllm bench --num-prompts 64 --input-len 32-256 --output-len 64-128 --ignore-eos      # offline
    tinyvllm bench --memory-budget 128MB,256MB,512MB                                         # budget sweep
    tinyvllm bench --url http://127.0.0.1:8000 --max-concurrency 1,4,16 --plot bench.png     # any server
"""
import argparse
import gc
import json
import math
from pathlib import Path

from ..engine_args import EngineArgs


def _int_list(value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"need integers separated by commas, got {value!r}") from None
    if min(out) < 1:
        raise argparse.ArgumentTypeError("concurrency must be at least 1")
    return out


def configure(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.add_argument("--url", default=None, help="benchmark a running OpenAI-compatible server instead of the engine")
    p.add_argument("--served-model-name", default=None, help="--url: the `model` field (default: /v1/models)")
    p.add_argument("--api-key", default=None, help="--url: sent as 'Authorization: Bearer KEY'")
    p.add_argument("--server-pid", type=int, default=None, help="--url: report this process's peak RSS")
    p.add_argument("--num-prompts", type=int, default=64, help="requests (with --dataset: its first N)")
    p.add_argument("--input-len", default="128", help="prompt tokens, a number or a range like 32-256")
    p.add_argument("--output-len", default="128",
                   help="max_tokens of each request, a number or a range (a workload, hence vLLM bench's name)")
    p.add_argument("--dataset", default=None, help="JSONL of {\"prompt\": ..., \"max_tokens\": ...} instead of "
                                                   "random token prompts")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second, Poisson arrivals (default inf: all at once)")
    p.add_argument("--max-concurrency", type=_int_list, default=None,
                   help="requests in flight at most; a comma list (1,4,16) sweeps it")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly max_tokens per request")
    p.add_argument("--output-json", default=None)
    p.add_argument("--output-md", default=None)
    p.add_argument("--plot", default=None, help="PNG: latency CDFs and throughput vs concurrency")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    # offline: the engine to run; --url: only --model (and --tokenizer) count, for prompts and token counts
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=run)


def _workload(a, tokenizer, vocab_size: int, salt: int):
    from .workload import load_dataset, parse_range, random_workload
    out_len = parse_range(a.output_len)
    if a.dataset:
        return load_dataset(a.dataset, tokenizer, out_len, a.num_prompts, a.seed)
    return random_workload(a.num_prompts, parse_range(a.input_len), out_len, vocab_size, a.seed, salt)


def _run_name(a, budget, conc) -> str:
    parts = ([f"budget {budget}"] if budget else []) + ([f"concurrency {conc}"] if conc else [])
    return ", ".join(parts) or ("server" if a.url else "offline")


def _offline_runs(a, offsets_for, progress_for) -> list[dict]:
    from ..engine import LLMEngine
    from .offline import peak_rss_bytes, peak_rss_reset, run_offline
    from .stats import summarize
    runs = []
    for budget in (a.memory_budget.split(",") if a.memory_budget else [None]):
        engine = None
        gc.collect()  # the previous budget's engine (and its KV pool) goes before the next one loads
        peak_rss_reset()
        args = EngineArgs.from_cli_args(a)
        args.memory_budget = budget
        try:
            engine = LLMEngine(args.model, **args.engine_kwargs())
        except (ValueError, MemoryError, RuntimeError) as e:  # a budget too small for the weights is a result
            runs += [{"name": _run_name(a, budget, c), "memory_budget": budget, "max_concurrency": c, "error": str(e)}
                     for c in a.max_concurrency or [None]]
            continue
        for k, conc in enumerate(a.max_concurrency or [None]):
            workload = _workload(a, engine.tokenizer, engine.config.vocab_size, salt=k)
            peak_rss_reset()
            name = _run_name(a, budget, conc)
            results, duration, info = run_offline(engine, workload, offsets_for(workload), conc, a.ignore_eos,
                                                  progress_for(name, workload))
            runs.append({"name": name, "memory_budget": budget, "max_concurrency": conc, **summarize(results, duration),
                         **info, "peak_rss_mb": peak_rss_bytes() / 1e6, "kv_blocks": engine.scheduler.blocks.num_blocks,
                         "max_model_len": engine.max_model_len})
    return runs


def _url_runs(a, offsets_for, progress_for) -> list[dict]:
    import asyncio
    from ..model import load_model, resolve_model
    from ..tokenizer import Tokenizer
    from .client import run_url
    from .offline import peak_rss_bytes
    from .stats import summarize
    w = load_model(resolve_model(a.model))  # memory-mapped: only the tokenizer and the vocabulary size are read
    tokenizer = (Tokenizer.from_dir(a.tokenizer) if a.tokenizer else
                 Tokenizer.from_gguf_metadata(w.metadata) if w.kind == "gguf" else Tokenizer.from_dir(w.path))
    runs = []
    for k, conc in enumerate(a.max_concurrency or [None]):
        workload = _workload(a, tokenizer, w.config.vocab_size, salt=k)
        name = _run_name(a, None, conc)
        results, duration, info = asyncio.run(run_url(
            a.url, workload, offsets_for(workload), conc, tokenizer=tokenizer, ignore_eos=a.ignore_eos,
            progress=progress_for(name, workload), model=a.served_model_name, api_key=a.api_key))
        rss = peak_rss_bytes(a.server_pid) if a.server_pid else None
        runs.append({"name": name, "max_concurrency": conc, **summarize(results, duration), **info,
                     "peak_rss_mb": None if rss is None else rss / 1e6})
    return runs


def _finite(x):
    """JSON has no Infinity or NaN (json.dumps would write them anyway, and strict parsers refuse the
    file): a non-finite number (--request-rate inf: all at once; a rate over zero seconds) becomes null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def run(a) -> int:
    from .progress import Progress
    from .report import markdown, plot
    from ..engine.memory import parse_bytes
    from .workload import arrival_offsets, parse_range
    if a.url:
        offline_only = [f"--{k.replace('_', '-')}" for k, v in vars(EngineArgs.from_cli_args(a)).items()
                        if k not in ("model", "tokenizer", "seed") and v != getattr(EngineArgs, k)]
        if offline_only:
            raise ValueError(f"{', '.join(offline_only)}: engine arguments are for offline runs; "
                             "give them to the server")
    # Bad arguments fail here, before a model loads.
    if a.num_prompts < 1:
        raise ValueError("--num-prompts must be at least 1")
    parse_range(a.input_len), parse_range(a.output_len), arrival_offsets(1, a.request_rate, a.seed)
    [parse_bytes(b) for b in (a.memory_budget or "0").split(",")]
    if a.dataset and not Path(a.dataset).is_file():
        raise FileNotFoundError(f"--dataset {a.dataset}: no such file")
    offsets_for = lambda wl: arrival_offsets(len(wl), a.request_rate, a.seed)
    progress_for = lambda name, wl: Progress(len(wl), name, enabled=not a.no_progress)
    runs = (_url_runs if a.url else _offline_runs)(a, offsets_for, progress_for)
    config = {k: v for k, v in vars(a).items() if k != "func"}
    if config.get("api_key") is not None:  # a report gets shared: the secret stays out of it
        config["api_key"] = "<redacted>"
    report = {"mode": "url" if a.url else "offline", "url": a.url, "model": a.model, "config": config, "runs": runs}
    table = markdown(runs)
    print(table)
    if a.output_md:
        Path(a.output_md).write_text(table)
    if a.output_json:
        Path(a.output_json).write_text(json.dumps(_finite(report), indent=1, default=str, allow_nan=False))
    if a.plot:
        plot(runs, a.plot)
    return 0 if any(not r.get("error") and r["completed"] for r in runs) else 1
