"""Serving benchmark: paged KV memory, continuous vs static vs sequential batching, and llama.cpp.

One run on the reference model, each configuration in its own child process (fair peak RSS):

- memory: under one KV budget (default 64 MiB of fp16 KV), how many sequences the paged engine
  holds at once (peak of `scheduler.running`, `max_num_seqs` 256) vs a max-length preallocation
  (budget / (max_model_len x KV bytes per token) sequences).
- throughput: a fixed workload (64 requests, prompts uniform 32-512 ordinary token ids, outputs
  uniform 32-256 tokens, ignore_eos, greedy, all arriving at t=0) served by
  continuous batching (LLMEngine add_request/step), static batching (groups of 16 run to
  completion one after another), sequential (one request at a time, on a subset, extrapolated),
  and llama.cpp sequential (same subset, llama-cpp-python low-level API, one context).
- 16-stream decode: 16 sequences of 128 prompt + 128 output tokens, aggregate decode tok/s, for
  tinyvllm and llama.cpp (low-level llama_batch, n_seq_max 16): llama-batched-bench's shape.

    .venv-bench/bin/python benchmarks/bench_serving.py            # about 5-10 minutes (quiet machine!)
    .venv-bench/bin/python benchmarks/bench_serving.py --quick    # smoke test, under 2 minutes

By default tinyvllm is imported from this checkout (newest build*/libtinyvllm.so; TINYVLLM_LIB
overrides); --installed uses the copy pip installed into the environment instead.
"""
import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402
from bench_engines import peak_rss, rss_now  # noqa: E402

MODEL = "smollm2-135m"
MAX_MODEL_LEN = 2048
FACTS_LLAMA_BATCHED_B16 = 297.0  # tok/s, llama-batched-bench 128+128, B=16 (/work/shared/FACTS.md)


# ---- the workload --------------------------------------------------------------------------------
def make_workload(n: int, vocab: int, seed: int, prompt=(32, 512), output=(32, 256)) -> list[dict]:
    """n requests: prompt lengths and output lengths uniform in the ranges, prompts made of fixed
    pseudo-random ordinary token ids (past the first 256: no special tokens), distinct per request."""
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        p, o = rng.randint(*prompt), rng.randint(*output)
        r = random.Random(seed * 1000003 + i)
        reqs.append({"prompt_token_ids": [r.randrange(256, vocab) for _ in range(p)], "max_tokens": o})
    return reqs


def pct(xs, q):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (k - lo)


# ---- tinyvllm (in a child process) ---------------------------------------------------------------
def tv_engine(args, **kw):
    from tinyvllm import LLM
    from tinyvllm import _native
    llm = LLM(args.model_path, threads=args.threads, max_model_len=MAX_MODEL_LEN,
              enable_prefix_caching=True, **kw)  # the default: prompts are distinct, so it only serves preemption recompute
    info = {"lib": str(_native.LIB_PATH), "kernel_path": _native.ffi.string(_native.lib.tv_kernel_path()).decode(),
            "version": _native.ffi.string(_native.lib.tv_version()).decode()}
    return llm.engine, info


