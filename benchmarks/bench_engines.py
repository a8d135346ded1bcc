"""tinyvllm vs llama.cpp (llama-cpp-python) on the reference model and its Q4_K_M requantization, in one run.

Each engine runs in its own child process (fair peak RSS, no interference between engines); the
parent alternates the order of the children across repetitions, aggregates, adds the machine's
measured read bandwidth (the decode roofline) and writes docs/benchmarks/engines.{json,md}.

    bash benchmarks/setup_env.sh                                  # once: .venv-bench/
    .venv-bench/bin/python benchmarks/bench_engines.py            # full run (quiet machine!)
    .venv-bench/bin/python benchmarks/bench_engines.py --quick    # smoke test
    .venv-bench/bin/python benchmarks/bench_engines.py --models smollm2-135m,/path/to/own.gguf

Models: names or .gguf paths; "q4_k_m" is the reference model requantized to Q4_K_M by llama.cpp's
own quantizer (llama_model_quantize, cached next to the reference model): a mix of Q5_0, Q8_0,
Q4_K, Q6_K and F32, since SmolLM2's 576-wide rows are not a multiple of 256.

By default tinyvllm is imported from this checkout (newest build*/libtinyvllm.so; TINYVLLM_LIB
overrides); --installed uses the copy pip installed into the environment instead.
"""
import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

MODELS = "smollm2-135m,q4_k_m"
PREFILL_LENS = (128, 512)
DECODE_PROMPT = 16


def token_ids(vocab: int, n: int) -> list[int]:
    """A fixed pseudo-random sequence of ordinary token ids (past the first 256: no special tokens)."""
    x, out = 12345, []
    for _ in range(n):
        x = (x * 1103515245 + 12345) % 2**31
        out.append(256 + x % (vocab - 256))
    return out


