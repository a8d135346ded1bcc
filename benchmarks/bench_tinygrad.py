"""tinyvllm on tinygrad vs the native CPU core (and llama.cpp, single stream) on the reference model.

Each engine runs in its own child process. A child builds the engine (load_s), runs the whole
workload once to warm up (warmup_s: for tinygrad this captures and compiles every JIT bucket the
workload needs), then times it: per stream count S, S prompts of PROMPT tokens prefill in one step and
then decode `--tokens` steps together; decode tok/s = S * tokens / time of those steps.
Writes docs/benchmarks/tinygrad.{json,md}.

    python3 benchmarks/bench_tinygrad.py                          # full run (quiet machine!)
    python3 benchmarks/bench_tinygrad.py --tokens 8 --streams 1 4 --reps 1   # smoke test

tinygrad runs on its default device (DEV=CPU here; DEV=CUDA on a Jetson). llama.cpp comes from
.venv-bench (benchmarks/setup_env.sh) when that exists; it is timed single-stream only.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402
from bench_engines import token_ids  # noqa: E402

MODEL = "smollm2-135m"
PROMPT = 16
VENV_BENCH = machine.ROOT / ".venv-bench" / "bin" / "python"


# ---- in the child ----------------------------------------------------------------------------------
class Engine:
    """tinyvllm's LLMEngine on one device; steps driven by hand so only decode steps are timed."""

    def __init__(self, path, device, threads, max_streams):
        from tinyvllm import LLM, SamplingParams
        self.SP = SamplingParams
        self.llm = LLM(str(path), device=device, threads=threads, max_num_seqs=max_streams,
                       max_num_batched_tokens=max(256, PROMPT * max_streams), kv_cache_bytes=64 * 2**20,
                       enable_prefix_caching=False)
        self.engine = self.llm.engine

    def decode(self, prompts, n) -> float:
        for ids in prompts:
            self.engine.add_request(None, {"prompt_token_ids": ids}, self.SP(max_tokens=n + 1, temperature=0, ignore_eos=True))
        while not self.engine.step():  # one prefill step samples every stream's first token
            pass
        t, done = time.perf_counter(), 0
        while done < len(prompts):
            done += sum(o.finished for o in self.engine.step())
        return time.perf_counter() - t


class LlamaCpp:
    def __init__(self, path, threads, max_streams):
        import llama_cpp
        import numpy as np
        self.np = np
        self.llm = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=2048,
                                   n_batch=512, verbose=False)

    def _argmax(self) -> int:
        logits = self.llm._ctx.get_logits_ith(-1)
        return int(self.np.argmax(self.np.ctypeslib.as_array(logits, shape=(self.llm.n_vocab(),))))

    def decode(self, prompts, n) -> float:
        assert len(prompts) == 1, "llama.cpp is timed single-stream only"
        self.llm.reset()
        self.llm.eval(prompts[0])
        tok = self._argmax()
        t = time.perf_counter()
        for _ in range(n):
            self.llm.eval([tok])
            tok = self._argmax()
        return time.perf_counter() - t


def child(a) -> dict:
    t = time.perf_counter()
    streams = [s for s in a.streams if a.engine != "llama.cpp" or s == 1]
    eng = LlamaCpp(a.model_path, a.threads, max(streams)) if a.engine == "llama.cpp" else \
        Engine(a.model_path, "tinygrad" if a.engine == "tinygrad" else "cpu", a.threads, max(streams))
    res = {"engine": a.engine, "load_s": time.perf_counter() - t, "decode_s": {}}
    ids = token_ids(a.vocab, PROMPT * max(streams))
    work = {s: [ids[i * PROMPT:(i + 1) * PROMPT] for i in range(s)] for s in streams}
    t = time.perf_counter()
    for s in streams:  # warm-up: for tinygrad, captures every bucket the timed runs use
        eng.decode(work[s], a.tokens)
    res["warmup_s"] = time.perf_counter() - t
    if a.engine == "tinygrad":
        from tinygrad.codegen import to_program_cache
        runner = eng.engine.runner
        res["tinygrad"] = {"device": runner.device, "buckets": [list(k) for k in runner.jits],
                           "programs_compiled": len(to_program_cache),
                           "kernels_per_step": {str(list(k)): len(j.captured.linear.src) for k, j in runner.jits.items()
                                                if j.captured is not None}}
    for s in streams:
        res["decode_s"][s] = [eng.decode(work[s], a.tokens) for _ in range(a.reps)]
    if a.engine == "tinygrad":
        from tinygrad.codegen import to_program_cache
        res["tinygrad"]["programs_compiled_while_timed"] = len(to_program_cache) - res["tinygrad"]["programs_compiled"]
    return res


