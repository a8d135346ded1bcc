"""tinyvllm vs llama.cpp's own `llama-bench` (C++, no Python in its loop), alternating in one run.

bench_engines.py compares against llama-cpp-python, whose decode loop pays Python per token; this
one times llama.cpp's native tool on the same files: pp512 (prefill of 512 tokens) and tg128 (128
decoded tokens at batch 1), 2 threads, against tinyvllm's prefill of 512 tokens and 128 decode steps
(one child process per measurement, engines alternating, `rounds` times).

    # llama-bench from llama.cpp's source (e.g. the copy inside the llama-cpp-python sdist):
    #   cmake -S vendor/llama.cpp -B build -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF && cmake --build build --target llama-bench
    .venv-bench/bin/python benchmarks/bench_llama_bench.py --llama-bench PATH [--models a,b] [--rounds 3]
Writes docs/benchmarks/llama_bench.{json,md}.
"""
import argparse
import json
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


def ours(path: Path, threads: int) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(path), str(threads)], capture_output=True, text=True)
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    if r.returncode or not line:
        sys.exit(f"tinyvllm child failed:\n{r.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def theirs(bench: str, path: Path, threads: int) -> dict:
    r = subprocess.run([bench, "-m", str(path), "-t", str(threads), "-p", "512", "-n", "128", "-r", "3", "-o", "json"],
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"llama-bench failed:\n{r.stderr[-3000:]}")
    out = {}
    for test in json.loads(r.stdout):
        key = "pp512" if test["n_prompt"] == 512 and test["n_gen"] == 0 else "tg128"
        out[key] = test["avg_ts"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--models", default="smollm2-135m,q4_k_m,gemma3-270m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", type=Path, default=machine.DOCS)
    args = ap.parse_args()
    machine.use_source_tree(False)
    info, load = machine.machine_info(), machine.OtherLoad()
    version = subprocess.run([args.llama_bench, "--version"], capture_output=True, text=True)
    models = [resolve(m) for m in args.models.split(",")]
    res = {str(m): {"tinyvllm": [], "llama-bench": []} for m in models}
    for rnd in range(args.rounds):
        for m in models:
            pair = [("tinyvllm", lambda: ours(m, args.threads)), ("llama-bench", lambda: theirs(args.llama_bench, m, args.threads))]
            for name, fn in (pair if rnd % 2 == 0 else pair[::-1]):
                r = fn()
                res[str(m)][name].append(r)
                print(f"round {rnd} {m.name[:40]:40s} {name:11s} pp512 {r['pp512']:7.1f}  tg128 {r['tg128']:6.1f} tok/s", flush=True)
    data = {"machine": info, "threads": args.threads, "rounds": args.rounds, "results": res,
            "llama_bench_version": (version.stdout + version.stderr).strip(), "other_cpu_share": load.share()}
    machine.write_outputs("llama_bench", data, markdown(data), args.out_dir)


def markdown(d) -> str:
    rows = []
    for model, r in d["results"].items():
        for key, label in (("pp512", "prefill 512"), ("tg128", "decode 128")):
            a, b = [x[key] for x in r["tinyvllm"]], [x[key] for x in r["llama-bench"]]
            rows.append([Path(model).name, label, f"{statistics.median(a):.1f} ({min(a):.1f}-{max(a):.1f})",
                         f"{statistics.median(b):.1f} ({min(b):.1f}-{max(b):.1f})",
                         f"{statistics.median(a) / statistics.median(b):.2f}x"])
    m = d["machine"]
    share = d["other_cpu_share"]
    return "\n".join([
        "# tinyvllm vs llama.cpp's llama-bench", "",
        machine.busy_warning(share) +
        f"{m['date']} · {m['cpu'].get('model')} · {d['threads']} threads · {d['rounds']} rounds, engines alternating · "
        f"git {m['git_commit']} · other processes' CPU share {'?' if share is None else f'{share:.0%}'} · "
        f"llama-bench {d['llama_bench_version'].splitlines()[0] if d['llama_bench_version'] else '?'}", "",
        "tok/s, median (min-max) over rounds; each llama-bench round is its own average of 3 repetitions, each "
        "tinyvllm round the best of 3 in a fresh process. tinyvllm's numbers include its Python engine step.", "",
        machine.md_table(["model", "test", "tinyvllm", "llama-bench", "ratio"], rows),
    ])


if __name__ == "__main__":
    main()
