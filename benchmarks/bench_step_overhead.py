"""Python overhead per decode step: an engine step's wall time minus the time inside the runner
(forward and copy-on-write block copies), at 1, 16 and 64 running sequences, and how many native
block-manager calls one step makes.

Two checkouts are compared in one run (issue 17's before/after): each measurement is a child
process importing tinyvllm from one checkout with that checkout's own library, and the children
alternate (before, after, before, after, ...) so that machine noise falls on both alike.

    python benchmarks/bench_step_overhead.py --before /path/to/old/checkout     # about 3 minutes
    python benchmarks/bench_step_overhead.py --before ... --quick  # smoke test: 1 and 16 sequences, 4 steps, to /tmp
    python benchmarks/bench_step_overhead.py --before ... --before-lib .../libtinyvllm.so

A checkout's library is its newest build*/libtinyvllm.so unless --*-lib names one. The block
manager's calls are counted by wrapping the `lib` object its Python module calls through.
"""
import argparse
import importlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

BATCHES = (1, 16, 64)


class _CountingLib:
    def __init__(self, lib):
        self._lib, self.calls = lib, 0

    def __getattr__(self, name):
        fn = getattr(self._lib, name)
        if not name.startswith("tv_block_manager") or not callable(fn):
            return fn

        def counted(*args):
            self.calls += 1
            return fn(*args)
        return counted


def child(model: str, batch: int, steps: int, threads: int) -> dict:
    """Runs in the child: `batch` sequences past their prefill, then `steps` timed decode steps."""
    from tinyvllm import LLMEngine, SamplingParams
    bm_module = next(m for name in ("tinyvllm.engine.block_manager", "tinyvllm.core.block_manager")
                     if (m := _try_import(name)) is not None)
    counting = bm_module.lib = _CountingLib(bm_module.lib)
    eng = LLMEngine(model, threads=threads, max_num_seqs=max(BATCHES), max_num_batched_tokens=1024,
                    kv_cache_bytes=256 * 2**20, max_model_len=512)
    runner_s = [0.0]

    def timed(fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                runner_s[0] += time.perf_counter() - t
        return wrapper
    eng.runner.forward, eng.runner.copy_block = timed(eng.runner.forward), timed(eng.runner.copy_block)
    params = SamplingParams(max_tokens=steps + 8, temperature=0.8, top_p=0.95, seed=1, ignore_eos=True)
    for i in range(batch):
        eng.add_request(str(i), {"prompt_token_ids": [(7 * i + j) % 1000 + 100 for j in range(24)]}, params)
    while eng.stats()["generated_tokens"] < batch:  # every prompt prefilled, one token sampled each
        eng.step()
    eng.step()
    overhead, wall, calls = [], [], []
    for _ in range(steps):
        runner_s[0], c0 = 0.0, counting.calls
        t = time.perf_counter()
        eng.step()
        dt = time.perf_counter() - t
        wall.append(dt)
        overhead.append(dt - runner_s[0])
        calls.append(counting.calls - c0)
    assert eng.stats()["last_batch_size"] == batch
    return {"overhead_s": overhead, "wall_s": wall, "bm_calls": calls}


def _try_import(name):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def newest_lib(repo: Path) -> str:
    libs = sorted((p for b in repo.glob("build*") if "asan" not in b.name and "aarch64" not in b.name
                   for p in b.rglob("libtinyvllm.so")), key=lambda p: -p.stat().st_mtime)
    if not libs:
        sys.exit(f"no build*/libtinyvllm.so under {repo}: build it first")
    return str(libs[0])


def run_child(repo: Path, lib: str, args, batch: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(repo), TINYVLLM_LIB=lib)
    cmd = [sys.executable, __file__, "--child", str(batch), "--model", args.model, "--steps", str(args.steps),
           "--threads", str(args.threads)]
    return machine.child_result(cmd, f"child ({repo}, batch {batch})", env=env, cwd=repo)


def spread(xs, scale=1e6) -> list[float]:
    return [round(min(xs) * scale, 1), round(statistics.median(xs) * scale, 1), round(max(xs) * scale, 1)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, help="the older checkout")
    ap.add_argument("--after", type=Path, default=machine.ROOT, help="the newer checkout (default: this one)")
    ap.add_argument("--before-lib"), ap.add_argument("--after-lib")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3, help="child runs per checkout and batch size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", type=Path, default=machine.DOCS)
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 and 16 sequences, 4 steps, 1 run, "
                    "written under /tmp unless --out-dir is given")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        machine.print_result(child(args.model, args.child, args.steps, args.threads))
        return
    if not args.before:
        ap.error("--before is required")
    batches = BATCHES
    if args.quick:
        batches, args.steps, args.repeats = BATCHES[:2], 4, 1
        if args.out_dir == machine.DOCS:
            args.out_dir = Path("/tmp")
    sides = {"before": (args.before.resolve(), args.before_lib or newest_lib(args.before)),
             "after": (args.after.resolve(), args.after_lib or newest_lib(args.after))}
    commits = {k: subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                                 text=True).stdout.strip() for k, (repo, _) in sides.items()}
    load = machine.OtherLoad()
    data = {"machine": machine.machine_info(), "model": args.model, "steps": args.steps, "repeats": args.repeats,
            "threads": args.threads, "commits": commits, "quick": args.quick, "results": {}}
    for batch in batches:
        got = {k: {"overhead_s": [], "wall_s": [], "bm_calls": []} for k in sides}
        for _ in range(args.repeats):
            for k, (repo, lib) in sides.items():
                r = run_child(repo, lib, args, batch)
                for f in got[k]:
                    got[k][f] += r[f]
        data["results"][batch] = got
        print(f"batch {batch}: " + ", ".join(f"{k} overhead median {statistics.median(v['overhead_s']) * 1e6:.0f} us"
                                              for k, v in got.items()), flush=True)
    data["other_load_share"] = load.share()
    rows = []
    for batch, got in data["results"].items():
        b, a = got["before"], got["after"]
        rows.append([batch, "/".join(map(str, spread(b["overhead_s"]))), "/".join(map(str, spread(a["overhead_s"]))),
                     f"{statistics.median(b['overhead_s']) / statistics.median(a['overhead_s']):.2f}x",
                     f"{statistics.median(b['bm_calls']):.0f}", f"{statistics.median(a['bm_calls']):.0f}",
                     f"{statistics.median(b['wall_s']) * 1e3:.1f}", f"{statistics.median(a['wall_s']) * 1e3:.1f}"])
    md = ("# Python overhead per decode step\n\n" + machine.caveats(data["other_load_share"], args.quick) +
          f"`benchmarks/bench_step_overhead.py`: {args.model}, {args.threads} threads, temperature 0.8 / top-p "
          f"0.95, {args.steps} decode steps x {args.repeats} child runs per cell, before = {commits['before']}, "
          f"after = {commits['after']}, children alternating. Overhead = step wall time minus time inside the "
          "runner (forward, block copies): scheduling, block-manager calls, sampling, detokenizing, outputs. "
          f"Other processes' CPU share during the run: {data['other_load_share']:.0%}.\n\n"
          + machine.md_table(["running seqs", "before us (min/med/max)", "after us (min/med/max)", "speed-up",
                              "block-manager calls/step before", "after", "step ms before", "step ms after"], rows))
    machine.write_outputs("step_overhead", data, md, args.out_dir)


if __name__ == "__main__":
    main()
