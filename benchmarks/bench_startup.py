"""Start-up time (issue 15, target 7): `LLM(...)` until ready, in fresh processes, as bench_engines.py
measures it (its TinyVLLM engine: `from tinyvllm import LLM` plus the constructor with the benchmark's
engine arguments), and the cold first token after it (a 16-token prompt, no warm-up).

Each repetition starts one child per model (and per checkout with --before), in alternating order;
the load average is read before each child. Prints min / median / max per model and checkout.

    python benchmarks/bench_startup.py                                   # reference model + gemma3-270m, 7 reps
    python benchmarks/bench_startup.py --before /path/to/other/checkout  # the same, interleaved with another tree
    python benchmarks/bench_startup.py --quick                           # smoke test (2 reps)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import machine  # noqa: E402

MODELS = "smollm2-135m,gemma3-270m"


def child(args) -> dict:
    sys.path.insert(0, args.tree)  # the checkout whose tinyvllm is timed
    import bench_engines
    t, cpu = time.perf_counter(), time.process_time()
    eng = bench_engines.TinyVLLM(args.model_path, args.threads)  # imports tinyvllm, then LLM(...)
    res = {"load_s": time.perf_counter() - t, "load_cpu_s": time.process_time() - cpu,
           "package": str(Path(sys.modules["tinyvllm"].__file__).parent)}
    ids = bench_engines.token_ids(eng.n_vocab, bench_engines.DECODE_PROMPT)
    res["first_token_s"] = eng.prefill(ids)
    return res


def run_child(args, tree: str, model_path: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--tree", tree, "--model-path", model_path, "--threads", str(args.threads)]
    load = os.getloadavg()[0]
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    if r.returncode or not lines:
        sys.exit(f"child failed (rc {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return {**json.loads(lines[-1][len("RESULT "):]), "loadavg_before": load}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=MODELS, help="names or .gguf paths")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--before", help="another checkout to time in the same run (its tinyvllm, the same library)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 reps")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    ap.add_argument("--model-path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    machine.use_source_tree(False)  # exports TINYVLLM_LIB (the newest build here) for every child
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    reps = 2 if args.quick else args.reps
    from tinyvllm.model import resolve_model
    models = {m: str(resolve_model(m)) for m in args.models.split(",")}
    trees = {"this checkout": str(machine.ROOT)}
    if args.before:
        trees["before"] = str(Path(args.before).resolve())
    runs = {(m, t): [] for m in models for t in trees}
    for rep in range(reps):
        order = [(m, t) for m in models for t in trees]
        for m, t in (order if rep % 2 == 0 else order[::-1]):
            runs[m, t].append(run_child(args, trees[t], models[m]))
    print(f"library {os.environ.get('TINYVLLM_LIB')}, threads {args.threads}, {reps} fresh processes each")
    print(f"{'model':14s} {'checkout':14s} {'load s (min / median / max)':30s} {'load CPU s median':18s} "
          f"{'first token s (min / median / max)':36s} load average")
    for (m, t), rs in runs.items():
        def mmm(key):
            xs = [r[key] for r in rs]
            return f"{min(xs):.3f} / {statistics.median(xs):.3f} / {max(xs):.3f}"
        loads = [r["loadavg_before"] for r in rs]
        print(f"{m:14s} {t:14s} {mmm('load_s'):30s} {statistics.median(r['load_cpu_s'] for r in rs):<18.3f} "
              f"{mmm('first_token_s'):36s} {min(loads):.2f}-{max(loads):.2f}")


if __name__ == "__main__":
    main()
