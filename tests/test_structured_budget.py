"""Structured outputs are paid from memory_budget: the engine reserves what llguidance's tokenizer (built on
the first constrained request) and the constrained requests add, estimated from the vocabulary; measured in
a child process, the peak resident growth with constrained requests in a full KV pool stays under the
budget, and the estimate covers what building the tokenizer really takes at 49K and 262K tokens."""
import json
import subprocess

import pytest

import tiny_models as tm
from child_process import child_env, python_cmd
from tinyvllm import LLM, SamplingParams, StructuredOutputsParams
from tinyvllm.engine.memory import parse_bytes

_FULL_POOL = r"""
import json, sys
import numpy, cffi, gguf, tokenizers, sentencepiece, jinja2, safetensors  # the interpreter's share, not the engine's
from tinyvllm import LLM, SamplingParams, StructuredOutputsParams
from tinyvllm.engine.memory import rss_bytes
from tinyvllm.structured import StructuredOutputs

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

if sys.argv[3] == "unreserved":  # what the budget would be without the reservation (the test's control)
    StructuredOutputs.memory_bytes = staticmethod(lambda *a: 0)
rss_bytes()  # trims the heap: start from what is live
base = status("VmRSS")
llm = LLM(sys.argv[1], memory_budget=sys.argv[2], max_num_seqs=24, max_num_batched_tokens=256,
          enable_structured_outputs=True)
e = llm.engine
free = SamplingParams(max_tokens=120, ignore_eos=True)
schema = {"type": "object", "properties": {"story": {"type": "string", "maxLength": 600},
          "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 30}},
          "required": ["story", "tags"]}
constraints = [StructuredOutputsParams(json=schema), StructuredOutputsParams(regex="[a-z ,.]{20,900}"),
               StructuredOutputsParams(grammar='start: ("sea " | "light " | "keeper " | "storm ")+')]
peak_used, constrained = 0, 0
for i in range(24):
    p = free if i % 3 else SamplingParams(max_tokens=120, temperature=0.8, seed=i,
                                          structured_outputs=constraints[(i // 3) % 3])
    constrained += p is not free
    e.add_request(str(i), f"Request {i}: write a long story about a lighthouse keeper and the sea.", p)
while e.has_unfinished_requests():
    e.step()
    peak_used = max(peak_used, e.scheduler.blocks.num_blocks - e.scheduler.blocks.num_free_blocks)
print(json.dumps(dict(base=base, hwm=status("VmHWM"), blocks=e.scheduler.blocks.num_blocks, peak_used=peak_used,
                      preemptions=e.stats()["preemptions"], reserve=e.structured_reserve_bytes,
                      constrained=constrained, built=e.structured._ll_tokenizer is not None)))
"""


def _full_pool(model, budget, mode):
    r = subprocess.run(python_cmd(_FULL_POOL, model, budget, mode), capture_output=True, text=True, timeout=900,
                       env=child_env())
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_constrained_requests_in_a_full_pool_stay_under_budget(reference_gguf_path):
    budget = "224MB"  # 190MB, the smallest of test_memory_budget.py, leaves no KV block after the reservation
    m = _full_pool(reference_gguf_path, budget, "reserved")
    assert m["built"] and m["constrained"] == 8 and m["reserve"] > 20 * 2**20, m
    # the pool was really full (a preemption happens only when no block is left)
    assert m["preemptions"] > 0 and m["peak_used"] >= 0.9 * m["blocks"], m
    grown = m["hwm"] - m["base"]
    assert grown <= parse_bytes(budget), f"peak resident growth {grown / 2**20:.1f} MiB > budget {budget}: {m}"
    # the control: without the reservation the pool takes those bytes too, and the same workload goes over
    c = _full_pool(reference_gguf_path, budget, "unreserved")
    assert c["reserve"] == 0 and c["blocks"] > m["blocks"] and c["peak_used"] >= 0.9 * c["blocks"], c
    assert c["hwm"] - c["base"] > parse_bytes(budget), c
    print(f"budget {budget}: grown {grown / 2**20:.1f} MiB with the reservation ({m['reserve'] / 2**20:.1f} MiB, "
          f"{m['blocks']} blocks), {(c['hwm'] - c['base']) / 2**20:.1f} MiB without it ({c['blocks']} blocks)")