def tv_warmup(engine, vocab):
    from tinyvllm import SamplingParams
    engine.add_request("warmup", {"prompt_token_ids": list(range(300, 300 + 64))},
                       SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()


def tv_serve(engine, reqs, group: int | None, t0: float, track=None) -> dict:
    """Serve `reqs` (all arrived at t0). group=None: all added at once (continuous batching);
    group=k: k at a time, the next k only when the whole group finished (static batching)."""
    from tinyvllm import SamplingParams
    groups = [reqs] if not group else [reqs[i:i + group] for i in range(0, len(reqs), group)]
    done, steps, p0 = {}, 0, engine.scheduler.num_preemptions
    best_step_tok_s = 0.0  # the fastest any step of >= 256 tokens moved tokens through the model
    for g in groups:
        for i, r in enumerate(g):
            engine.add_request(f"r{len(done) + i}", {"prompt_token_ids": r["prompt_token_ids"]},
                               SamplingParams(max_tokens=r["max_tokens"], temperature=0, ignore_eos=True), arrival_time=t0)
        while engine.has_unfinished_requests():
            n0, ts = engine.num_scheduled_tokens, time.perf_counter()
            outs = engine.step()
            n, dt = engine.num_scheduled_tokens - n0, time.perf_counter() - ts
            if n >= 256:
                best_step_tok_s = max(best_step_tok_s, n / dt)
            steps += 1
            if track:
                track(engine)
            for o in outs:
                if o.finished:
                    done[o.request_id] = o
    wall = time.monotonic() - t0
    outs = [done[f"r{i}"] for i in range(len(reqs))]
    assert all(len(o.outputs[0].token_ids) == r["max_tokens"] for o, r in zip(outs, reqs)), "wrong output lengths"
    return {"wall_s": wall, "steps": steps, "preemptions": engine.scheduler.num_preemptions - p0,
            "best_step_tok_s": best_step_tok_s,
            "requests": [{"prompt": len(r["prompt_token_ids"]), "output": len(o.outputs[0].token_ids),
                          "ttft": o.metrics.ttft, "tpot": o.metrics.tpot, "e2e": o.metrics.e2e,
                          "itl": o.metrics.itl} for o, r in zip(outs, reqs)]}


def child_tinyvllm(args, reqs) -> dict:
    mode = args.mode
    if mode == "memory":
        budget = args.kv_budget_mib * 2**20
        engine, info = tv_engine(args, kv_cache_bytes=budget, max_num_seqs=256, max_num_batched_tokens=512)
        peak = {"running": 0, "blocks_used": 0, "tokens_in_running": 0}
        running_per_step = []

        def track(e):
            n = len(e.scheduler.running)
            running_per_step.append(n)
            peak["running"] = max(peak["running"], n)
            peak["blocks_used"] = max(peak["blocks_used"], e.scheduler.blocks.num_blocks - e.scheduler.blocks.num_free_blocks)
            peak["tokens_in_running"] = max(peak["tokens_in_running"], sum(len(s) for s in e.scheduler.running))
        tv_warmup(engine, args.vocab)
        res = tv_serve(engine, reqs, None, time.monotonic(), track)
        res.update(peak=peak, mean_running=statistics.mean(running_per_step), num_blocks=engine.scheduler.blocks.num_blocks,
                   block_size=engine.scheduler.blocks.block_size, kv_cache_bytes=budget, max_model_len=engine.max_model_len)
    elif mode == "decode16":
        from tinyvllm import SamplingParams
        engine, info = tv_engine(args, max_num_seqs=args.streams, max_num_batched_tokens=512)
        tv_warmup(engine, args.vocab)
        ids = make_workload(args.streams, args.vocab, 7, (128, 128), (1, 1))
        for i, r in enumerate(ids):
            engine.add_request(f"d{i}", {"prompt_token_ids": r["prompt_token_ids"]},
                               SamplingParams(max_tokens=args.decode_tokens + 1, temperature=0, ignore_eos=True))
        t = time.perf_counter()
        while any(not s.output_token_ids for s in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()
        prefill_s = time.perf_counter() - t
        assert len(engine.scheduler.running) == args.streams
        t, steps = time.perf_counter(), 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        res = {"prefill_s": prefill_s, "decode_s": time.perf_counter() - t, "decode_steps": steps,
               "streams": args.streams, "prompt": 128, "decode_tokens": args.decode_tokens}
        res["decode_tok_s"] = args.streams * steps / res["decode_s"]
    else:
        max_seqs = 1 if mode == "sequential" else args.max_num_seqs
        kv = 256 * 2**20
        engine, info = tv_engine(args, max_num_seqs=max_seqs, max_num_batched_tokens=512, kv_cache_bytes=kv)
        tv_warmup(engine, args.vocab)
        if mode == "sequential":  # one request at a time, each timed from its own start (no queueing)
            rs = []
            for i, r in enumerate(reqs[:args.subset]):
                rs += tv_serve(engine, [r], None, time.monotonic())["requests"]
            res = {"requests": rs, "preemptions": 0}
        else:
            res = tv_serve(engine, reqs, args.group if mode == "static" else None, time.monotonic())
        res.update(max_num_seqs=max_seqs, max_num_batched_tokens=512, kv_cache_bytes=kv)
    res["info"] = info
    return res


# ---- llama.cpp (in a child process): the low-level llama_batch API --------------------------------
class LlamaLow:
    def __init__(self, path, threads, n_seq, n_ctx):
        import ctypes
        import llama_cpp as L
        import numpy as np
        self.L, self.np, self.ct = L, np, ctypes
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, 512, 512, n_seq
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed")
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(512, 0, 1)
        self.info = {"version": L.__version__, "n_seq_max": n_seq, "n_ctx": n_ctx, "kv_unified": True,
                     "system_info": L.llama_print_system_info().decode().strip()}

    def clear(self):
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def decode(self, items) -> list[int]:
        """items: (token, pos, seq_id, want_logits) tuples (at most 512); greedy tokens of the wanted rows."""
        b = self.batch
        b.n_tokens = len(items)
        for i, (tok, pos, seq, want) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, int(want)
            b.seq_id[i][0] = seq
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        out = []
        for i, it in enumerate(items):
            if it[3]:
                p = self.L.llama_get_logits_ith(self.ctx, i)
                out.append(int(self.np.argmax(self.np.ctypeslib.as_array(p, shape=(self.vocab,)))))
        return out

    def prefill(self, seqs: dict[int, list[int]]) -> dict[int, int]:
        """Prompts of several sequences packed into batches of <= 512 tokens; first token of each."""
        items = [(t, p, s, p == len(ids) - 1) for s, ids in seqs.items() for p, t in enumerate(ids)]
        first, owners = {}, [it[2] for it in items if it[3]]
        for i in range(0, len(items), 512):
            chunk = items[i:i + 512]
            toks = self.decode(chunk)
            for tok, it in zip(toks, [c for c in chunk if c[3]]):
                first[it[2]] = tok
        assert set(first) == set(owners)
        return first


def child_llama(args, reqs) -> dict:
    if args.mode == "sequential":
        eng = LlamaLow(args.model_path, args.threads, 1, MAX_MODEL_LEN)
        eng.prefill({0: list(range(300, 364))})  # warm-up
        eng.clear()
        rs = []
        for r in reqs[:args.subset]:
            ids, n = r["prompt_token_ids"], r["max_tokens"]
            eng.clear()
            t0 = time.monotonic()
            tok = eng.prefill({0: ids})[0]
            times = [time.monotonic()]
            for k in range(n - 1):
                tok = eng.decode([(tok, len(ids) + k, 0, True)])[0]
                times.append(time.monotonic())
            itl = [b - a for a, b in zip(times, times[1:])]
            rs.append({"prompt": len(ids), "output": n, "ttft": times[0] - t0,
                       "tpot": sum(itl) / len(itl) if itl else None, "e2e": times[-1] - t0, "itl": itl})
        res = {"requests": rs, "info": eng.info}
    else:  # decode16: B streams of 128 + decode_tokens, llama-batched-bench's shape
        B, n = args.streams, args.decode_tokens
        eng = LlamaLow(args.model_path, args.threads, B, B * (128 + n + 16))
        eng.prefill({0: list(range(300, 364))})
        eng.clear()
        prompts = make_workload(B, args.vocab, 7, (128, 128), (1, 1))
        t = time.perf_counter()
        toks = eng.prefill({s: r["prompt_token_ids"] for s, r in enumerate(prompts)})
        prefill_s = time.perf_counter() - t
        t = time.perf_counter()
        for k in range(n):
            new = eng.decode([(toks[s], 128 + k, s, True) for s in range(B)])
            toks = dict(enumerate(new))
        dt = time.perf_counter() - t
        res = {"prefill_s": prefill_s, "decode_s": dt, "decode_steps": n, "streams": B, "prompt": 128,
               "decode_tokens": n, "decode_tok_s": B * n / dt, "info": eng.info}
    return res


def child(args) -> dict:
    rss0 = rss_now()
    reqs = make_workload(args.n_requests, args.vocab, args.seed)
    res = (child_tinyvllm if args.engine == "tinyvllm" else child_llama)(args, reqs)
    res.update(engine=args.engine, mode=args.mode, rss_base=rss0, rss_peak=peak_rss())
    return res


# ---- the parent ----------------------------------------------------------------------------------
def run_child(engine, mode, args, model_path, vocab) -> dict | None:
    cmd = [sys.executable, __file__, "--child", "--engine", engine, "--mode", mode, "--model-path", str(model_path),
           "--vocab", str(vocab), "--threads", str(args.threads), "--n-requests", str(args.n_requests),
           "--seed", str(args.seed), "--subset", str(args.subset), "--group", str(args.group),
           "--max-num-seqs", str(args.max_num_seqs), "--streams", str(args.streams),
           "--decode-tokens", str(args.decode_tokens), "--kv-budget-mib", str(args.kv_budget_mib)]
    cmd += ["--installed"] if args.installed else []
    t = time.perf_counter()

    def reference_failed(msg):  # llama.cpp is a reference: report its failure, keep the run
        print(msg, file=sys.stderr)
        return {"engine": engine, "mode": mode, "error": msg[-1500:]}
    res = machine.child_result(cmd, f"{engine} {mode} child", **({"fail": reference_failed} if engine == "llama.cpp" else {}))
    res["child_wall_s"] = time.perf_counter() - t
    return res


def summarize(res, reqs, extrapolate: bool) -> dict:
    """Rates of a served workload. Sequential runs (a subset, no queueing) are extrapolated to the
    whole workload: prefill s/token = sum(ttft) / sum(prompt), decode s/token = sum(e2e - ttft) /
    sum(output - 1), then time = sum over all requests of prompt x prefill + (output - 1) x decode."""
    rs = res["requests"]
    s = {"ttft_p50_s": pct([r["ttft"] for r in rs], 50), "ttft_p99_s": pct([r["ttft"] for r in rs], 99),
         "tpot_p50_s": pct([r["tpot"] for r in rs], 50), "tpot_p99_s": pct([r["tpot"] for r in rs], 99),
         "itl_p50_s": pct([x for r in rs for x in r["itl"]], 50), "itl_p99_s": pct([x for r in rs for x in r["itl"]], 99),
         "measured_requests": len(rs), "preemptions": res.get("preemptions"), "rss_peak_bytes": res["rss_peak"]}
    out_all = sum(r["max_tokens"] for r in reqs)
    in_all = sum(len(r["prompt_token_ids"]) for r in reqs)
    if extrapolate:
        pre = sum(r["ttft"] for r in rs) / sum(r["prompt"] for r in rs)
        dec = sum(r["e2e"] - r["ttft"] for r in rs) / max(1, sum(r["output"] - 1 for r in rs))
        wall = sum(len(r["prompt_token_ids"]) * pre + (r["max_tokens"] - 1) * dec for r in reqs)
        s.update(extrapolated=True, prefill_s_per_token=pre, decode_s_per_token=dec,
                 measured_wall_s=sum(r["e2e"] for r in rs))
    else:
        wall = res["wall_s"]
        s.update(extrapolated=False, steps=res["steps"])
    s.update(wall_s=wall, output_tok_s=out_all / wall, total_tok_s=(out_all + in_all) / wall)
    return s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-requests", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-seqs", type=int, default=32, help="continuous batching's max_num_seqs")
    ap.add_argument("--group", type=int, default=16, help="static batching's group size")
    ap.add_argument("--subset", type=int, default=8, help="requests the sequential runs measure")
    ap.add_argument("--streams", type=int, default=16, help="streams of the batched decode test")
    ap.add_argument("--decode-tokens", type=int, default=128, help="tokens per stream, batched decode test")
    ap.add_argument("--kv-budget-mib", type=int, default=64, help="KV budget of the memory test")
    ap.add_argument("--no-llama", action="store_true", help="skip llama.cpp")
    ap.add_argument("--quick", action="store_true", help="smoke test: 8 requests, groups of 4, subset 2, 16 decode steps")
    ap.add_argument("--installed", action="store_true", help="use the installed tinyvllm, not this checkout")
    ap.add_argument("--out-dir", type=Path, default=machine.DOCS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--model-path", help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    machine.use_source_tree(args.installed)
    if args.child:
        machine.print_result(child(args))
        return
    if args.quick:
        args.n_requests, args.subset, args.decode_tokens, args.group = 8, 2, 16, 4
        args.max_num_seqs = min(args.max_num_seqs, 8)

    from gguf import GGUFReader
    from tinyvllm.model import resolve_model
    model_path = resolve_model(MODEL)
    fields = GGUFReader(str(model_path)).fields
    vocab = len(fields["tokenizer.ggml.tokens"].data)
    reqs = make_workload(args.n_requests, vocab, args.seed)
    info = machine.machine_info()
    load = machine.OtherLoad()
    print(f"model {model_path}\nthreads {args.threads}, {args.n_requests} requests, load {info['loadavg_at_start']}")

    plan = [("tinyvllm", "memory"), ("tinyvllm", "continuous"), ("tinyvllm", "static"), ("tinyvllm", "sequential"),
            ("tinyvllm", "decode16")]
    if not args.no_llama:
        plan += [("llama.cpp", "sequential"), ("llama.cpp", "decode16")]
    runs = {}
    for engine, mode in plan:
        r = runs[f"{engine}/{mode}"] = run_child(engine, mode, args, model_path, vocab)
        print(f"  {engine:9s} {mode:10s} done in {r.get('child_wall_s', 0):6.1f} s"
              + (f"  (FAILED)" if "error" in r else f"  peak RSS {r['rss_peak'] / 2**20:.0f} MiB"))

    # ---- memory --------------------------------------------------------------------------------
    m = runs["tinyvllm/memory"]
    # bytes per token of fp16 KV: 2 (K and V) x layers x kv heads x head dim x 2 bytes
    n_layer = int(_field(fields, "llama.block_count"))
    n_kv = int(_field(fields, "llama.attention.head_count_kv"))
    n_head = int(_field(fields, "llama.attention.head_count"))
    head_dim = int(_field(fields, "llama.embedding_length")) // n_head
    kv_per_token = 2 * n_layer * n_kv * head_dim * 2
    budget = m["kv_cache_bytes"]
    prealloc = budget // (MAX_MODEL_LEN * kv_per_token)
    memory = {"kv_budget_bytes": budget, "kv_bytes_per_token": kv_per_token, "max_model_len": MAX_MODEL_LEN,
              "prealloc_max_seqs": prealloc, "prealloc_max_seqs_fractional": budget / (MAX_MODEL_LEN * kv_per_token),
              "paged_num_blocks": m["num_blocks"], "block_size": m["block_size"], "paged_peak_running": m["peak"]["running"],
              "paged_mean_running": m["mean_running"], "paged_peak_blocks_used": m["peak"]["blocks_used"],
              "paged_peak_tokens_in_running": m["peak"]["tokens_in_running"], "preemptions": m["preemptions"],
              "ratio": m["peak"]["running"] / prealloc if prealloc else None,
              "rss_peak_bytes": m["rss_peak"], "wall_s": m["wall_s"]}
    memory["serving"] = summarize(m, reqs, False)

    # ---- throughput ----------------------------------------------------------------------------
    thr = {"tinyvllm continuous": summarize(runs["tinyvllm/continuous"], reqs, False),
           "tinyvllm static": summarize(runs["tinyvllm/static"], reqs, False),
           "tinyvllm sequential": summarize(runs["tinyvllm/sequential"], reqs, True)}
    lc_seq = runs.get("llama.cpp/sequential")
    if lc_seq and "error" not in lc_seq:
        thr["llama.cpp sequential"] = summarize(lc_seq, reqs, True)
    cont, stat, seq = (thr[f"tinyvllm {k}"]["output_tok_s"] for k in ("continuous", "static", "sequential"))
    tv16 = runs["tinyvllm/decode16"]
    lc16 = runs.get("llama.cpp/decode16")
    lc16_ok = bool(lc16 and "error" not in lc16)
    decode16 = {"tinyvllm_tok_s": tv16["decode_tok_s"], "tinyvllm": tv16,
                "llama_cpp_tok_s": lc16["decode_tok_s"] if lc16_ok else FACTS_LLAMA_BATCHED_B16,
                "llama_cpp_measured_in_this_run": lc16_ok, "llama_cpp": lc16}
    decode16["ratio"] = decode16["tinyvllm_tok_s"] / decode16["llama_cpp_tok_s"]
    # The ceiling of continuous vs sequential on this workload: batching cannot beat running every
    # prompt and output token through the model once at the best rate any continuous step reached.
    tokens_all = sum(len(r["prompt_token_ids"]) + r["max_tokens"] - 1 for r in reqs)  # the last token is never fed back
    best_rate = runs["tinyvllm/continuous"]["best_step_tok_s"]
    ceiling = thr["tinyvllm sequential"]["wall_s"] / (tokens_all / best_rate) if best_rate else None
    speedups = {"continuous_vs_static": cont / stat, "continuous_vs_sequential": cont / seq,
                "continuous_vs_sequential_ceiling": ceiling, "best_step_tok_s": best_rate, "tokens_through_model": tokens_all,
                "continuous_vs_llama_cpp_sequential": cont / thr["llama.cpp sequential"]["output_tok_s"]
                if "llama.cpp sequential" in thr else None,
                "decode16_vs_llama_cpp_batched": decode16["ratio"], "memory_paged_vs_prealloc": memory["ratio"]}

    data = {"model": str(model_path), "threads": args.threads, "quick": args.quick, "seed": args.seed,
            "workload": {"n_requests": args.n_requests, "prompt_range": [32, 512], "output_range": [32, 256],
                         "prompt_tokens": sum(len(r["prompt_token_ids"]) for r in reqs),
                         "output_tokens": sum(r["max_tokens"] for r in reqs), "arrival": "all at t=0",
                         "sampling": "greedy, ignore_eos", "prefix_caching": True,
                         "continuous_max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": 512,
                         "static_group": args.group, "sequential_subset": args.subset},
            "machine": info, "memory": memory, "throughput": thr, "decode16": decode16, "speedups": speedups,
            "tinyvllm_info": runs["tinyvllm/continuous"]["info"],
            "llama_cpp_info": (lc16 or {}).get("info") or (lc_seq or {}).get("info"),
            "raw": {k: {kk: vv for kk, vv in v.items() if kk != "requests"} for k, v in runs.items()},
            "raw_requests": {k: v.get("requests") for k, v in runs.items()},
            "loadavg_at_end": os.getloadavg(), "other_cpu_share": load.share()}
    machine.write_outputs("serving", data, markdown(data), args.out_dir)


def _field(fields, key):
    f = fields[key]
    return f.parts[f.data[0]][0]


def _ms(x):
    return "-" if x is None else f"{x * 1e3:.0f}"


def markdown(d) -> str:
    m, w, thr, sp, d16 = d["memory"], d["workload"], d["throughput"], d["speedups"], d["decode16"]
    cpu, tv = d["machine"]["cpu"], d["tinyvllm_info"]
    other = "?" if d["other_cpu_share"] is None else f"{d['other_cpu_share']:.0%}"
    mib = 2**20
    mem_rows = [
        ["KV budget", f"{m['kv_budget_bytes'] / mib:.0f} MiB fp16 ({m['kv_bytes_per_token'] / 1024:.1f} KiB/token, "
                      f"{m['kv_budget_bytes'] // m['kv_bytes_per_token']} tokens)"],
        [f"max-length preallocation ({m['max_model_len']} tokens/seq)",
         f"**{m['prealloc_max_seqs']}** sequences ({m['prealloc_max_seqs_fractional']:.2f})"],
        ["paged engine: peak running sequences", f"**{m['paged_peak_running']}** (mean {m['paged_mean_running']:.1f} per step)"],
        ["paged engine: peak KV blocks used", f"{m['paged_peak_blocks_used']} of {m['paged_num_blocks']} "
                                              f"(block {m['block_size']} tokens); peak tokens held {m['paged_peak_tokens_in_running']}"],
        ["paged engine: preemptions", m["preemptions"]],
        ["ratio paged / preallocation", f"**{m['ratio']:.1f}x**" if m["ratio"] else "-"],
        ["paged engine: output tok/s, peak RSS", f"{m['serving']['output_tok_s']:.1f}, {m['rss_peak_bytes'] / mib:.0f} MiB"],
    ]
    labels = {"tinyvllm continuous": f"tinyvllm continuous (max_num_seqs {w['continuous_max_num_seqs']})",
              "tinyvllm static": f"tinyvllm static (groups of {w['static_group']})",
              "tinyvllm sequential": f"tinyvllm sequential (*{w['sequential_subset']} requests, extrapolated*)",
              "llama.cpp sequential": f"llama.cpp sequential (*{w['sequential_subset']} requests, extrapolated*)"}
    rows = []
    for k, s in thr.items():
        rows.append([labels[k], f"{s['output_tok_s']:.1f}", f"{s['total_tok_s']:.1f}", f"{s['wall_s']:.1f}",
                     _ms(s["ttft_p50_s"]), _ms(s["ttft_p99_s"]), _ms(s["tpot_p50_s"]), _ms(s["tpot_p99_s"]),
                     _ms(s["itl_p99_s"]), s["preemptions"] if s["preemptions"] is not None else "-",
                     f"{s['rss_peak_bytes'] / mib:.0f}"])
    lc16 = "measured in this run" if d16["llama_cpp_measured_in_this_run"] else \
        "**NOT measured in this run**: FACTS.md's llama-batched-bench figure (B=16, 128+128)"
    t16 = d16["tinyvllm"]
    sp_rows = [
        ["continuous vs static batching (output tok/s)", f"{sp['continuous_vs_static']:.2f}x", "-"],
        ["continuous vs sequential (output tok/s)", f"{sp['continuous_vs_sequential']:.2f}x (ceiling "
         + (f"{sp['continuous_vs_sequential_ceiling']:.2f}x" if sp.get("continuous_vs_sequential_ceiling") else "-")
         + ", see below)", ">= 5x"],
        ["continuous vs llama.cpp sequential", f"{sp['continuous_vs_llama_cpp_sequential']:.2f}x"
         if sp["continuous_vs_llama_cpp_sequential"] else "-", "-"],
        [f"{t16['streams']}-stream decode: tinyvllm {d16['tinyvllm_tok_s']:.1f} vs llama.cpp "
         f"{d16['llama_cpp_tok_s']:.1f} tok/s ({lc16})", f"{sp['decode16_vs_llama_cpp_batched']:.2f}x", ">= 2x"],
        ["KV capacity: paged vs max-length preallocation", f"{sp['memory_paged_vs_prealloc']:.1f}x"
         if sp["memory_paged_vs_prealloc"] else "-", ">= 2x"],
    ]
    lines = [
        "# Serving: paged KV, continuous batching, llama.cpp", "",
        machine.caveats(d["other_cpu_share"], d["quick"] and "shrunken workload") +
        f"{d['machine']['date']} · {cpu.get('model')} · {cpu.get('usable_cpus')} CPUs usable · {d['threads']} threads · "
        f"other processes' CPU share during the run {other} · "
        f"git {d['machine']['git_commit']} · tinyvllm {tv.get('version', '?')} (kernels `{tv.get('kernel_path', '?')}`)", "",
        f"Model `{Path(d['model']).name}`. Workload: {w['n_requests']} requests, prompts uniform "
        f"{w['prompt_range'][0]}-{w['prompt_range'][1]} tokens ({w['prompt_tokens']} in all), outputs uniform "
        f"{w['output_range'][0]}-{w['output_range'][1]} ({w['output_tokens']} in all), all arriving at t=0, "
        f"greedy with ignore_eos, prefix caching on (the engine default; the prompts share no prefix, so it only "
        f"makes the recompute of preempted sequences cheap), max_num_batched_tokens {w['max_num_batched_tokens']}, "
        f"seed {d['seed']}. Each row ran in its own child process.", "",
        "## Targets", "", machine.md_table(["claim", "measured", "target"], sp_rows), "",
        "**Ceiling of continuous vs sequential.** Sequential serving already runs each prompt as one batched "
        "forward, so batching can only speed up the decode part. However requests are batched, every prompt "
        "token and every output token but each request's last passes through the model at least once, and no "
        f"step of the continuous run moved more than {sp['best_step_tok_s']:.0f} tokens/s: that puts the "
        f"continuous run at >= {sp['tokens_through_model']} / {sp['best_step_tok_s']:.0f} s, against the sequential run's "
        f"{thr['tinyvllm sequential']['wall_s']:.0f} s. The ratio of the two is the ceiling in the table; a 5x "
        "target needs a workload with far more output than prompt tokens, or a machine whose batched forward "
        "is much faster per token than its single-sequence decode (a GPU).", "",
        "## Memory: sequences held under one KV budget", "",
        machine.md_table(["", "value"], mem_rows), "",
        "The paged engine ran the whole workload with `max_num_seqs` 256 and `kv_cache_bytes` = the budget; "
        "running sequences and used blocks were sampled after every step.", "",
        "## Throughput and latency (ms)", "",
        machine.md_table(["configuration", "output tok/s", "total tok/s", "wall s", "TTFT p50", "TTFT p99",
                          "TPOT p50", "TPOT p99", "ITL p99", "preemptions", "peak RSS MiB"], rows), "",
        "TTFT counts from t=0 (every request arrived then) for continuous and static batching. The sequential "
        "rows serve only the first few requests, one at a time, each timed from its own start (no queueing): "
        "their TTFT/TPOT are service times, and their tok/s and wall time are extrapolated to the whole workload "
        "from the measured prefill seconds per prompt token and decode seconds per output token.", "",
        f"## {t16['streams']}-stream decode", "",
        f"{t16['streams']} sequences of {t16['prompt']} prompt tokens, then {t16['decode_tokens']} decode steps "
        f"timed with every sequence in the batch: tinyvllm {d16['tinyvllm_tok_s']:.1f} tok/s aggregate "
        f"(prefill of all prompts {t16['prefill_s']:.2f} s); llama.cpp {d16['llama_cpp_tok_s']:.1f} tok/s ({lc16}"
        + (f"; low-level `llama_batch`, one context, n_seq_max {d16['llama_cpp']['info']['n_seq_max']}, unified KV, "
           f"greedy argmax per stream; prefill {d16['llama_cpp']['prefill_s']:.2f} s" if d16["llama_cpp_measured_in_this_run"] else "")
        + ").",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
