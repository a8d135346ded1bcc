"""Structured outputs: what the token mask costs per token (49K and 262K vocabularies), and a decode
step of 1 constrained + 15 free sequences vs 16 free ones (and 16 constrained).

    python benchmarks/bench_structured.py            # about 3 minutes
    python benchmarks/bench_structured.py --quick

Per token, on a JSON-schema matcher walked along a valid instance's tokens: llguidance computing the
bitmask (one thread), the sampler applying it to a logits row (-inf outside it), the matcher consuming
the token. The step comparison runs one engine, alternating the three mixes, each timed over decode
steps after every prompt is prefilled (free rows: temperature 0.8 / top-p 0.95, ignore_eos).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 5},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                                                                                    "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"]}}, "required": ["name", "age", "tags", "address"]}
INSTANCE = ('{"name": "Ada Lovelace, Countess", "age": 36, "tags": ["red", "blue", "green"], '
            '"address": {"city": "London and Marylebone", "zip": "12345"}}')
LONG = {"type": "array", "items": {"type": "integer", "minimum": 100, "maximum": 999}, "minItems": 400,
        "maxItems": 400}  # keeps its sequence constrained for the whole timed window


def mask_cost(model: str, reps: int) -> dict:
    import llguidance

    from tinyvllm.engine.memory import rss_bytes
    from tinyvllm.model import load_model, resolve_model
    from tinyvllm.sampler import apply_token_bitmask
    from tinyvllm.sampling_params import StructuredOutputsParams
    from tinyvllm.structured import compile_grammar
    from tinyvllm.structured.tokenizer import ll_tokenizer
    from tinyvllm.tokenizer import Tokenizer
    weights = load_model(resolve_model(model, progress=False))
    tok, vocab = Tokenizer.from_gguf_metadata(weights.metadata), weights.config.vocab_size
    rss, t = rss_bytes(), time.perf_counter()
    llt = ll_tokenizer(tok, vocab, tok.eos_token_ids)
    build_s, build_rss = time.perf_counter() - t, rss_bytes() - rss
    grammar = compile_grammar(StructuredOutputsParams(json=SCHEMA))
    ids = tok.encode(INSTANCE, add_special_tokens=False)
    mask = np.empty((1, (vocab + 31) // 32), dtype=np.int32)
    logits = np.random.default_rng(0).standard_normal((1, vocab)).astype(np.float32)
    fill, apply, consume = [], [], []
    for _ in range(reps):
        m = llguidance.LLMatcher(llt, grammar, log_level=0)
        for tid in ids:
            t0 = time.perf_counter()
            m.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
            t1 = time.perf_counter()
            apply_token_bitmask(logits, [0], mask)
            t2 = time.perf_counter()
            assert m.consume_token(tid), m.get_error()
            t3 = time.perf_counter()
            fill.append(t1 - t0), apply.append(t2 - t1), consume.append(t3 - t2)
    return {"model": model, "vocab": vocab, "tokens": len(ids), "tokenizer_build_s": build_s, "tokenizer_rss_bytes": build_rss,
            "fill_us": [x * 1e6 for x in fill], "apply_us": [x * 1e6 for x in apply],
            "consume_us": [x * 1e6 for x in consume]}


def step_times(model: str, threads: int, steps: int, reps: int) -> dict:
    from tinyvllm import LLMEngine, SamplingParams, StructuredOutputsParams
    eng = LLMEngine(model, threads=threads, max_num_seqs=16, max_num_batched_tokens=1024, max_model_len=1024)
    free = SamplingParams(max_tokens=steps + 64, temperature=0.8, top_p=0.95, seed=1, ignore_eos=True)
    constrained = SamplingParams(max_tokens=steps + 64, temperature=0.8, top_p=0.95, seed=1,
                                 structured_outputs=StructuredOutputsParams(json=LONG))
    mixes = {"16 free": 0, "1 constrained + 15 free": 1, "16 constrained": 16}
    out = {k: [] for k in mixes}
    for rep in range(reps):
        for name, n_constrained in mixes.items():
            rids = [eng.add_request(f"{rep}-{name}-{i}", {"prompt_token_ids": [(7 * i + j) % 1000 + 100
                                                                               for j in range(24)]},
                                    constrained if i < n_constrained else free) for i in range(16)]
            while eng.stats()["generated_tokens"] < 16 * (1 + rep * len(mixes) + list(mixes).index(name)):
                eng.step()
            eng.step()
            for _ in range(steps):
                t = time.perf_counter()
                eng.step()
                out[name].append(time.perf_counter() - t)
                assert eng.stats()["last_batch_size"] == 16
            for rid in rids:
                eng.abort(rid)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=machine.DOCS)
    args = ap.parse_args()
    load = machine.OtherLoad()
    reps, steps, step_reps = (2, 8, 1) if args.quick else (20, 30, 3)
    data = {"machine": machine.machine_info(), "threads": args.threads, "schema": SCHEMA, "instance": INSTANCE,
            "mask": [mask_cost(m, reps) for m in ("smollm2-135m", "gemma3-270m")],
            "steps": step_times("smollm2-135m", args.threads, steps, step_reps)}
    data["other_load_share"] = load.share()
    med = statistics.median
    rows = [[r["model"], r["vocab"], f"{r['tokenizer_build_s']:.2f}", f"{r['tokenizer_rss_bytes'] / 2**20:.0f}", f"{med(r['fill_us']):.0f}",
             f"{np.percentile(r['fill_us'], 90):.0f}", f"{med(r['apply_us']):.0f}", f"{med(r['consume_us']):.0f}"]
            for r in data["mask"]]
    base = med(data["steps"]["16 free"])
    step_rows = [[k, f"{med(v) * 1e3:.1f}", f"{min(v) * 1e3:.1f}", f"{max(v) * 1e3:.1f}", f"{med(v) / base:.3f}x"]
                 for k, v in data["steps"].items()]
    md = (f"# Structured outputs: mask cost and step time\n\n{machine.busy_warning(data['other_load_share'])}"
          f"`benchmarks/bench_structured.py`, {data['machine']['date']}, {data['machine']['cpu'].get('model')}, "
          f"commit {data['machine']['git_commit']}, {args.threads} threads, llguidance "
          f"{__import__('llguidance').__version__}. Other processes' CPU share during the run: "
          f"{data['other_load_share']:.0%}.\n\n"
          f"## Per constrained token ({reps} walks of a {len(INSTANCE)}-character JSON instance)\n\n"
          "The tokenizer (llguidance's view of the vocabulary, with its default token slices) is built on the "
          "first constrained request and kept; its resident memory is not paid from memory_budget. "
          "The bitmask is computed by llguidance on one thread; applying it is the sampler's unpack + "
          "masked fill of one logits row; consuming advances the matcher by the sampled token. Only rows of "
          "constrained sequences pay these.\n\n"
          + machine.md_table(["model", "vocab", "tokenizer build s", "tokenizer RSS MiB", "bitmask us (median)", "bitmask us (p90)",
                              "apply us", "consume us"], rows)
          + f"\n\n## Decode step, 16 sequences (smollm2-135m, {steps} steps x {step_reps} rounds, mixes alternating)\n\n"
          + machine.md_table(["mix", "step ms (median)", "min", "max", "vs 16 free"], step_rows))
    machine.write_outputs("structured", data, md, args.out_dir)


if __name__ == "__main__":
    main()
