"""Throughput and latency under load (issue 15, targets 1-2), on the reference model.

1. Continuous batching vs one request at a time, through the same engine: a decode-heavy chat
   workload (32 requests, prompts 16-96 tokens of English text, outputs 128-192 tokens,
   temperature 0.8 / top-p 0.95 with a seed per request, ignore_eos, all arriving at t=0). The
   sequential run adds a request only when the previous one finished.
2. Aggregate decode tok/s at 1/4/16/32/64 running sequences, and where a step's time goes
   (forward, sampler, scheduler, the rest) - is the per-sequence cost flat?
3. Smooth decode: 8 streams decoding when a 1,536-token prompt arrives; inter-token gaps of the
   streams (p50, p99, worst / median) and throughput with chunking off (the whole prompt in one
   step), today's policy (512-token chunks that stall every decode), vLLM's fixed
   long_prefill_token_threshold, and the decode-priority budget (the default).

Every figure: min / median / max over --repeats runs, each run in its own child process, the load
average read before each run.

    python benchmarks/bench_load.py                        # about 6 minutes on a quiet machine
    python benchmarks/bench_load.py --before /tmp/old      # also the decode sweep of another checkout
    python benchmarks/bench_load.py --quick                # smoke test
"""
import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

MODEL = "smollm2-135m"
CHAT = dict(n=32, prompt=(16, 96), output=(128, 192))
SWEEP = (1, 4, 16, 32, 64)
SMOOTH = dict(streams=8, stream_prompt=64, stream_output=160, long_prompt=1536, long_output=16, arrive_after=24)
POLICIES = {  # name: engine kwargs
    "chunking off": dict(max_num_batched_tokens=2048, decode_stall_ratio=0),
    "today (512-token chunks)": dict(max_num_batched_tokens=512, decode_stall_ratio=0),
    "vLLM long_prefill_token_threshold=64": dict(max_num_batched_tokens=512, decode_stall_ratio=0,
                                                 long_prefill_token_threshold=64),
    "decode priority (default, ratio 3)": dict(max_num_batched_tokens=512),
}


# ---- children ------------------------------------------------------------------------------------
def text_tokens(tok) -> list[int]:
    """English text to cut prompts from: this repository's docs (natural logits, unlike random ids)."""
    root = Path(__file__).resolve().parent.parent
    text = "\n".join(p.read_text() for p in [root / "README.md", root / "docs" / "ARCHITECTURE.md"] if p.exists())
    return tok.encode(text)


def chat_workload(ids: list[int], seed: int, n: int, prompt, output) -> list[dict]:
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        p, o = rng.randint(*prompt), rng.randint(*output)
        start = rng.randrange(0, len(ids) - p)
        reqs.append({"prompt_token_ids": ids[start:start + p], "max_tokens": o, "seed": seed * 1000 + i})
    return reqs