_BUILD = r"""
import json, sys
from tinyvllm import LLM, SamplingParams, StructuredOutputsParams
from tinyvllm.engine.memory import rss_bytes
from tinyvllm.structured import StructuredOutputs

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

llm = LLM(sys.argv[1], threads=1, kv_cache_bytes=8 * 2**20, max_num_seqs=8)
e = llm.engine
estimate = StructuredOutputs.memory_bytes(e.tokenizer, e.config.vocab_size, e.weights.metadata)
llm.generate([f"warm {i}" for i in range(6)], SamplingParams(max_tokens=16, ignore_eos=True))  # weights paged in
base = rss_bytes()
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS
schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "n": {"type": "integer"}},
          "required": ["name", "n"]}
p = SamplingParams(temperature=0.8, max_tokens=24, seed=1, structured_outputs=StructuredOutputsParams(json=schema))
outs = llm.generate([f"Give JSON {i}" for i in range(6)], p)
print(json.dumps(dict(vocab=e.config.vocab_size, estimate=estimate, grown=status("VmHWM") - base)))
"""


@pytest.mark.parametrize("vocab", [None, 262144])
def test_estimate_covers_the_measured_tokenizer(tmp_path, reference_gguf_path, vocab):
    """The reservation vs the measured peak growth of the first constrained requests (tokenizer build,
    matchers, mask executor): the reference model's 49K vocabulary and a synthetic 262K one."""
    model = str(reference_gguf_path) if vocab is None else tm.make_tiny_gguf(tmp_path / "v.gguf", vocab_size=vocab)
    r = subprocess.run(python_cmd(_BUILD, model), capture_output=True, text=True, timeout=600, env=child_env())
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["vocab"] == (vocab or 49152)
    assert m["grown"] <= m["estimate"] <= 1.5 * m["grown"], m  # covers it, and is not far above it


def test_under_a_budget_structured_outputs_are_asked_for_and_reserved(reference_gguf_path):
    """Under a memory_budget structured outputs are on only when asked for (enable_structured_outputs=True),
    and then reserved: the KV pool is smaller by the reservation. Otherwise a constrained request is refused
    with a ValueError (400) that says how to turn them on; without a budget they are on and reserve nothing."""
    path, kw = str(reference_gguf_path), dict(threads=1, memory_budget="200MB", max_num_seqs=8)
    on = LLM(path, enable_structured_outputs=True, **kw).engine
    off, explicit_off = LLM(path, **kw).engine, LLM(path, enable_structured_outputs=False, **kw).engine
    assert off.structured_reserve_bytes == explicit_off.structured_reserve_bytes == 0
    assert on.structured_reserve_bytes > 20 * 2**20
    block = on.runner.kv_cache_bytes // on.scheduler.blocks.num_blocks
    # each engine measured its own load overhead (RSS growth while loading, which varies run to run): the
    # pools differ by the reservation plus that difference
    paid = on.structured_reserve_bytes + on.load_overhead_bytes - off.load_overhead_bytes
    assert off.scheduler.blocks.num_blocks - on.scheduler.blocks.num_blocks >= paid // block - 1
    p = SamplingParams(max_tokens=4, temperature=0, structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    for engine, why in ((off, "enable_structured_outputs=True"), (explicit_off, "enable_structured_outputs=False")):
        with pytest.raises(ValueError, match=why):
            engine.add_request(None, "Yes or no?", p)
        assert not engine.requests  # refused before anything was queued
    on.add_request("a", "Yes or no?", p)
    while on.has_unfinished_requests():
        on.step()
    free = LLM(path, threads=1, kv_cache_bytes="8MB", memory_budget="200MB")  # the pool sized directly: no budget
    assert free.engine.structured_reserve_bytes == 0
    assert free.generate("Yes or no?", p)[0].outputs[0].text in ("yes", "no")
    with pytest.raises(ValueError, match="structured outputs"):  # a budget too small says what took it
        LLM(path, enable_structured_outputs=True, **dict(kw, memory_budget="160MB"))
    LLM(path, **dict(kw, memory_budget="160MB"))  # ...and is enough without them


def test_server_under_a_budget_without_structured_outputs_answers_400(reference_gguf_path):
    """`tinyvllm serve --memory-budget X` without --enable-structured-outputs: a constrained request is a 400
    naming the flag (streamed or not), and the engine goes on serving."""
    import openai
    from test_server import LiveServer
    from tinyvllm import LLMEngine
    from tinyvllm.server.api import build_app
    engine = LLMEngine(str(reference_gguf_path), threads=1, memory_budget="200MB", max_num_seqs=4)
    server = LiveServer(build_app(engine, "smollm2-135m"))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError, match="enable-structured-outputs") as e:
                client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "JSON"}],
                                               max_tokens=5, stream=stream, response_format={"type": "json_object"})
            assert e.value.status_code == 400
        ok = client.completions.create(model="smollm2-135m", prompt="Hi", max_tokens=3)
        assert ok.choices[0].finish_reason == "length"
    finally:
        server.stop()
