"""Sampler cost per sequence per decode step (issue 15, target 1): Sampler.sample on real logits of the
reference model (64 chat prompts, one decode step captured), at 1/16/32/64 rows, temperature 0.8 /
top-p 0.95 with a seed per request (the chat workload's setting), plus greedy.

With --before REF the sampler.py of git REF is timed too, interleaved with this one (A, B, A, B, ...),
so both see the same load. Figures: microseconds per sequence, min and median over --repeats calls,
thread CPU time and wall time; the load average is printed before the run.

    python benchmarks/bench_sampler.py --before main
"""
import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def real_logits(n: int = 64) -> np.ndarray:
    """float32 [n, V]: the logits of one decode step of n chat prompts (cut from the docs)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_load
    from tinyvllm import LLMEngine, SamplingParams
    eng = LLMEngine(bench_load.MODEL, threads=2, kv_cache_bytes=256 * 2**20, max_model_len=512, max_num_seqs=n)
    ids = bench_load.text_tokens(eng.tokenizer)
    captured = []
    real = eng.sampler.sample
    eng.sampler.sample = lambda logits, *a, **k: (captured.append(np.array(logits)), real(logits, *a, **k))[1]
    for i in range(n):
        eng.add_request(str(i), {"prompt_token_ids": ids[i * 40:i * 40 + 48]},
                        SamplingParams(max_tokens=2, temperature=0.8, top_p=0.95, seed=i, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    rows = np.concatenate([c for c in captured if len(c) > 1])
    return np.ascontiguousarray(rows[-n:])


def load_sampler(ref: str | None):
    if ref is None:
        import tinyvllm.sampler as mod
        return mod
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:tinyvllm/sampler.py"], capture_output=True,
                         text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "sampler_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("sampler_before", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


class State:
    def __init__(self, mod, params, i):
        self.params, self.prompt_token_ids, self.output_token_ids = params, [], []
        self.generator = mod.make_generator(params, i)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default=None, help="git ref whose tinyvllm/sampler.py to time as well")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--rows", default="1,16,32,64")
    args = ap.parse_args()
    from tinyvllm import SamplingParams
    logits = real_logits()
    print(f"load average before: {os.getloadavg()}", flush=True)
    mods = {"after": load_sampler(None)}
    if args.before:
        mods = {"before": load_sampler(args.before), **mods}
    print(f"{'setting':>22} {'rows':>4} " + " ".join(f"{n + ' cpu us/seq min/med':>28} {n + ' wall min':>14}" for n in mods))
    for name, kw in [("T=0.8 top_p=0.95", dict(temperature=0.8, top_p=0.95)), ("greedy", dict(temperature=0.0))]:
        for B in map(int, args.rows.split(",")):
            x = logits[:B]
            times = {n: ([], []) for n in mods}
            samplers = {n: m.Sampler(0) for n, m in mods.items()}
            states = {n: [State(m, SamplingParams(seed=i, **kw), i) for i in range(B)] for n, m in mods.items()}
            for _ in range(args.repeats):
                for n in mods:
                    c, w = time.thread_time(), time.perf_counter()
                    samplers[n].sample(x, states[n])
                    times[n][0].append((time.thread_time() - c) / B * 1e6)
                    times[n][1].append((time.perf_counter() - w) / B * 1e6)
            print(f"{name:>22} {B:>4} " + " ".join(
                f"{min(times[n][0]):>13.1f} / {statistics.median(times[n][0]):>12.1f} {min(times[n][1]):>14.1f}"
                for n in mods), flush=True)


if __name__ == "__main__":
    main()
