"""Where the time goes per weight format: one matmul of each GGUF format on each x86 kernel path,
through the C ABI (tv_matmul), so a format that lags shows up next to the others.

  - decode (m = 1), weights streamed from DRAM (enough copies that none stays in cache), 1 and 2 threads:
    weight GB/s, the number a decode step lives on;
  - decode (m = 1), one copy hot in L2: the kernel's own cost per weight, without DRAM;
  - batched (m = 64, hot): GOP/s, the prefill / many-sequence number.
Shape 1536 x 1536 (a multiple of 256, so every format fits), random valid blocks. Each cell: the
min / median / max over repetitions (this machine is shared: compare rows of one run only).

    .venv-bench/bin/python benchmarks/bench_formats.py [--quick]
Writes docs/benchmarks/formats.{json,md}.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

ROWS = COLS = 1536
# GGML id: (name, values per block, bytes per block, f16 d offset, f16 min offset or None)
FORMATS = {2: ("Q4_0", 32, 18, 0, None), 3: ("Q4_1", 32, 20, 0, 2), 6: ("Q5_0", 32, 22, 0, None),
           7: ("Q5_1", 32, 24, 0, 2), 8: ("Q8_0", 32, 34, 0, None), 20: ("IQ4_NL", 32, 18, 0, None),
           10: ("Q2_K", 256, 84, 80, 82), 11: ("Q3_K", 256, 110, 108, None), 12: ("Q4_K", 256, 144, 0, 2),
           13: ("Q5_K", 256, 176, 0, 2), 14: ("Q6_K", 256, 210, 208, None)}


def weights(nat, dtype, copies, rng):
    _, bv, bb, d_at, m_at = FORMATS[dtype]
    keep, descs = [], []
    for _ in range(copies):
        w = rng.integers(0, 256, size=(ROWS * COLS // bv, bb), dtype=np.uint8)
        w[:, d_at:d_at + 2] = np.frombuffer(np.float16(0.001).tobytes(), np.uint8)
        if m_at is not None:
            w[:, m_at:m_at + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        keep.append(w)
        descs.append(nat.ffi.new("tv_tensor *", dict(dtype=dtype, rows=ROWS, cols=COLS,
                                                     data=nat.ffi.cast("void *", w.ctypes.data), nbytes=w.nbytes)))
    return keep, descs


def seconds_per_call(nat, descs, m, threads, reps, rng):
    x = rng.standard_normal((m, COLS)).astype(np.float32)
    y = np.empty((m, ROWS), np.float32)
    xp, yp = nat.ptr(x), nat.ptr(y)
    for d in descs[:2]:
        nat.lib.tv_matmul(d, xp, m, yp, threads)  # warm-up: pool, pages
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        for d in descs:
            nat.check(nat.lib.tv_matmul(d, xp, m, yp, threads))
        out.append((time.perf_counter() - t) / len(descs))
    return out


def spread(xs):
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=machine.DOCS)
    args = ap.parse_args()
    machine.use_source_tree(False)
    import tinyvllm._native as nat
    reps = 3 if args.quick else 9
    info, load = machine.machine_info(), machine.OtherLoad()
    rng = np.random.default_rng(0)
    paths = [p for p in ("avx512amx", "avx512vnni", "avx2", "scalar") if nat.lib.tv_select_kernel_path(p.encode()) == 0]
    res = []
    for dtype, (name, *_rest) in FORMATS.items():
        row_bytes = nat.lib.tv_row_bytes(dtype, COLS)
        stream_copies = max(2, (256 << 20) // (row_bytes * ROWS))  # >= 256 MiB: every call reads DRAM
        keep_s, streamed = weights(nat, dtype, 4 if args.quick else stream_copies, rng)
        keep_h, hot = weights(nat, dtype, 1, rng)
        for path in paths:
            nat.check(nat.lib.tv_select_kernel_path(path.encode()))
            r = {"format": name, "path": path, "bytes": row_bytes * ROWS}
            for threads in (1, 2):
                r[f"stream_t{threads}_s"] = spread(seconds_per_call(nat, streamed, 1, threads, reps, rng))
            r["hot_t1_s"] = spread(seconds_per_call(nat, hot * 20, 1, 1, reps, rng))
            r["gemm64_t2_s"] = spread(seconds_per_call(nat, hot * 4, 64, 2, reps, rng))
            res.append(r)
            print(f"{name:6s} {path:10s} stream 2t {r['bytes'] / r['stream_t2_s']['median'] / 1e9:5.1f} GB/s  "
                  f"hot 1t {r['bytes'] / r['hot_t1_s']['median'] / 1e9:5.1f} GB/s  "
                  f"m=64 {2 * 64 * ROWS * COLS / r['gemm64_t2_s']['median'] / 1e9:6.1f} GOP/s", flush=True)
        del keep_s, keep_h
    data = {"machine": info, "rows": ROWS, "cols": COLS, "reps": reps, "quick": args.quick, "results": res,
            "other_cpu_share": load.share()}
    machine.write_outputs("formats", data, markdown(data), args.out_dir)


def markdown(d) -> str:
    def gbs(r, key):
        s = r[key]
        return f"{r['bytes'] / s['median'] / 1e9:.1f} ({r['bytes'] / s['max'] / 1e9:.1f}-{r['bytes'] / s['min'] / 1e9:.1f})"

    def gops(r):
        s, ops = r["gemm64_t2_s"], 2 * 64 * d["rows"] * d["cols"]
        return f"{ops / s['median'] / 1e9:.0f} ({ops / s['max'] / 1e9:.0f}-{ops / s['min'] / 1e9:.0f})"

    def ns_per_weight(r):
        return f"{r['hot_t1_s']['median'] / (d['rows'] * d['cols']) * 1e9:.3f}"

    rows = [[r["format"], r["path"], f"{8 * r['bytes'] / (d['rows'] * d['cols']):.2f}", gbs(r, "stream_t1_s"),
             gbs(r, "stream_t2_s"), gbs(r, "hot_t1_s"), ns_per_weight(r), gops(r)] for r in d["results"]]
    m = d["machine"]
    return "\n".join([
        "# Weight formats: one matmul each, per kernel path", "",
        machine.caveats(d["other_cpu_share"], d["quick"]) +
        f"{m['date']} · {m['cpu'].get('model')} · git {m['git_commit']} · {d['rows']} x {d['cols']} weights, random "
        f"valid blocks · median (min-max) of {d['reps']} repetitions · other processes' CPU share "
        + ("?" if d["other_cpu_share"] is None else f"{d['other_cpu_share']:.0%}"), "",
        "Decode (m = 1) GB/s of weight bytes, streamed from DRAM (what a decode step sees) and hot in cache (the "
        "kernel's own cost: ns per weight); m = 64 GOP/s (2 ops per multiply-add, 2 threads, hot).", "",
        machine.md_table(["format", "path", "bits / weight", "decode stream 1 thread, GB/s",
                          "decode stream 2 threads, GB/s", "decode hot 1 thread, GB/s", "hot ns / weight",
                          "m = 64, GOP/s"], rows),
        "", "Q2_K runs the scalar rows on the x86 SIMD paths (its per-half mins have no vector kernel there).",
    ])


if __name__ == "__main__":
    main()
