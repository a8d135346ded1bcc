"""x86 without AVX-512: tinyvllm forced onto its AVX2 kernels (TINYVLLM_KERNEL=avx2) against
llama.cpp's own `llama-bench` built with AVX-512 (and AMX) off, alternating in one run.

Same measurements as bench_llama_bench.py (whose child and llama-bench runner this reuses): prefill
of 512 tokens and 128 decode steps at batch 1, on the reference Q4_1 model and its Q4_K_M file.
tinyvllm's AVX-512 path runs too (`--with-avx512`, default on) for the AVX2/AVX-512 ratio on the same
machine. The load average is read before every measurement.

    # llama-bench without AVX-512: cmake -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON
    #   -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF ... --target llama-bench
    python benchmarks/bench_avx2.py --llama-bench /work/llama-tools/avx2/bin/llama-bench [--rounds 3]
Writes docs/benchmarks/avx2.{json,md}.
"""
import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402
from bench_engines import resolve  # noqa: E402
from bench_llama_bench import ours, theirs  # noqa: E402

TARGET = 1.5  # issue 15, target 4: AVX2 prefill and decode >= 1.5x llama.cpp without AVX-512


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def ours_on(kernel: str, path: Path, threads: int) -> dict:
    os.environ["TINYVLLM_KERNEL"] = kernel  # the child inherits it; the library reads it at first use
    try:
        return ours(path, threads)
    finally:
        del os.environ["TINYVLLM_KERNEL"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", required=True, help="llama-bench built with AVX-512 and AMX off")
    ap.add_argument("--models", default="smollm2-135m,q4_k_m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--with-avx512", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--llama-flags", default="-fa on,off -ub 256,512",
                    help="llama-bench options, comma lists allowed (its best per test is kept)")
    ap.add_argument("--out-dir", type=Path, default=machine.DOCS)
    args = ap.parse_args()
    machine.use_source_tree(False)
    info, load = machine.machine_info(), machine.OtherLoad()
    version = subprocess.run([args.llama_bench, "--version"], capture_output=True, text=True)
    models = [resolve(m) for m in args.models.split(",")]
    engines = [("tinyvllm avx2", lambda m: ours_on("avx2", m, args.threads)),
               ("llama-bench avx2", lambda m: theirs(args.llama_bench, m, args.threads, args.llama_flags))]
    if args.with_avx512:
        engines.append(("tinyvllm avx512vnni", lambda m: ours_on("avx512vnni", m, args.threads)))
    res = {str(m): {name: [] for name, _ in engines} for m in models}
    for rnd in range(args.rounds):
        for m in models:
            for name, fn in (engines if rnd % 2 == 0 else engines[::-1]):
                before = loadavg()
                r = fn(m)
                r["loadavg_before"] = before
                res[str(m)][name].append(r)
                print(f"round {rnd} {m.name[:40]:40s} {name:19s} pp512 {r['pp512']:7.1f}  tg128 {r['tg128']:6.1f} tok/s"
                      f"  (load {before:.2f})", flush=True)
    data = {"machine": info, "threads": args.threads, "rounds": args.rounds, "results": res, "target": TARGET,
            "llama_bench": args.llama_bench, "llama_flags": args.llama_flags, "llama_bench_version": (version.stdout + version.stderr).strip(),
            "other_cpu_share": load.share()}
    machine.write_outputs("avx2", data, markdown(data), args.out_dir)


def spread(v) -> str:
    return f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})"


def markdown(d) -> str:
    rows = []
    for model, r in d["results"].items():
        for key, label in (("pp512", "prefill 512"), ("tg128", "decode 128")):
            ours_v, theirs_v = [x[key] for x in r["tinyvllm avx2"]], [x[key] for x in r["llama-bench avx2"]]
            ratio = statistics.median(ours_v) / statistics.median(theirs_v)
            row = [Path(model).name, label, spread(ours_v), spread(theirs_v),
                   f"{ratio:.2f}x {'meets' if ratio >= d['target'] else 'misses'} {d['target']}x"]
            if "tinyvllm avx512vnni" in r:
                row.append(spread([x[key] for x in r["tinyvllm avx512vnni"]]))
            rows.append(row)
    loads = [x["loadavg_before"] for r in d["results"].values() for v in r.values() for x in v]
    has512 = any("tinyvllm avx512vnni" in r for r in d["results"].values())
    header = ["model", "test", "tinyvllm avx2", "llama-bench avx2", "ratio (target)"] + (["tinyvllm avx512vnni"] if has512 else [])
    m, share = d["machine"], d["other_cpu_share"]
    return "\n".join([
        "# AVX2 without AVX-512: tinyvllm vs llama.cpp", "",
        machine.busy_warning(share) +
        f"{m['date']} · {m['cpu'].get('model')} · {d['threads']} threads · {d['rounds']} rounds, engines alternating · "
        f"git {m['git_commit']} · other processes' CPU share {'?' if share is None else f'{share:.0%}'} · "
        f"load average before each measurement {min(loads):.2f}-{max(loads):.2f} · "
        f"llama-bench {d['llama_bench_version'].splitlines()[0] if d['llama_bench_version'] else '?'} "
        f"(`{d['llama_bench']}`: built with AVX-512 and AMX off)", "",
        "tok/s, median (min-max) over rounds. tinyvllm runs with `TINYVLLM_KERNEL=avx2` (its AVX2 + FMA + F16C "
        "kernels, no AVX-512 instruction); each of its rounds is the best of 3 in a fresh process, its Python engine "
        "step included. Each llama-bench round is its own average of 3 repetitions (pp512, tg128), the best over "
        f"`{d.get('llama_flags', '')}`."
        + (" The last column is tinyvllm's AVX-512 path on the same machine, for the cost of lacking AVX-512."
           if has512 else ""), "",
        machine.md_table(header, rows),
    ])


if __name__ == "__main__":
    main()
