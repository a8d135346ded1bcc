"""The memory budget is a hard ceiling on what the engine adds to the process, measured, not planned:
the peak resident set (heap, touched weight pages, KV, workspace; loading included) stays under
memory_budget while a workload keeps the KV pool full."""
import json
import subprocess

import pytest

from child_process import child_env, python_cmd
from tinyvllm.engine.memory import parse_bytes

_CHILD = r"""
import json, sys
import numpy, cffi, gguf, tokenizers, sentencepiece, jinja2, safetensors  # the interpreter's share, not the engine's
from tinyvllm import LLM, SamplingParams
from tinyvllm.engine.memory import rss_bytes

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

rss_bytes()  # trims the heap: start from what is live
base = status("VmRSS")
llm = LLM(sys.argv[1], memory_budget=sys.argv[2], max_num_seqs=24, max_num_batched_tokens=256)
e = llm.engine
peak_used, steps = 0, 0
params = SamplingParams(max_tokens=120, ignore_eos=True)
for i in range(24):
    e.add_request(None, f"Request {i}: write a long story about a lighthouse keeper and the sea.", params)
while e.has_unfinished_requests():
    e.step()
    steps += 1
    peak_used = max(peak_used, e.scheduler.blocks.num_blocks - e.scheduler.blocks.num_free_blocks)
print(json.dumps(dict(base=base, hwm=status("VmHWM"), rss=status("VmRSS"), blocks=e.scheduler.blocks.num_blocks,
                      peak_used=peak_used, preemptions=e.stats()["preemptions"], steps=steps,
                      overhead=e.load_overhead_bytes, kv=e.runner.kv_cache_bytes)))
"""


@pytest.mark.parametrize("budget", ["190MB", "224MB"])
def test_resident_memory_stays_under_budget(reference_gguf_path, budget):
    r = subprocess.run(python_cmd(_CHILD, reference_gguf_path, budget), capture_output=True, text=True,
                       timeout=600, env=child_env())
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    # The workload must really fill the pool, or the check proves nothing about KV: a preemption happens
    # only when no block is left (used blocks are sampled between steps, after finished ones are freed).
    assert m["preemptions"] > 0 and m["peak_used"] >= 0.9 * m["blocks"], m
    grown = m["hwm"] - m["base"]
    assert grown <= parse_bytes(budget), f"peak resident growth {grown / 2**20:.1f} MiB > budget {budget}: {m}"
    # ...and the budget is used, not wasted: what the engine planned is close to what it takes.
    assert grown >= 0.7 * parse_bytes(budget), m


_AMX_CHILD = r"""
import json
import numpy as np
from tinyvllm._native import check, ffi, lib, ptr
from tinyvllm.engine.memory import rss_bytes

n, k, threads = 49152, 576, 2  # the reference model's tied output matrix (Q8_0), the tallest weight it has
w = np.random.default_rng(0).integers(0, 256, size=(n, k // 32, 34), dtype=np.uint8)
w[:, :, 0:2] = np.frombuffer(np.float16(0.001).tobytes(), np.uint8)  # sane block scales
desc = ffi.new("tv_tensor *", dict(dtype=8, rows=n, cols=k, data=ffi.cast("void *", w.ctypes.data), nbytes=w.nbytes))
x = np.random.default_rng(1).standard_normal((64, k)).astype(np.float32)
y = np.empty((64, n), np.float32)

def run(path):
    check(lib.tv_select_kernel_path(path.encode()))
    for m in (1, 4, 5, 16, 64):  # decode batches (avx512vnni's code), the first AMX row count (prefill)
        check(lib.tv_matmul(desc, ptr(x), m, ptr(y), threads))

run("avx512vnni")  # the pool's threads, the activation buffer and every shape's output pages exist now
before = rss_bytes()
run("avx512amx")
after = rss_bytes()
print(json.dumps(dict(grown=after - before, k=k, threads=threads)))
"""


def test_amx_scratch_stays_what_the_budget_pays():
    """The AMX path's thread-local scratch is bounded by what runner/native_runner.py's _amx_scratch_bytes
    pays, whatever the matmul driver's chunk size (it once unpacked whole decode-sized chunks: +20 MiB)."""
    from tinyvllm._native import lib
    if lib.tv_select_kernel_path(b"avx512amx") != 0:
        pytest.skip("this CPU (or OS) has no AMX: the avx512amx path cannot run here")
    r = subprocess.run(python_cmd(_AMX_CHILD), capture_output=True, text=True, timeout=600, env=child_env())
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    # 64 activation rows of tiles (2.25 bytes per value), 64 unpacked weight rows per thread (19/8 bytes per
    # weight); 1 MiB for code pages faulting in and page rounding
    paid = 64 * m["k"] * 9 // 4 + m["threads"] * 64 * m["k"] * 19 // 8
    assert m["grown"] <= paid + 2**20, f"AMX scratch grew {m['grown'] / 2**20:.2f} MiB, paid {paid / 2**20:.2f} MiB"
