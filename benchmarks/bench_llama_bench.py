"""tinyvllm vs llama.cpp's own `llama-bench` (C++, no Python in its loop), alternating in one run.

bench_engines.py compares against llama-cpp-python, whose decode loop pays Python per token; this
one times llama.cpp's native tool on the same files: pp512 (prefill of 512 tokens) and tg128 (128
decoded tokens at batch 1), 2 threads, against tinyvllm's prefill of 512 tokens and 128 decode steps
(one child process per measurement, engines alternating, `rounds` times). llama-bench runs every
combination of --llama-flags in one call (default: flash attention on and off, micro-batch 256 and
512) and each test keeps its best combination of that round: llama.cpp's best flags for this machine.
--tinyvllm-kernels times our kernel paths side by side (e.g. avx512amx,avx512vnni). The load average
is recorded before every measurement; --llama-build records how llama-bench was built.

    # llama-bench from llama.cpp's source (e.g. the copy inside the llama-cpp-python sdist):
    #   cmake -S vendor/llama.cpp -B build -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF && cmake --build build --target llama-bench
    .venv-bench/bin/python benchmarks/bench_llama_bench.py --llama-bench PATH [--models a,b] [--rounds 3]
        [--llama-flags "-fa on,off -ub 256,512"] [--tinyvllm-kernels auto,avx512vnni] [--llama-build "cmake flags"]
Writes docs/benchmarks/llama_bench.{json,md}.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402
from bench_engines import resolve  # noqa: E402

CHILD = r"""
import json, sys, time
from tinyvllm import LLM, SamplingParams
path, threads = sys.argv[1], int(sys.argv[2])
llm = LLM(path, threads=threads, max_num_batched_tokens=1024, max_num_seqs=1, max_model_len=2048,
          enable_prefix_caching=False)
engine, vocab = llm.engine, llm.engine.config.vocab_size
ids = [256 + (i * 7919) % (vocab - 256) for i in range(512)]
def run(n_in, n_out):
    engine.add_request(None, {"prompt_token_ids": ids[:n_in]}, SamplingParams(max_tokens=n_out, temperature=0, ignore_eos=True))
    t, first = time.perf_counter(), None
    while True:
        outs = engine.step()
        if first is None:
            first = time.perf_counter()
        if any(o.finished for o in outs):
            return first - t, time.perf_counter() - first
