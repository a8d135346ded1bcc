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
