"""The memory budget as a property (issue 16): over random workloads (prompt and output lengths, n, prefix
sharing, aborts mid-run, the budget itself), the process's peak resident growth stays under the budget and
every request either completes or is refused up front with a clear error; no deadlock, no starvation.
Each example runs in a fresh child process (resident memory is per process) on the reference model;
examples are few and the budgets tiny, so CI time stays bounded."""
import json
import os
import subprocess

from hypothesis import HealthCheck, Phase, example, given, settings, strategies as st

from child_process import child_env, python_cmd
from tinyvllm.engine.memory import parse_bytes

EXAMPLES = int(os.environ.get("TINYVLLM_BUDGET_EXAMPLES", "3"))
MAX_NUM_SEQS = 8

_CHILD = r"""
import json, sys
import numpy, cffi, gguf, tokenizers, sentencepiece, jinja2, safetensors  # the interpreter's share, not the engine's
from tinyvllm import LLMEngine, SamplingParams
from tinyvllm.engine.memory import rss_bytes

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

w = json.loads(sys.argv[2])
rss_bytes()  # trims the heap: start from what is live
base = status("VmRSS")
try:
    e = LLMEngine(sys.argv[1], memory_budget=w["budget"], threads=1, max_num_seqs=w["max_num_seqs"],
                  max_num_batched_tokens=128)
except ValueError as err:
    print(json.dumps({"engine_refused": str(err)}))
    sys.exit()
SHARED = "The lighthouse keeper climbed the stairs every evening to light the lamp for the ships. " * 3
results, prompt_lens = {}, {}
for i, r in enumerate(w["requests"]):
    prompt = (SHARED if r["shared"] else "") + f"Request {i}: " + "the sea and the wind " * r["prompt_words"]
    prompt_lens[str(i)] = len(e.tokenizer.encode(prompt))
    try:
        e.add_request(str(i), prompt, SamplingParams(n=r["n"], max_tokens=r["max_tokens"], ignore_eos=True,
                                                     temperature=0.8, seed=i))
    except ValueError as err:
        results[str(i)] = {"refused": str(err)}
calls = idle = 0
while e.has_unfinished_requests() and calls < w["max_calls"] and idle < 50:
    before = e.num_steps
    for out in e.step():
        if out.finished:
            results[out.request_id] = {"finish": [c.finish_reason for c in out.outputs],
                                       "tokens": [len(c.token_ids) for c in out.outputs]}
    calls += 1
    idle = idle + 1 if e.num_steps == before else 0  # a step that scheduled nothing while work remains
    for i, r in enumerate(w["requests"]):
        if r["abort_at"] == calls and str(i) not in results:
            out = e.abort(str(i))
            results[str(i)] = {"aborted": [c.finish_reason for c in out.outputs]}
blocks = e.scheduler.blocks
print(json.dumps(dict(base=base, hwm=status("VmHWM"), results=results, prompt_lens=prompt_lens, calls=calls,
                      unfinished=sorted(e.requests), num_blocks=blocks.num_blocks, free=blocks.num_free_blocks,
                      max_model_len=e.max_model_len, preemptions=e.stats()["preemptions"])))
"""

request = st.fixed_dictionaries({
    "prompt_words": st.integers(0, 40), "max_tokens": st.integers(1, 64), "n": st.integers(1, MAX_NUM_SEQS + 1),
    "shared": st.booleans(), "abort_at": st.one_of(st.none(), st.integers(1, 40))})
workload = st.fixed_dictionaries({
    "budget": st.sampled_from(["120MB", "140MB", "150MB", "165MB", "200MB"]),
    "max_num_seqs": st.integers(2, MAX_NUM_SEQS),
    "requests": st.lists(request, min_size=1, max_size=6)})


# No shrink/explain phases: each example is a child process of seconds, and explain's line tracer over a
# failing run spun for minutes in CI; a failure reports its workload as generated.
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
@given(w=workload)
@example(w={"budget": "150MB", "max_num_seqs": 8, "requests": [  # always in the run: a pool too small, preempting
    {"prompt_words": 20, "max_tokens": 64, "n": 4, "shared": True, "abort_at": None},
    {"prompt_words": 5, "max_tokens": 64, "n": 3, "shared": True, "abort_at": 30},
    {"prompt_words": 30, "max_tokens": 64, "n": 1, "shared": False, "abort_at": None}]})
def test_random_workload_stays_under_budget_and_every_request_ends(reference_gguf_path, w):
    # a generous bound on step calls: a run that needs more is starving or livelocked
    w = {**w, "max_calls": 50 + 4 * sum((r["prompt_words"] * 5 + 60) // 16 + r["n"] * r["max_tokens"]
                                        for r in w["requests"])}
    r = subprocess.run(python_cmd(_CHILD, reference_gguf_path, json.dumps(w)), capture_output=True, text=True,
                       timeout=900, env=child_env())
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    if "engine_refused" in m:  # a budget below the weights: refused at once, saying so
        assert "budget" in m["engine_refused"], m
        print(f"budget {w['budget']}: refused: {m['engine_refused']}")
        return
    assert not m["unfinished"], f"requests never ended (deadlock or starvation): {m}"
    assert m["free"] == m["num_blocks"], m  # every block back
    for i, req in enumerate(w["requests"]):
        res = m["results"][str(i)]
        if "refused" in res:  # only what the engine could never hold, and it says why
            impossible = req["n"] > w["max_num_seqs"] or m["prompt_lens"][str(i)] >= m["max_model_len"]
            assert impossible and ("max_num_seqs" in res["refused"] or "max_model_len" in res["refused"]), (req, res, m)
        elif "aborted" in res:
            assert req["abort_at"] is not None, res
        else:
            assert all(f == "length" for f in res["finish"]), (req, res)
            room = m["max_model_len"] - m["prompt_lens"][str(i)]
            assert res["tokens"] == [min(req["max_tokens"], room)] * req["n"], (req, res, m)
    grown = m["hwm"] - m["base"]
    print(f"budget {w['budget']}: grown {grown / 2**20:.1f} MiB, {m['num_blocks']} blocks, max_model_len "
          f"{m['max_model_len']}, {m['preemptions']} preemptions, {m['calls']} steps, outcomes "
          f"{[next(iter(res)) for res in m['results'].values()]}")
    assert grown <= parse_bytes(w["budget"]), f"peak resident growth {grown / 2**20:.1f} MiB > {w['budget']}: {m}"
