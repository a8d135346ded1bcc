"""tinyvllm's kernels against the machine's measured ceilings, through the C ABI (tv_matmul).

  - GEMV (m = 1, decode): GB/s of weight bytes on the reference model's shapes, vs the measured read
    bandwidth. "streamed" cycles through enough copies of the weight (>= 256 MiB) that every call reads
    from DRAM, as a decode step does (96.6 MB of weights per token do not fit the caches); "hot" repeats
    one copy (cache-resident when it fits L2/L3).
  - GEMM (m = 16 batched decode, 64/128/512 prefill): GOP/s (2 ops per multiply-add) vs the measured int16 and int8
    dot-product peaks (benchmarks/membw.c) and the peak computed from /proc/cpuinfo's clock.
  - attention: flash attention (tv_attention) vs a naive numpy attention (materialized score
    matrix) at 512 and 2048 tokens: time and peak memory (O(n) vs O(n^2)).

    .venv-bench/bin/python benchmarks/bench_kernels.py [--threads 2] [--quick]
Writes docs/benchmarks/kernels.{json,md}. Any python3 with numpy + cffi works (no llama.cpp needed).
"""
import argparse
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

Q4_1, Q8_0 = 3, 8
GEMV_SHAPES = [("Q4_1", Q4_1, 576, 576, "attn q / o"), ("Q4_1", Q4_1, 1536, 576, "ffn gate / up"),
               ("Q4_1", Q4_1, 576, 1536, "ffn down"), ("Q8_0", Q8_0, 49152, 576, "output (tied embedding)")]
GEMM_M = (16, 64, 128, 512)  # 16: a batched decode step of 16 streams
# Per-cycle, per-core dot-product throughput of one 512-bit instruction, for the formula peak.
MACS_PER_INSTR = {"int16_dot": 32, "int8_dot": 64}  # vpdpwssd: 16 lanes x 2; vpdpbusd: 16 lanes x 4