def engine(threads: int, **kw):
    from tinyvllm import LLMEngine
    kw.setdefault("max_num_seqs", 64)
    eng = LLMEngine(MODEL, threads=threads, kv_cache_bytes=256 * 2**20, max_model_len=2048, **kw)
    from tinyvllm import SamplingParams
    eng.add_request("warmup", {"prompt_token_ids": list(range(300, 364))},
                    SamplingParams(max_tokens=4, temperature=0.8, top_p=0.95, seed=1, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    return eng


def params_of(r):
    from tinyvllm import SamplingParams
    return SamplingParams(max_tokens=r["max_tokens"], temperature=0.8, top_p=0.95, seed=r["seed"], ignore_eos=True)


def child_chat(args) -> dict:
    eng = engine(args.threads, max_num_seqs=32)
    reqs = chat_workload(text_tokens(eng.tokenizer), args.seed, CHAT["n"] if not args.quick else 8,
                         CHAT["prompt"], CHAT["output"] if not args.quick else (16, 24))
    out, default_ratio = {}, eng.scheduler.decode_stall_ratio
    for mode in ("continuous", "continuous, no decode priority", "sequential"):
        eng.scheduler.decode_stall_ratio = 0 if mode == "continuous, no decode priority" else default_ratio
        tokens, t0 = {}, time.perf_counter()
        for i, r in enumerate(reqs):
            eng.add_request(f"{mode}{i}", {"prompt_token_ids": r["prompt_token_ids"]}, params_of(r))
            while mode == "sequential" and eng.has_unfinished_requests():
                tokens.update({o.request_id: o.outputs[0].token_ids for o in eng.step() if o.finished})
        while eng.has_unfinished_requests():
            tokens.update({o.request_id: o.outputs[0].token_ids for o in eng.step() if o.finished})
        wall = time.perf_counter() - t0
        out[mode] = {"wall_s": wall, "output_tokens": sum(len(t) for t in tokens.values()),
                     "tokens": [tokens[f"{mode}{i}"] for i in range(len(reqs))]}
        out[mode]["output_tok_s"] = out[mode]["output_tokens"] / wall
    same = sum(a == b for a, b in zip(out["continuous"]["tokens"], out["sequential"]["tokens"]))
    for m in out.values():
        del m["tokens"]
    return {"modes": out, "ratio": out["continuous"]["output_tok_s"] / out["sequential"]["output_tok_s"],
            "identical_outputs": same, "requests": len(reqs),
            "prompt_tokens": sum(len(r["prompt_token_ids"]) for r in reqs),
            "output_tokens_wanted": sum(r["max_tokens"] for r in reqs)}


def child_sweep(args) -> dict:
    """Decode steps with B running sequences: wall time split into forward, sampler, scheduler, rest."""
    from tinyvllm import SamplingParams
    eng = engine(args.threads, max_num_seqs=max(SWEEP), max_num_batched_tokens=1024)
    spent = {"forward": 0.0, "sampler": 0.0, "scheduler": 0.0}

    def timed(obj, name, key):
        fn = getattr(obj, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t
        setattr(obj, name, wrapper)
    timed(eng.runner, "forward", "forward"), timed(eng.sampler, "sample", "sampler")
    timed(eng.scheduler, "schedule", "scheduler")
    ids = text_tokens(eng.tokenizer)
    steps = 8 if args.quick else args.decode_steps
    res = {}
    for B in SWEEP:
        for i in range(B):
            eng.add_request(f"b{B}-{i}", {"prompt_token_ids": ids[i * 40:i * 40 + 64]},
                            SamplingParams(max_tokens=1024, temperature=0.8, top_p=0.95, seed=i, ignore_eos=True))
        while eng.scheduler.waiting or any(s.num_uncomputed_tokens > 1 for s in eng.scheduler.running):
            eng.step()
        eng.step()
        for k in spent:
            spent[k] = 0.0
        t = time.perf_counter()
        for _ in range(steps):
            eng.step()
            assert eng.last_batch_size == B, (B, eng.last_batch_size, len(eng.scheduler.running), eng.stats())
        wall = time.perf_counter() - t
        res[B] = {"decode_tok_s": B * steps / wall, "step_ms": wall / steps * 1e3,
                  **{f"{k}_ms": v / steps * 1e3 for k, v in spent.items()}}
        res[B]["other_ms"] = res[B]["step_ms"] - sum(res[B][f"{k}_ms"] for k in spent)
        res[B]["gemm_ms"] = gemm_ms(args.threads, B)
        for rid in list(eng.requests):  # the prompts ran at different times: end all together
            eng.abort(rid)
    return {"sweep": res, "decode_steps": steps}


# The reference model's matmuls in one decode step: (dtype, rows, cols, count per step) per sampled row.
STEP_MATMULS = [("Q4_1", 576, 576, 60), ("Q4_1", 192, 576, 60), ("Q4_1", 1536, 576, 60), ("Q4_1", 576, 1536, 30),
                ("Q8_0", 49152, 576, 1)]  # q+o, k+v, gate+up, down (x 30 layers), the tied output matrix


def gemm_ms(threads: int, m: int) -> float:
    """What the matmuls of one decode step at m sequences cost alone (tv_matmul on random weights of
    the model's shapes and formats, cache-hot): the rest of the forward is attention, norms, RoPE."""
    import bench_kernels
    from tinyvllm import _native as nat
    total = 0.0
    for name, rows, cols, count in STEP_MATMULS:
        keep, descs, _ = bench_kernels.make_weight(nat, getattr(bench_kernels, name), rows, cols)
        total += count * bench_kernels.bench_matmul(nat, descs, m, cols, rows, threads, 0.03)
        del keep
    return total * 1e3


def child_smooth(args) -> dict:
    from tinyvllm import SamplingParams
    s = SMOOTH
    eng = engine(args.threads, **json.loads(args.policy))
    ids = text_tokens(eng.tokenizer)
    out_len = 40 if args.quick else s["stream_output"]
    t0 = time.perf_counter()
    for i in range(s["streams"]):
        eng.add_request(f"s{i}", {"prompt_token_ids": ids[i * 50:i * 50 + s["stream_prompt"]]},
                        SamplingParams(max_tokens=out_len, temperature=0.8, top_p=0.95, seed=i, ignore_eos=True))
    done, long_arrival, steps = {}, None, []
    while eng.has_unfinished_requests():
        if long_arrival is None and min(len(r.seqs[0].output_token_ids) for r in eng.requests.values()) >= s["arrive_after"]:
            long_arrival = time.perf_counter()
            eng.add_request("long", {"prompt_token_ids": (ids * 4)[1000:1000 + s["long_prompt"]]},
                            SamplingParams(max_tokens=s["long_output"], temperature=0.8, top_p=0.95, seed=99,
                                           ignore_eos=True))
        n0, t = eng.num_scheduled_tokens, time.perf_counter()
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
        if long_arrival is not None:  # the steps from the long prompt's arrival on
            steps.append({"tokens": eng.num_scheduled_tokens - n0, "ms": (time.perf_counter() - t) * 1e3})
    wall = time.perf_counter() - t0
    gaps = [g for i in range(s["streams"]) for g in done[f"s{i}"].metrics.itl]
    long = done["long"]
    tokens = (s["streams"] * (s["stream_prompt"] + out_len) + s["long_prompt"] + s["long_output"])
    gaps_ms = sorted(g * 1e3 for g in gaps)
    return {"itl_p50_ms": statistics.median(gaps_ms), "itl_p99_ms": pct(gaps_ms, 99), "itl_max_ms": gaps_ms[-1],
            "worst_over_median": gaps_ms[-1] / statistics.median(gaps_ms), "wall_s": wall, "tokens": tokens,
            "throughput_tok_s": tokens / wall,
            "stream_output_tok_s": s["streams"] * out_len / wall,
            "long_ttft_s": long.metrics.ttft, "steps": len(steps),
            "max_step_tokens": max(x["tokens"] for x in steps), "max_step_ms": max(x["ms"] for x in steps)}


def pct(xs, q):
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (k - lo)


# ---- the parent ----------------------------------------------------------------------------------
def run_child(args, part: str, checkout: Path, policy: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    cmd = [sys.executable, __file__, "--child", part, "--threads", str(args.threads), "--seed", str(args.seed),
           "--decode-steps", str(args.decode_steps), "--policy", json.dumps(policy or {})]
    cmd += ["--quick"] if args.quick else []
    load = os.getloadavg()
    res = machine.child_result(cmd, f"{part} child", env=env, cwd=checkout)
    res["loadavg_before"] = load
    return res


def spread(xs) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "runs": xs}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--before", type=Path, help="another checkout: its decode sweep is measured too")
    ap.add_argument("--before-label", default="", help="what --before is (a commit), for the report")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="chat,sweep,smooth")
    ap.add_argument("--out-dir", type=Path, default=machine.DOCS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--policy", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # tinyvllm comes from PYTHONPATH (the checkout under test), the library from TINYVLLM_LIB
        res = {"chat": child_chat, "sweep": child_sweep, "smooth": child_smooth}[args.child](args)
        machine.print_result(res)
        return
    machine.use_source_tree(False)
    here, parts = machine.ROOT, args.parts.split(",")
    info, load = machine.machine_info(), machine.OtherLoad()
    runs = {"chat": [], "sweep": [], "sweep_before": [], "smooth": {k: [] for k in POLICIES}}
    for rep in range(args.repeats):
        print(f"repeat {rep + 1}/{args.repeats} (load {os.getloadavg()[0]:.2f})", flush=True)
        if "chat" in parts:
            runs["chat"].append(run_child(args, "chat", here))
        if "sweep" in parts:
            runs["sweep"].append(run_child(args, "sweep", here))
            if args.before:
                runs["sweep_before"].append(run_child(args, "sweep", args.before.resolve()))
        if "smooth" in parts:
            for name, kw in POLICIES.items():
                runs["smooth"][name].append(run_child(args, "smooth", here, kw))
    carried = {}
    old_path = args.out_dir / "load.json"
    if set(parts) != {"chat", "sweep", "smooth"} and old_path.exists():  # a rerun of some parts keeps the others
        old = json.loads(old_path.read_text())
        for part, keys in (("chat", ["chat"]), ("sweep", ["sweep", "sweep_before"]), ("smooth", ["smooth"])):
            if part not in parts:
                for k in keys:
                    runs[k] = old["runs"][k]
                carried[part] = old.get("carried", {}).get(part) or \
                    f"{old['machine']['date']}, git {old['machine']['git_commit']}"
    data = {"machine": info, "threads": args.threads, "seed": args.seed, "repeats": args.repeats, "quick": args.quick,
            "carried": carried,
            "model": MODEL, "chat_workload": CHAT, "smooth_workload": SMOOTH, "policies": POLICIES,
            "before": str(args.before) if args.before else None,
            "before_commit": args.before_label or None,
            "other_cpu_share": load.share(), "loadavg_at_end": os.getloadavg(), "runs": runs}
    data["summary"] = summarize(runs)
    machine.write_outputs("load", data, markdown(data), args.out_dir)


def summarize(runs) -> dict:
    s = {}
    if runs["chat"]:
        s["chat"] = {"ratio": spread([r["ratio"] for r in runs["chat"]]),
                     "continuous_tok_s": spread([r["modes"]["continuous"]["output_tok_s"] for r in runs["chat"]]),
                     "sequential_tok_s": spread([r["modes"]["sequential"]["output_tok_s"] for r in runs["chat"]]),
                     "continuous_no_priority_tok_s": spread([r["modes"]["continuous, no decode priority"]["output_tok_s"]
                                                             for r in runs["chat"]]),
                     "identical_outputs": [r["identical_outputs"] for r in runs["chat"]],
                     "requests": runs["chat"][0]["requests"], "prompt_tokens": runs["chat"][0]["prompt_tokens"],
                     "output_tokens": runs["chat"][0]["output_tokens_wanted"],
                     "loadavg_before": [r["loadavg_before"][0] for r in runs["chat"]]}
    for key in ("sweep", "sweep_before"):
        if runs[key]:
            s[key] = {B: {m: spread([r["sweep"][B][m] for r in runs[key]])
                          for m in ("decode_tok_s", "step_ms", "forward_ms", "sampler_ms", "scheduler_ms", "other_ms", "gemm_ms")
                          if m in runs[key][0]["sweep"][B]}
                      for B in runs[key][0]["sweep"]}
            s[key]["loadavg_before"] = [r["loadavg_before"][0] for r in runs[key]]
    if any(runs["smooth"].values()):
        s["smooth"] = {name: {m: spread([r[m] for r in rs]) for m in
                              ("itl_p50_ms", "itl_p99_ms", "itl_max_ms", "worst_over_median", "throughput_tok_s",
                               "long_ttft_s", "max_step_ms", "wall_s")} | {
                           "loadavg_before": [r["loadavg_before"][0] for r in rs],
                           "max_step_tokens": rs[0]["max_step_tokens"]}
                       for name, rs in runs["smooth"].items() if rs}
    return s


def fmt(sp, f="{:.1f}") -> str:
    return f"{f.format(sp['median'])} ({f.format(sp['min'])}-{f.format(sp['max'])})"


def markdown(d) -> str:
    s, cpu = d["summary"], d["machine"]["cpu"]
    other = "?" if d["other_cpu_share"] is None else f"{d['other_cpu_share']:.0%}"
    lines = ["# Throughput and latency under load", "",
             machine.caveats(d["other_cpu_share"], d["quick"] and "shrunken workload")
             + f"{d['machine']['date']} · {cpu.get('model')} · {d['threads']} threads · git {d['machine']['git_commit']} · "
             f"other processes' CPU share during the run {other} · `benchmarks/bench_load.py`, model {d['model']}. "
             f"Every figure: median (min-max) of {d['repeats']} runs, each in its own child process; the load "
             "average before each run is listed."
             + "".join(f" Section {part} is carried over from the run of {when}." for part, when in d.get("carried", {}).items()),
             ""]
    if "chat" in s:
        c = s["chat"]
        lines += ["## 1. Continuous batching vs one request at a time (same engine)", "",
                  f"{c['requests']} requests, prompts {CHAT['prompt'][0]}-{CHAT['prompt'][1]} tokens of English text "
                  f"({c['prompt_tokens']} in all), outputs {CHAT['output'][0]}-{CHAT['output'][1]} ({c['output_tokens']} "
                  "in all), temperature 0.8 / top-p 0.95 with a seed per request, ignore_eos, all at t=0; "
                  "max_num_seqs 32. Sequential adds each request when the previous one has finished.", "",
                  machine.md_table(["", "output tok/s", "target"], [
                      ["continuous (default: decode priority)", fmt(c["continuous_tok_s"]), ""],
                      ["continuous, decode_stall_ratio 0 (prefill chunks not held back)",
                       fmt(c["continuous_no_priority_tok_s"]), ""],
                      ["one at a time", fmt(c["sequential_tok_s"]), ""],
                      ["**ratio continuous / one at a time**", "**" + fmt(c["ratio"], "{:.2f}") + "x**", ">= 6x"]]), "",
                  f"Outputs identical between the two runs (seeded sampling is batch-independent; the forward's "
                  f"numerics may differ with the batch): {c['identical_outputs']} of {c['requests']} per run. "
                  f"Load average before each run: {c['loadavg_before']}.", ""]
        if "sweep" in s:
            sw, ms = s["sweep"], lambda b, k: s["sweep"][b][k]["median"]
            lines += [f"What bounds the ratio: decode is most of this workload, and aggregate decode at 32 sequences "
                      f"runs {ms('32', 'decode_tok_s') / ms('1', 'decode_tok_s'):.2f}x single-sequence decode "
                      f"(section 2, medians): a step at 32 sequences costs {ms('32', 'step_ms'):.0f} ms, of which the "
                      f"forward {ms('32', 'forward_ms'):.0f} ms (its matmuls alone {ms('32', 'gemm_ms'):.0f} ms) and "
                      f"the sampler {ms('32', 'sampler_ms'):.1f} ms, against {ms('1', 'step_ms'):.1f} ms at one "
                      "sequence. The ratio can pass 6x only when the forward at m = 32 costs under ~5.3x the "
                      "forward at m = 1 (the matmul kernels' efficiency at m = 32-64).", ""]
    for key, title in (("sweep", "this checkout"), ("sweep_before", f"before ({d.get('before_commit')})")):
        if key not in s:
            continue
        sw = s[key]
        rows = [[B, fmt(v["decode_tok_s"], "{:.0f}"), fmt(v["step_ms"]), fmt(v["forward_ms"]), fmt(v["sampler_ms"]),
                 fmt(v["scheduler_ms"]), fmt(v["other_ms"]), fmt(v["gemm_ms"]) if "gemm_ms" in v else "-",
                 f"{v['forward_ms']['median'] / int(B):.2f} / {v['sampler_ms']['median'] / int(B) * 1e3:.0f}"]
                for B, v in sw.items() if B != "loadavg_before"]
        lines += [f"## 2. Aggregate decode by running sequences ({title})", "",
                  "64-token prompts, then decode steps timed with every sequence in the batch; temperature 0.8 / "
                  "top-p 0.95. A step's wall time split into the runner's forward, the sampler, the scheduler and "
                  "the rest (outputs, detokenizing, bookkeeping).", "",
                  machine.md_table(["sequences", "decode tok/s", "step ms", "forward ms", "sampler ms", "scheduler ms",
                                    "other ms", "of the forward: matmuls alone ms", "per sequence: forward ms / sampler us"], rows), "",
                  "Matmuls alone: the step's matmuls (q, k, v, o, gate, up, down x 30 layers and the tied output "
                  "matrix, at m = the number of sequences) timed through `tv_matmul` on random weights of the "
                  "same shapes and formats, cache-hot; the rest of the forward is attention, norms and RoPE.", "",
                  f"Load average before each run: {sw['loadavg_before']}.", ""]
    if "smooth" in s:
        sm = s["smooth"]
        w = d["smooth_workload"]
        today = next((v["throughput_tok_s"]["median"] for k, v in sm.items() if k.startswith("today")), None)
        rows = [[name, fmt(v["itl_p50_ms"]), fmt(v["itl_p99_ms"]), fmt(v["itl_max_ms"], "{:.0f}"),
                 fmt(v["worst_over_median"]), fmt(v["throughput_tok_s"], "{:.0f}"),
                 f"{v['throughput_tok_s']['median'] / today - 1:+.1%}" if today else "-",
                 fmt(v["long_ttft_s"], "{:.2f}"), v["max_step_tokens"]] for name, v in sm.items()]
        lines += ["## 3. Decode while a long prompt arrives", "",
                  f"{w['streams']} streams ({w['stream_prompt']}-token prompts, {w['stream_output']} tokens each) are "
                  f"decoding; once each has {w['arrive_after']} tokens, a {w['long_prompt']}-token prompt arrives "
                  f"({w['long_output']} output tokens). Gaps: every inter-token gap of the {w['streams']} streams. "
                  "Throughput: all prompt and output tokens / wall time of the whole scenario. Target: worst gap "
                  "<= 5x the median at <= 10% throughput cost.", "",
                  machine.md_table(["policy", "ITL p50 ms", "ITL p99 ms", "worst gap ms", "worst / median",
                                    "throughput tok/s", "vs today (medians)", "long prompt TTFT s", "largest step after it arrived (tokens)"], rows), "",
                  "Load average before each run: " + "; ".join(f"{k}: {v['loadavg_before']}" for k, v in sm.items())
                  + ".", "",
                  "The decode-priority budget (`Scheduler.prefill_budget`): while d sequences decode, a step runs "
                  "at most (decode_stall_ratio - 1) x (STEP_FIXED_TOKENS + d) prefill tokens (16 + d: a step's "
                  "fixed cost, reading every weight once, is worth about 16 prefill tokens on this machine), so a "
                  "step costs about decode_stall_ratio decode-only steps at most; the decodes keep their tokens "
                  "even behind an earlier prompt. With nothing decoding a prompt gets all of "
                  "max_num_batched_tokens. The cost is the long prompt's time to first token: its prefill rides "
                  "on the decode steps in small chunks.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