run(512, 2); run(16, 8)  # warm-up
pp = min(run(512, 1)[0] for _ in range(3))
tg = min(run(16, 129)[1] for _ in range(3))  # 128 decode steps after the first token
print("RESULT " + json.dumps({"pp512": 512 / pp, "tg128": 128 / tg}))
"""


def ours(path: Path, threads: int, kernel: str = "auto") -> dict:
    env = dict(os.environ, TINYVLLM_KERNEL=kernel)
    return machine.child_result([sys.executable, "-c", CHILD, str(path), str(threads)], "tinyvllm child", env=env)


def theirs(bench: str, path: Path, threads: int, flags: str) -> dict:
    r = subprocess.run([bench, "-m", str(path), "-t", str(threads), "-p", "512", "-n", "128", "-r", "3", "-o", "json",
                        *shlex.split(flags)], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"llama-bench failed:\n{r.stderr[-3000:]}")
    out = {}
    for test in json.loads(r.stdout):  # one entry per test and flag combination: keep each test's best
        key = "pp512" if test["n_prompt"] == 512 and test["n_gen"] == 0 else "tg128"
        if test["avg_ts"] > out.get(key, 0.0):
            out[key] = test["avg_ts"]
            out[key + "_flags"] = f"fa {test.get('flash_attn')} ub {test.get('n_ubatch')} b {test.get('n_batch')}"
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--models", default="smollm2-135m,q4_k_m,gemma3-270m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-flags", default="-fa on,off -ub 256,512", help="llama-bench options, comma lists allowed")
    ap.add_argument("--tinyvllm-kernels", default="auto", help="TINYVLLM_KERNEL values to time, comma-separated")
    ap.add_argument("--llama-build", default="", help="how llama-bench was built (recorded in the outputs)")
    ap.add_argument("--out-dir", type=Path, default=machine.DOCS)
    args = ap.parse_args()
    machine.use_source_tree(False)
    info, load = machine.machine_info(), machine.OtherLoad()
    version = subprocess.run([args.llama_bench, "--version"], capture_output=True, text=True)
    models = [resolve(m) for m in args.models.split(",")]
    kernels = args.tinyvllm_kernels.split(",")
    ours_names = ["tinyvllm" if k == "auto" else f"tinyvllm {k}" for k in kernels]
    res = {str(m): {**{n: [] for n in ours_names}, "llama-bench": []} for m in models}
    for rnd in range(args.rounds):
        for m in models:
            runs = [(n, lambda k=k: ours(m, args.threads, k)) for n, k in zip(ours_names, kernels)]
            runs.append(("llama-bench", lambda: theirs(args.llama_bench, m, args.threads, args.llama_flags)))
            for name, fn in (runs if rnd % 2 == 0 else runs[::-1]):
                before = os.getloadavg()[0]
                r = fn()
                r["loadavg_before"] = before
                res[str(m)][name].append(r)
                print(f"round {rnd} {m.name[:40]:40s} {name:22s} pp512 {r['pp512']:7.1f}  tg128 {r['tg128']:6.1f} tok/s"
                      f"  (load {before:.2f} before) {r.get('pp512_flags', '')} / {r.get('tg128_flags', '')}", flush=True)
    data = {"machine": info, "threads": args.threads, "rounds": args.rounds, "results": res,
            "llama_bench_version": (version.stdout + version.stderr).strip(), "llama_bench_flags": args.llama_flags,
            "llama_build": args.llama_build, "tinyvllm_kernels": kernels, "other_cpu_share": load.share()}
    machine.write_outputs("llama_bench", data, markdown(data), args.out_dir)


def markdown(d) -> str:
    rows, loads = [], []
    ours_names = [n for n in next(iter(d["results"].values())) if n != "llama-bench"]
    fmt = lambda v: f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})"
    for model, r in d["results"].items():
        for key, label in (("pp512", "prefill 512"), ("tg128", "decode 128")):
            b = [x[key] for x in r["llama-bench"]]
            flags = sorted({x.get(key + "_flags", "?") for x in r["llama-bench"]})
            row = [Path(model).name, label]
            for n in ours_names:
                a = [x[key] for x in r[n]]
                row += [fmt(a), f"{statistics.median(a) / statistics.median(b):.2f}x"]
            rows.append(row + [fmt(b), "; ".join(flags)])
        loads += [x.get("loadavg_before") for v in r.values() for x in v if x.get("loadavg_before") is not None]
    m = d["machine"]
    share = d["other_cpu_share"]
    return "\n".join([
        "# tinyvllm vs llama.cpp's llama-bench", "",
        machine.busy_warning(share) +
        f"{m['date']} · {m['cpu'].get('model')} · {d['threads']} threads · {d['rounds']} rounds, engines alternating · "
        f"git {m['git_commit']} · other processes' CPU share {'?' if share is None else f'{share:.0%}'} · "
        f"llama-bench {d['llama_bench_version'].splitlines()[0] if d['llama_bench_version'] else '?'}", "",
        "tok/s, median (min-max) over rounds; each llama-bench round is its own average of 3 repetitions (the best "
        f"of its flag combinations `{d.get('llama_bench_flags', '')}`, the winning ones in the last column), each "
        "tinyvllm round the best of 3 in a fresh process. tinyvllm's numbers include its Python engine step; "
        "`tinyvllm` is the default kernel path (avx512amx where the CPU has AMX), others forced with TINYVLLM_KERNEL. "
        "Ratios: tinyvllm / llama-bench, medians.", "",
        f"Load average (1 min) before each measurement: {min(loads):.2f}-{max(loads):.2f}. " if loads else "",
        f"llama-bench built with: `{d['llama_build']}`" if d.get("llama_build") else "", "",
        machine.md_table(["model", "test"] + [h for n in ours_names for h in (n, "ratio")] + ["llama-bench", "llama-bench best flags"], rows),
    ])


if __name__ == "__main__":
    main()