# ---- in the parent -----------------------------------------------------------------------------------
def run_child(engine, a, model_path, vocab) -> dict | None:
    python = str(VENV_BENCH) if engine == "llama.cpp" else sys.executable
    if engine == "llama.cpp" and not VENV_BENCH.exists():
        print("llama.cpp: .venv-bench not found (bash benchmarks/setup_env.sh); skipped")
        return None
    cmd = [python, __file__, "--child", engine, "--model-path", str(model_path), "--vocab", str(vocab),
           "--threads", str(a.threads), "--tokens", str(a.tokens), "--reps", str(a.reps),
           "--streams", *map(str, a.streams)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(machine.ROOT), os.environ.get("PYTHONPATH", "")]))
    print(f"== {engine}", flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(out.stderr[-3000:])
        raise SystemExit(f"{engine} child failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="decode steps timed per run")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--engines", nargs="+", default=["tinygrad", "native", "llama.cpp"])
    ap.add_argument("--out", default=str(machine.DOCS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model-path", help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(argparse.Namespace(**{**vars(a), "engine": a.child}))))
        return
    machine.use_source_tree(False)
    from tinyvllm.model import load_model, resolve_model
    path = resolve_model(a.model, progress=False)
    vocab = load_model(path).config.vocab_size
    load = machine.OtherLoad()
    results = [r for e in a.engines if (r := run_child(e, a, path, vocab))]
    for r in results:
        r["decode_tok_s"] = {s: statistics.median(int(s) * a.tokens / t for t in ts) for s, ts in r["decode_s"].items()}
    data = {"machine": machine.machine_info(), "model": a.model, "prompt_tokens": PROMPT, "decode_tokens": a.tokens,
            "reps": a.reps, "threads": a.threads, "other_load": load.share(), "results": results,
            "command": "python3 benchmarks/bench_tinygrad.py " + " ".join(sys.argv[1:])}
    machine.write_outputs("tinygrad", data, markdown(data, a.streams), Path(a.out))


def markdown(d, streams) -> str:
    rows = []
    for r in d["results"]:
        tg = r.get("tinygrad", {})
        rows.append([r["engine"] + (f" ({tg['device']})" if tg else ""), f"{r['load_s']:.1f}", f"{r['warmup_s']:.1f}",
                     *(f"{r['decode_tok_s'][str(s)]:.1f}" if str(s) in r["decode_tok_s"] else "n/a" for s in streams)])
    notes = []
    for r in d["results"]:
        if (tg := r.get("tinygrad")):
            notes.append(f"tinygrad: {len(tg['buckets'])} JIT buckets {tg['buckets']} (tokens, blocks/seq, logits rows), "
                         f"{tg['programs_compiled']} programs compiled during warm-up, "
                         f"{tg['programs_compiled_while_timed']} while timed; kernels per step {tg['kernels_per_step']}.")
    return (f"# tinyvllm on tinygrad vs native CPU core ({d['model']}, {d['threads']} threads)\n\n"
            + machine.busy_warning(d["other_load"])
            + f"Prompt {d['prompt_tokens']} tokens per stream, {d['decode_tokens']} decode steps timed, median of "
            f"{d['reps']}. Warm-up = first run of the whole workload (tinygrad: JIT capture + compile of every bucket).\n"
            f"Command: `{d['command']}`\n\n"
            + machine.md_table(["engine", "load s", "warm-up s", *(f"decode tok/s, {s} stream(s)" for s in streams)], rows)
            + "\n\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