def rss_now() -> int:
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """This process's resident high-water mark. VmHWM, not getrusage's ru_maxrss: Linux carries
    ru_maxrss over fork + exec, so a child would report its parent's peak when that one is higher."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024


# ---- the engines (in a child process) ------------------------------------------------------------
class TinyVLLM:
    name = "tinyvllm"

    def __init__(self, path, threads):
        from tinyvllm import LLM, SamplingParams
        from tinyvllm import _native
        self.SP = SamplingParams
        # KV capacity = llama.cpp's n_ctx (2048); no prefix caching, so a repeated prompt is recomputed.
        self.llm = LLM(str(path), threads=threads, max_num_batched_tokens=1024, max_num_seqs=1,
                       max_model_len=2048, enable_prefix_caching=False)
        self.engine = self.llm.engine
        self.n_vocab = self.engine.config.vocab_size
        self.info = {"lib": str(_native.LIB_PATH), "kernel_path": _native.ffi.string(_native.lib.tv_kernel_path()).decode(),
                     "version": _native.ffi.string(_native.lib.tv_version()).decode(),
                     "package": str(Path(sys.modules["tinyvllm"].__file__).parent)}

    def prefill(self, ids) -> float:
        """Time from the first step to the first token: the prefill step(s), one token sampled."""
        self.engine.add_request(None, {"prompt_token_ids": ids}, self.SP(max_tokens=1, temperature=0, ignore_eos=True))
        t = time.perf_counter()
        while not any(o.finished for o in self.engine.step()):
            pass
        return time.perf_counter() - t

    def decode(self, ids, n) -> tuple[float, list[int]]:
        """Time of the n steps after the prefill step, each one forward + greedy sample."""
        self.engine.add_request(None, {"prompt_token_ids": ids}, self.SP(max_tokens=n + 1, temperature=0, ignore_eos=True))
        while not self.engine.step():  # the prefill step returns the first token
            pass
        runner = self.engine.runner
        overhead = []  # per step: step() wall time minus the native forward inside it
        t = time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter()
            outs = self.engine.step()
            overhead.append(time.perf_counter() - t0 - getattr(runner, "last_forward_s", float("nan")))
        dt = time.perf_counter() - t
        assert outs and outs[0].finished, "decode did not finish in n steps"
        self.step_overhead_s = statistics.median(overhead)
        return dt, list(outs[0].outputs[0].token_ids)


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, path, threads):
        import llama_cpp
        import numpy as np
        self.np = np
        import llama_cpp.llama_cpp as api
        # ggml's AMX matmul (an "extra buffer type", picked on CPUs with AMX) segfaults at the first
        # decode in llama-cpp-python 0.3.36; there the extra buffer types (AMX, weight repacking) are
        # turned off and the table says so. Elsewhere llama.cpp keeps its defaults.
        plain = "amx_int8" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
        default = api.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = not plain
            return p
        api.llama_model_default_params = params
        try:
            self.llm = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=2048,
                                       n_batch=512, verbose=False, logits_all=False)
        finally:
            api.llama_model_default_params = default
        self.n_vocab = self.llm.n_vocab()
        self.info = {"version": llama_cpp.__version__, "package": str(Path(llama_cpp.__file__).parent),
                     "system_info": llama_cpp.llama_print_system_info().decode().strip(),
                     "extra_buffer_types": not plain}

    def _argmax(self) -> int:
        return int(self.np.argmax(self.np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.n_vocab,))))

    def prefill(self, ids) -> float:
        self.llm.reset()  # n_tokens = 0: eval() drops the KV cache past it, so nothing is reused
        t = time.perf_counter()
        self.llm.eval(ids)
        self._argmax()
        return time.perf_counter() - t

    def decode(self, ids, n) -> tuple[float, list[int]]:
        self.llm.reset()
        self.llm.eval(ids)
        out = [self._argmax()]
        t = time.perf_counter()
        for _ in range(n):
            self.llm.eval(out[-1:])
            out.append(self._argmax())
        return time.perf_counter() - t, out


def child(args) -> dict:
    rss0 = rss_now()
    t = time.perf_counter()
    eng = (TinyVLLM if args.engine == "tinyvllm" else LlamaCpp)(args.model_path, args.threads)
    res = {"engine": eng.name, "load_s": time.perf_counter() - t, "rss_base": rss0, "rss_loaded": rss_now(),
           "info": eng.info, "prefill_s": {}, "decode_s": []}
    ids = token_ids(eng.n_vocab, max(PREFILL_LENS))  # the same ids in both engines: they share the vocabulary
    # What a user waits for after loading: the first token of a short prompt, cold (no warm-up).
    res["first_token_s"] = eng.prefill(ids[:DECODE_PROMPT])
    for n in PREFILL_LENS:
        eng.prefill(ids[:n])  # warm-up: thread pool, pages, workspace
        res["prefill_s"][n] = [eng.prefill(ids[:n]) for _ in range(args.inner)]
    eng.decode(ids[:DECODE_PROMPT], 8)  # warm-up
    for _ in range(args.inner):
        dt, toks = eng.decode(ids[:DECODE_PROMPT], args.decode_tokens)
        res["decode_s"].append(dt)
        if hasattr(eng, "step_overhead_s"):
            res.setdefault("step_overhead_s", []).append(eng.step_overhead_s)
    res["decode_tokens"] = toks
    res["rss_peak"] = peak_rss()
    return res


# ---- the parent ----------------------------------------------------------------------------------
def run_child(engine, args, model_path) -> dict:
    cmd = [sys.executable, __file__, "--child", "--engine", engine, "--threads", str(args.threads),
           "--inner", str(args.inner), "--decode-tokens", str(args.decode_tokens),
           "--model-path", str(model_path)] + (["--installed"] if args.installed else [])
    return machine.child_result(cmd, f"{engine} child")


def stats(samples, work) -> dict:
    """tok/s for each sample of `work` tokens: median and best."""
    rates = [work / s for s in samples]
    return {"median_tok_s": statistics.median(rates), "best_tok_s": max(rates), "samples_s": samples, "work": work}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=4, help="child processes per engine, alternating order")
    ap.add_argument("--inner", type=int, default=3, help="timed runs of each measurement inside a child")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 rep, 1 inner run, short bandwidth test")
    ap.add_argument("--engines", default="tinyvllm,llama.cpp")
    ap.add_argument("--models", default=MODELS, help="names or .gguf paths; q4_k_m: the reference model requantized "
                                                     "by llama.cpp's quantizer (default: %(default)s)")
    ap.add_argument("--installed", action="store_true", help="use the installed tinyvllm, not this checkout")
    ap.add_argument("--out-dir", type=Path, default=machine.DOCS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--model-path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    machine.use_source_tree(args.installed)
    if args.child:
        machine.print_result(child(args))
        return
    if args.quick:
        args.reps, args.inner = 1, 1

    info = machine.machine_info()
    load = machine.OtherLoad()
    engines = args.engines.split(",")
    models = [resolve(m) for m in args.models.split(",")]
    print(f"models {models}\nthreads {args.threads}, reps {args.reps} x inner {args.inner}, load {info['loadavg_at_start']}")
    bw_reps = 3 if args.quick else 7
    # The decode roofline: re-reading a model's weights every token runs at the bandwidth of a buffer
    # that size (on a CPU whose last-level cache holds the model, that is the cache's, not DRAM's).
    ws_mib = {m: -(-machine.decode_weight_bytes(m)["bytes_per_token"] // 2**20) for m in models}
    bw = machine.read_bandwidth(args.threads, reps=bw_reps)
    bw_ws = {m: machine.read_bandwidth(args.threads, mib=ws_mib[m], reps=bw_reps) for m in models}
    print(f"read bandwidth ({args.threads} threads): {bw['bytes_per_s'] / 1e9:.1f} GB/s at 1 GiB; "
          + ", ".join(f"{b['bytes_per_s'] / 1e9:.1f} GB/s at {ws_mib[m]} MiB" for m, b in bw_ws.items()))
    runs = {(m, e): [] for m in models for e in engines}
    for rep in range(args.reps):
        for m in models:
            for e in (engines if rep % 2 == 0 else engines[::-1]):
                r = run_child(e, args, m)
                runs[m, e].append(r)
                print(f"  rep {rep} {m.name[:40]:40s} {e:9s} prefill128 {128 / min(r['prefill_s']['128']):7.1f}  "
                      f"prefill512 {512 / min(r['prefill_s']['512']):7.1f}  "
                      f"decode {args.decode_tokens / min(r['decode_s']):6.1f} tok/s  peak RSS {r['rss_peak'] / 2**20:.0f} MiB")
    # The curve over buffer sizes shows which level of the memory hierarchy each figure is.
    bw["by_buffer_mib"] = {mib: machine.read_bandwidth(args.threads, mib=mib, reps=3)["bytes_per_s"]
                           for mib in (8, 32, 64, 128, 256, 512, 1024)}
    bw_end = machine.read_bandwidth(args.threads, reps=bw_reps)
    bw["bytes_per_s_start_end"] = [bw["bytes_per_s"], bw_end["bytes_per_s"]]
    bw["bytes_per_s"] = max(bw["bytes_per_s_start_end"])  # the ceiling: best of the two
    for m in models:
        end = machine.read_bandwidth(args.threads, mib=ws_mib[m], reps=bw_reps)
        bw_ws[m]["bytes_per_s_start_end"] = [bw_ws[m]["bytes_per_s"], end["bytes_per_s"]]
        bw_ws[m]["bytes_per_s"] = max(bw_ws[m]["bytes_per_s_start_end"])
    per_model = [summarize(m, engines, {e: runs[m, e] for e in engines}, bw, bw_ws[m]) for m in models]
    data = {"models": per_model, "threads": args.threads, "reps": args.reps, "inner": args.inner, "quick": args.quick,
            "decode_prompt_tokens": DECODE_PROMPT, "decode_tokens": args.decode_tokens, "machine": info,
            "read_bandwidth": bw, "loadavg_at_end": os.getloadavg(), "other_cpu_share": load.share()}
    machine.write_outputs("engines", data, markdown(data, engines), args.out_dir)


def resolve(name: str) -> Path:
    from tinyvllm.model import resolve_model
    if name != "q4_k_m":
        return Path(resolve_model(name))
    import ctypes
    import llama_cpp
    src = Path(resolve_model("smollm2-135m"))
    dst = src.with_name(f"SmolLM2-135M-Instruct.Q4_K_M.llama-cpp-{llama_cpp.__version__}.gguf")
    if not dst.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, True
        tmp = dst.with_suffix(".tmp")
        if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)):
            sys.exit("llama_model_quantize failed")
        tmp.rename(dst)
    return dst


def summarize(model_path: Path, engines, runs, bw, bw_ws) -> dict:
    """`bw`: read bandwidth over 1 GiB (DRAM); `bw_ws`: over a buffer the size of the model's weights,
    the roofline (the larger where the weights stay in the last-level cache between tokens)."""
    wb = machine.decode_weight_bytes(model_path)
    roof = bw_ws["bytes_per_s"] / wb["bytes_per_token"]
    roof_dram = bw["bytes_per_s"] / wb["bytes_per_token"]
    res = {}
    for e, rs in runs.items():
        res[e] = {f"prefill{n}": stats([s for r in rs for s in r["prefill_s"][str(n)]], n) for n in PREFILL_LENS}
        res[e]["decode"] = stats([s for r in rs for s in r["decode_s"]], len(rs[0]["decode_tokens"]) - 1)
        res[e]["decode"]["roofline_fraction"] = res[e]["decode"]["median_tok_s"] / roof
        res[e]["decode"]["dram_roofline_fraction"] = res[e]["decode"]["median_tok_s"] / roof_dram
        res[e].update(load_s=statistics.median(r["load_s"] for r in rs),
                      load_s_min_max=[min(r["load_s"] for r in rs), max(r["load_s"] for r in rs)],
                      first_token_s=statistics.median(r["first_token_s"] for r in rs),
                      first_token_s_min_max=[min(r["first_token_s"] for r in rs), max(r["first_token_s"] for r in rs)],
                      rss_peak_bytes=max(r["rss_peak"] for r in rs), rss_base_bytes=min(r["rss_base"] for r in rs),
                      info=rs[0]["info"], decode_tokens=rs[0]["decode_tokens"])
        if all("step_overhead_s" in r for r in rs):  # median over runs of each run's median over steps
            res[e]["decode_step_overhead_s"] = statistics.median(s for r in rs for s in r["step_overhead_s"])
    agree = None
    if len(engines) == 2:
        a, b = (res[e]["decode_tokens"] for e in engines)
        agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {"model": str(model_path), "decode_weight_bytes": wb, "roofline_decode_tok_s": roof,
            "dram_roofline_decode_tok_s": roof_dram, "read_bandwidth_working_set": bw_ws,
            "greedy_tokens_agree_prefix": agree, "engines": res}


def _pct(x):
    return "?" if x is None else f"{x:.0%}"


def markdown(d, engines) -> str:
    m, bw = d["machine"], d["read_bandwidth"]
    cpu = m["cpu"]
    first = d["models"][0]["engines"]
    tv = first.get("tinyvllm", {}).get("info", {})
    lc = first.get("llama.cpp", {}).get("info", {})
    lines = [
        "# tinyvllm vs llama.cpp", "",
        machine.caveats(d["other_cpu_share"], d["quick"] and "1 repetition") +
        f"{m['date']} · {cpu.get('model')} · {cpu.get('usable_cpus')} CPUs usable · "
        f"{d['threads']} threads per engine · {d['reps']} child processes per engine and model x {d['inner']} timed "
        f"runs, engines alternating · other processes' CPU share during the run {_pct(d['other_cpu_share'])} · "
        f"git {m['git_commit']}", "",
        f"tinyvllm {tv.get('version', '?')} (kernels `{tv.get('kernel_path', '?')}`), llama-cpp-python "
        f"{lc.get('version', '?')}{'' if lc.get('extra_buffer_types', True) else ' (extra buffer types off: its AMX path crashes on this CPU)'}"
        f". Ratio = tinyvllm / llama.cpp (higher is better for tinyvllm, except for memory "
        f"and load time). Measured read bandwidth over a 1 GiB buffer {bw['bytes_per_s'] / 1e9:.1f} GB/s ({bw['threads']} threads, "
        f"{bw['method']}; best of the runs before and after the engines: "
        f"{' / '.join(f'{x / 1e9:.1f}' for x in bw['bytes_per_s_start_end'])} GB/s).",
    ]
    if bw.get("by_buffer_mib"):
        lines += ["", "Read bandwidth by buffer size (best of 3; a buffer the caches hold reads faster): "
                  + ", ".join(f"{mib} MiB {b / 1e9:.1f} GB/s" for mib, b in bw["by_buffer_mib"].items()) + "."]
    for md in d["models"]:
        lines += ["", model_table(md, d, engines)]
    return "\n".join(lines)


def model_table(md, d, engines) -> str:
    e = md["engines"]
    ratio = len(engines) == 2

    def row(label, get, fmt="{:.1f}"):
        vals = [get(e[x]) for x in engines]
        cells = [fmt.format(v) for v in vals]
        if ratio:
            cells.append(f"{vals[0] / vals[1]:.2f}x" if vals[1] else "-")
        return [label] + cells

    rows = []
    for key, label in [("prefill128", "prefill 128 tokens"), ("prefill512", "prefill 512 tokens"),
                       ("decode", f"decode {d['decode_tokens']} tokens (batch 1)")]:
        rows.append(row(f"{label}, tok/s median", lambda r: r[key]["median_tok_s"]))
        rows.append([f"{label}, tok/s min / max"] + [f"{min_rate(e[x][key]):.1f} / {e[x][key]['best_tok_s']:.1f}"
                                                      for x in engines] + ([""] if ratio else []))
    rows.append(row("decode, fraction of roofline (bandwidth over a buffer the size of the weights)",
                    lambda r: r["decode"]["roofline_fraction"], "{:.0%}"))
    rows.append(row("decode, fraction of the DRAM roofline (bandwidth over 1 GiB)",
                    lambda r: r["decode"]["dram_roofline_fraction"], "{:.0%}"))
    if "decode_step_overhead_s" in e.get("tinyvllm", {}):
        ov = e["tinyvllm"]["decode_step_overhead_s"]
        step = 1 / e["tinyvllm"]["decode"]["median_tok_s"]
        rows.append(["Python overhead per decode step (LLMEngine.step() minus the native forward), us median",
                     f"{ov * 1e6:.0f} ({ov / step:.0%} of a step)"] + ["-"] * (len(engines) - 1 + ratio))
    rows.append(row("peak RSS, MiB", lambda r: r["rss_peak_bytes"] / 2**20, "{:.0f}"))
    rows.append(row("peak RSS above the interpreter before loading, MiB",
                    lambda r: (r["rss_peak_bytes"] - r["rss_base_bytes"]) / 2**20, "{:.0f}"))
    rows.append(row("load, s median", lambda r: r["load_s"], "{:.2f}"))
    rows.append(["load, s min / max"] + [f"{e[x]['load_s_min_max'][0]:.2f} / {e[x]['load_s_min_max'][1]:.2f}"
                                         for x in engines] + ([""] if ratio else []))
    rows.append(row(f"first token after load ({d['decode_prompt_tokens']}-token prompt, cold), s median",
                    lambda r: r["first_token_s"], "{:.3f}"))
    rows.append(["first token after load, s min / max"] + [
        f"{e[x]['first_token_s_min_max'][0]:.3f} / {e[x]['first_token_s_min_max'][1]:.3f}" for x in engines]
        + ([""] if ratio else []))
    wb = md["decode_weight_bytes"]
    mix = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(wb["bytes_by_type"].items(), key=lambda kv: -kv[1]))
    head = ["metric"] + engines + (["ratio"] if ratio else [])
    lines = [f"## `{Path(md['model']).name}`", "", f"Weights by type: {mix}.", "",
             machine.md_table(head, rows), "",
             f"**Roofline**: a decoded token reads {wb['bytes_per_token'] / 1e6:.1f} MB of weights "
             f"(all GGUF tensors{', token_embd whole as the tied output matrix' if wb['tied_output'] else ''}); "
             f"re-reading a buffer that size runs at {md['read_bandwidth_working_set']['bytes_per_s'] / 1e9:.1f} GB/s "
             f"(best of before / after: {' / '.join(f'{x / 1e9:.1f}' for x in md['read_bandwidth_working_set']['bytes_per_s_start_end'])}) "
             f"=> at most **{md['roofline_decode_tok_s']:.0f} tok/s** at batch 1 "
             f"({md['dram_roofline_decode_tok_s']:.0f} tok/s at the 1 GiB bandwidth)."]
    if md["greedy_tokens_agree_prefix"] is not None:
        lines += ["", f"Greedy decode: the two engines' first {md['greedy_tokens_agree_prefix']} of "
                      f"{d['decode_tokens'] + 1} tokens agree (different quantized arithmetic may diverge later)."]
    return "\n".join(lines)


def min_rate(st) -> float:
    return st["work"] / max(st["samples_s"])


if __name__ == "__main__":
    main()