def make_weight(nat, dtype, rows, cols, copies=1):
    """`copies` random weights with finite fp16 scales (d, and m for Q4_1), as tv_tensor structs."""
    row_bytes = nat.lib.tv_row_bytes(dtype, cols)
    blk = row_bytes // (cols // 32)
    rng = np.random.default_rng(0)
    keep, descs = [], []
    for _ in range(copies):
        w = rng.integers(0, 256, size=(rows, cols // 32, blk), dtype=np.uint8)
        w[:, :, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        if dtype == Q4_1:
            w[:, :, 2:4] = np.frombuffer(np.float16(-0.05).tobytes(), np.uint8)
        keep.append(w)
        descs.append(nat.ffi.new("tv_tensor *", dict(dtype=dtype, rows=rows, cols=cols,
                                                     data=nat.ffi.cast("void *", w.ctypes.data), nbytes=w.nbytes)))
    return keep, descs, rows * row_bytes


def time_calls(fn, min_s):
    """Seconds per call: calls repeated for at least min_s, best of 3 such batches."""
    fn()
    best = float("inf")
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while (dt := time.perf_counter() - t0) < min_s or n < 3:
            fn()
            n += 1
        best = min(best, dt / n)
    return best


def bench_matmul(nat, desc_list, m, cols, rows, threads, min_s):
    x = np.random.default_rng(1).standard_normal((m, cols)).astype(np.float32)
    y = np.empty((m, rows), np.float32)
    xp, yp = nat.ptr(x), nat.ptr(y)
    it = [0]

    def call():
        nat.check(nat.lib.tv_matmul(desc_list[it[0] % len(desc_list)], xp, m, yp, threads))
        it[0] += 1
    return time_calls(call, min_s)


def naive_attention(q, k, v):
    """Causal GQA attention materializing the [heads, n, n] score matrix. q [H,n,D], k/v [Hkv,n,D]."""
    rep = q.shape[0] // k.shape[0]
    k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
    s = q @ k.transpose(0, 2, 1) * np.float32(1 / np.sqrt(q.shape[-1]))
    s += np.triu(np.full(s.shape[-2:], -np.inf, np.float32), 1)
    s = np.exp(s - s.max(-1, keepdims=True))
    return (s / s.sum(-1, keepdims=True)) @ v


def _status_bytes(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024


def peak_extra_bytes(fn):
    """Peak resident memory fn adds above the RSS before it (Linux: VmHWM reset via clear_refs), so
    native allocations count too; None where /proc does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_bytes("VmRSS")
        fn()
        return max(0, _status_bytes("VmHWM") - before)
    except (OSError, StopIteration):
        return None


_PEAK_CHILD = """
import sys, numpy as np
sys.path.insert(0, sys.argv[3]); sys.path.insert(0, sys.argv[4])
import bench_kernels as bk
from tinyvllm import _native as nat
n, threads = int(sys.argv[1]), int(sys.argv[2])
q = np.random.default_rng(0).standard_normal((n, 9, 64), np.float32)
k, v, o = q[:, :3].copy(), q[:, 3:6].copy(), np.zeros_like(q)
print(bk.peak_extra_bytes(lambda: nat.check(nat.lib.tv_attention(n, n, 9, 3, 64, nat.ptr(q), nat.ptr(k), nat.ptr(v),
                                                                1, nat.ptr(o), threads))))
"""


def native_peak(nat, n, threads):
    """tv_attention's peak memory, measured in a fresh child process (in this one, pages freed by
    earlier numpy work are reused and the call would seem to take nothing)."""
    env = dict(os.environ, TINYVLLM_LIB=str(nat.LIB_PATH))
    r = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(n), str(threads), str(Path(__file__).resolve().parent),
                        str(Path(nat.__file__).resolve().parent.parent)], env=env, capture_output=True, text=True)
    return int(r.stdout.split()[-1]) if r.returncode == 0 and r.stdout.split()[-1].isdigit() else None


def bench_attention(nat, quick, threads):
    H, HKV, D, F16 = 9, 3, 64, 1
    out = {"heads": H, "kv_heads": HKV, "head_dim": D, "kv_dtype": "f16", "naive_numpy": {}, "tinyvllm": {}}
    for n in (512, 2048):
        rng = np.random.default_rng(n)
        q = rng.standard_normal((H, n, D), np.float32)
        k, v = (rng.standard_normal((HKV, n, D), np.float32) for _ in range(2))
        tracemalloc.start()
        ref = naive_attention(q, k, v)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        out["naive_numpy"][n] = {"s": time_calls(lambda: naive_attention(q, k, v), 0.2 if quick else 1.0),
                                 "peak_bytes": peak}
        # tv_attention: [token][head][dim] rows, the whole causal prefill (n queries over n keys) in one call;
        # its cost includes copying K/V into a temporary fp16 paged cache (O(n), as the engine's cache holds it)
        qt, kt, vt = (np.ascontiguousarray(a.transpose(1, 0, 2)) for a in (q, k, v))
        o = np.empty_like(qt)

        def flash(n_q=n):
            nat.check(nat.lib.tv_attention(n_q, n, H, HKV, D, nat.ptr(qt[n - n_q:]), nat.ptr(kt), nat.ptr(vt), F16,
                                           nat.ptr(o), threads))
        out["tinyvllm"][n] = {"s": time_calls(flash, 0.2 if quick else 1.0), "peak_rss_bytes": native_peak(nat, n, threads),
                              "max_abs_diff_vs_naive": float(np.abs(o.transpose(1, 0, 2) - ref).max())}
        print(f"  attention n={n}: naive {out['naive_numpy'][n]['s'] * 1e3:.1f} ms, "
              f"flash {out['tinyvllm'][n]['s'] * 1e3:.1f} ms")
    out["note"] = ("naive: numpy float32, materializes the [heads, n, n] scores; tinyvllm: tv_attention (the tiled "
                   "flash kernel of tv_model_forward: one online-softmax update per 16-key block, no score matrix), "
                   "K/V copied into an fp16 paged cache inside the call. Peak memory: naive by tracemalloc (numpy's "
                   "allocations), tinyvllm by resident memory above the RSS before the call (VmHWM, in a fresh child "
                   "process so no freed pages are reused)")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--installed", action="store_true", help="use the installed tinyvllm, not this checkout")
    ap.add_argument("--out-dir", type=Path, default=machine.DOCS)
    args = ap.parse_args()
    machine.use_source_tree(args.installed)
    from tinyvllm import _native as nat
    min_s = 0.1 if args.quick else 0.5
    T = args.threads
    info = machine.machine_info()
    load = machine.OtherLoad()
    kernel_path = nat.ffi.string(nat.lib.tv_kernel_path()).decode()
    print(f"lib {nat.LIB_PATH} (kernels {kernel_path}), threads {T}, load {info['loadavg_at_start']}")

    bw = machine.read_bandwidth(T, reps=3 if args.quick else 7)
    peaks = machine.compute_peaks(T)
    mhz = info["cpu"].get("mhz_cpuinfo")
    formula = {k: v * 2 * mhz * 1e6 * T for k, v in MACS_PER_INSTR.items()} if mhz else {}
    print(f"read bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s; measured peaks (GOP/s): "
          + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks.items() if isinstance(v, float)))

    # a call with almost no work: the fixed cost (Python + cffi + thread-pool dispatch) in every number below
    _, tiny, _ = make_weight(nat, Q8_0, 1, 32)
    overhead = bench_matmul(nat, tiny, 1, 32, 1, T, min_s)

    gemv = []
    for name, dt, rows, cols, role in GEMV_SHAPES:
        _, one, nbytes = make_weight(nat, dt, rows, cols)
        hot = bench_matmul(nat, one, 1, cols, rows, T, min_s)
        del one
        keep, many, _ = make_weight(nat, dt, rows, cols, copies=max(2, -(-256 * 2**20 // nbytes)))
        cold = bench_matmul(nat, many, 1, cols, rows, T, min_s)
        del keep, many
        gemv.append({"dtype": name, "rows": rows, "cols": cols, "role": role, "weight_bytes": nbytes,
                     "hot_s": hot, "streamed_s": cold, "hot_GBps": nbytes / hot / 1e9,
                     "streamed_GBps": nbytes / cold / 1e9, "streamed_fraction_of_bw": nbytes / cold / bw["bytes_per_s"]})
        print(f"  GEMV {name} {rows}x{cols}: streamed {gemv[-1]['streamed_GBps']:.1f} GB/s, hot {gemv[-1]['hot_GBps']:.1f}")

    gemm = []
    for name, dt, rows, cols, role in GEMV_SHAPES[:3]:
        _, one, nbytes = make_weight(nat, dt, rows, cols)
        for m in GEMM_M:
            s = bench_matmul(nat, one, m, cols, rows, T, min_s)
            ops = 2 * m * rows * cols
            r = {"dtype": name, "rows": rows, "cols": cols, "m": m, "role": role, "s": s, "GOPs": ops / s / 1e9}
            for k in ("int16_dot", "int8_dot"):
                if peaks.get(f"{k}_ops_per_s"):
                    r[f"fraction_of_{k}_peak"] = ops / s / peaks[f"{k}_ops_per_s"]
            gemm.append(r)
            print(f"  GEMM {name} {rows}x{cols} m={m}: {r['GOPs']:.1f} GOP/s")

    attn = bench_attention(nat, args.quick, T)
    data = {"threads": T, "quick": args.quick, "machine": info, "lib": str(nat.LIB_PATH), "kernel_path": kernel_path,
            "read_bandwidth": bw, "measured_peaks_ops_per_s": peaks, "formula_peaks_ops_per_s": formula,
            "call_overhead_s": overhead, "gemv": gemv, "gemm": gemm, "attention": attn,
            "loadavg_at_end": os.getloadavg(), "other_cpu_share": load.share()}
    machine.write_outputs("kernels", data, markdown(data), args.out_dir)


def markdown(d) -> str:
    m, bw, pk, fp = d["machine"], d["read_bandwidth"], d["measured_peaks_ops_per_s"], d["formula_peaks_ops_per_s"]
    cpu = m["cpu"]

    def g(v):
        return f"{v / 1e9:.0f}" if v else "-"

    def mib(v):
        return "-" if v is None else f"{v / 2**20:.1f}"
    lines = [
        "# tinyvllm kernels vs the machine", "",
        machine.caveats(d["other_cpu_share"], d["quick"]) +
        f"{m['date']} · {cpu.get('model')} · {d['threads']} threads · kernels `{d['kernel_path']}` · "
        f"other processes' CPU share during the run "
        f"{'?' if d['other_cpu_share'] is None else format(d['other_cpu_share'], '.0%')} · git {m['git_commit']}", "",
        "## Ceilings (measured in the same run)", "",
        f"- read bandwidth: **{bw['bytes_per_s'] / 1e9:.1f} GB/s** ({bw['threads']} threads, "
        f"{bw['buffer_bytes'] >> 20} MiB buffer; {bw['method']})",
        f"- int16 dot product (vpdpwssd; vpmaddwd+vpaddd without VNNI): **{g(pk.get('int16_dot_ops_per_s'))} GOP/s** "
        f"measured; formula {g(fp.get('int16_dot'))} = 32 MACs/instr x 2 ops x 1 instr/cycle x "
        f"{cpu.get('mhz_cpuinfo')} MHz (/proc/cpuinfo) x {d['threads']} cores",
        f"- int8 dot product (vpdpbusd): **{g(pk.get('int8_dot_ops_per_s'))} GOP/s** measured; formula "
        f"{g(fp.get('int8_dot'))} (64 MACs/instr)",
        f"- fp32 FMA: {g(pk.get('fp32_fma_ops_per_s'))} GFLOP/s measured",
        "- the formula assumes one 512-bit dot-product instruction per cycle per core at the clock /proc/cpuinfo "
        "reports; a VM often reports the base clock while the core boosts, so the measured peak (dependency-free "
        "register chains, benchmarks/membw.c) is the ceiling used below.", "",
        f"Every number includes a fixed per-call cost (Python + cffi + thread-pool dispatch) of "
        f"{d['call_overhead_s'] * 1e6:.1f} us, measured on a 1x32 matmul.", "",
        "## GEMV (m = 1, decode): GB/s of weight bytes", "",
        machine.md_table(["weight", "role", "MB", "streamed us", "streamed GB/s", "of read bandwidth", "hot us", "hot GB/s"],
                         [[f"{r['dtype']} {r['rows']}x{r['cols']}", r["role"], f"{r['weight_bytes'] / 1e6:.2f}",
                           f"{r['streamed_s'] * 1e6:.1f}", f"{r['streamed_GBps']:.1f}", f"{r['streamed_fraction_of_bw']:.0%}",
                           f"{r['hot_s'] * 1e6:.1f}", f"{r['hot_GBps']:.1f}"] for r in d["gemv"]]), "",
        "streamed: each call reads a different copy of the weight (>= 256 MiB in all), from DRAM as in a decode "
        "step; hot: the same copy every call (cache-resident when it fits).", "",
        "## GEMM (m = 16: a 16-stream decode step; 64+: prefill): GOP/s, 2 ops per multiply-add", "",
        machine.md_table(["weight", "m", "ms", "GOP/s", "of int16 peak", "of int8 peak"],
                         [[f"{r['dtype']} {r['rows']}x{r['cols']}", r["m"], f"{r['s'] * 1e3:.2f}", f"{r['GOPs']:.0f}",
                           f"{r.get('fraction_of_int16_dot_peak', 0):.0%}", f"{r.get('fraction_of_int8_dot_peak', 0):.0%}"]
                          for r in d["gemm"]]), "",
        "## Attention (prefill, causal, 9 heads / 3 KV heads, head 64)", "",
        machine.md_table(["tokens", "naive numpy ms", "naive peak MiB (tracemalloc)", "tinyvllm flash ms",
                          "tinyvllm peak MiB (RSS)", "speed-up", "max abs diff"],
                         [[n, f"{r['s'] * 1e3:.1f}", f"{r['peak_bytes'] / 2**20:.1f}",
                           f"{t['s'] * 1e3:.1f}", mib(t.get("peak_rss_bytes")), f"{r['s'] / t['s']:.1f}x",
                           f"{t['max_abs_diff_vs_naive']:.1e}"]
                          for (n, r), t in zip(d["attention"]["naive_numpy"].items(), d["attention"]["tinyvllm"].values())]), "",
        f"{d['attention']['note']}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
