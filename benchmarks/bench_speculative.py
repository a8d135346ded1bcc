"""Speculative decoding on an input-grounded workload: decode tok/s and acceptance with and without.

    flock /work/bench.lock python benchmarks/bench_speculative.py            # about 10 minutes
    python benchmarks/bench_speculative.py --quick

Workload: prompts that make the model copy from its input, greedy, up to 128 new tokens each: edit a
code file (rename a function and print the whole file), edit a JSON document (change one field and
print it), summarize a text quoting its sentences. The assistant turn starts the answer (the fence
of the file, the opening brace, the opening quote) as an application would. Each stream count (1, 4,
16) runs every mode on the same prompts (one stream: one prompt of each kind after another); greedy outputs are identical in every mode (checked), so
the modes do the same work. Timed: decode only, from the step after which every request has its
first token until all finish (prefill is the same in every mode). min/median/max over --runs runs,
with the load average before each.

Modes: off; n-gram lookup (k tokens, suffix 4..2) always on; the same with disable_by_batch_size
(drafting off in steps whose running batch is larger); a draft model (the Q4_K_M file of the
reference model drafting for its F32 file, k=3) against the F32 target without speculation, at 1 and 4
streams (--draft-streams; the draft has the target's architecture, so at 16 streams it costs as much
as the target's own decode step).
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUALITY = Path.home() / ".cache" / "tinyvllm" / "quality"
F32 = QUALITY / "SmolLM2-135M-Instruct.F32.gguf"
Q4KM = QUALITY / "SmolLM2-135M-Instruct.Q4_K_M.from-F32.llama-cpp-0.3.36.gguf"
CODE_FILES = ["tinyvllm/spec/ngram.py", "tinyvllm/detokenizer.py", "tinyvllm/spec/config.py",
              "tinyvllm/engine/memory.py", "tinyvllm/outputs.py", "tinyvllm/spec/draft_model.py"]
TEXTS = [
    "The river Seine flows through Paris for thirteen kilometres. Thirty-seven bridges cross it within the city. "
    "The oldest standing bridge is the Pont Neuf, finished in 1607. Barges still carry sand and gravel along the "
    "river, and tourist boats run from early morning until late at night.",
    "Honeybees communicate the direction of food with a waggle dance. The angle of the dance on the comb shows the "
    "angle between the food and the sun. The length of the waggle run tells the distance. A single colony can "
    "hold fifty thousand workers in summer.",
    "The first transatlantic telegraph cable was completed in 1858. It carried a message from Queen Victoria to "
    "President Buchanan that took sixteen hours to send. The cable failed after three weeks. A lasting connection "
    "was made in 1866 by the steamship Great Eastern.",
    "A sourdough starter is a mix of flour and water that wild yeast and bacteria have colonised. It is fed every "
    "day with fresh flour. The bacteria make lactic acid, which gives the bread its sour taste. A healthy starter "
    "doubles in size within six hours of a feeding.",
]


def chat(user: str, start: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{start}"


def workload(n: int) -> list[str]:
    """n prompts cycling through the three kinds, each with its own document."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            path = CODE_FILES[(i // 3) % len(CODE_FILES)]
            src = "\n".join((ROOT / path).read_text().splitlines()[:45]) + "\n"
            name = next((w.split("(")[0] for line in src.splitlines() for w in line.split()[1:2]
                         if line.startswith(("def ", "class "))), "main")
            out.append(chat(f"Rename {name} to {name}_v2 in this file and print the whole file:\n```python\n{src}```",
                            "```python\n" + src.split("\n")[0] + "\n"))
        elif kind == 1:
            doc = {"id": int(rng.integers(1000, 9999)), "name": f"project-{i}", "status": "open",
                   "owner": {"name": ["Ada", "Grace", "Alan", "Edsger"][i % 4], "email": f"user{i}@example.com"},
                   "labels": ["engine", "cpu", "speculative", "cache"][: 2 + i % 3],
                   "estimate_hours": int(rng.integers(1, 40)), "links": [f"https://example.com/{i}/a"]}
            out.append(chat(f'Set "status" to "closed" in this JSON document and print the whole document:\n'
                            f"{json.dumps(doc, indent=2)}", "{"))
        else:
            text = TEXTS[(i // 3) % len(TEXTS)]
            out.append(chat(f"Summarize this text, quoting its sentences word for word:\n{text}", 'The text says: "'))
    return out


def decode_run(llm, prompts, max_tokens: int, streams: int):
    """Prompts in waves of `streams` concurrent requests: (decode tok/s, outputs' token ids, spec stats
    delta). Decode: the tokens generated after every request of a wave has its first token, over the time
    from then until the wave finishes, summed over the waves."""
    from tinyvllm import SamplingParams
    eng = llm.engine
    before = dict(eng.stats()["spec_decode"] or {})
    tokens, seconds, outputs = 0, 0.0, []
    for w in range(0, len(prompts), streams):
        ids = [eng.add_request(None, p, SamplingParams(temperature=0, max_tokens=max_tokens))
               for p in prompts[w:w + streams]]
        outs, started, t0, tok0 = {}, set(), None, 0
        while len(outs) < len(ids):
            for o in eng.step():
                if o.outputs[0].token_ids:
                    started.add(o.request_id)
                if o.finished:
                    outs[o.request_id] = o
            if t0 is None and len(started) == len(ids):
                t0, tok0 = time.perf_counter(), eng.num_generated_tokens
        seconds += time.perf_counter() - t0
        tokens += eng.num_generated_tokens - tok0
        outputs += [outs[r].outputs[0].token_ids for r in ids]
    after = eng.stats()["spec_decode"] or {}
    spec = {k: after[k] - before.get(k, 0) for k in ("num_drafts", "num_draft_tokens", "num_accepted_tokens",
                                                     "steps_off")} if after else None
    return tokens / seconds, outputs, spec


def summarize(xs):
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "runs": xs}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--streams", default="1,4,16")
    ap.add_argument("--disable-by-batch-size", type=int, default=4)
    ap.add_argument("--no-draft", action="store_true", help="skip the draft-model rows")
    ap.add_argument("--draft-streams", default="1,4", help="stream counts of the draft-model rows")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=machine.DOCS)
    args = ap.parse_args()
    if args.quick:
        args.runs, args.max_tokens, args.streams = 1, 32, "1,4"
    from tinyvllm import LLM
    from tinyvllm.model.fetch import DEFAULT_MODEL
    load = machine.OtherLoad()
    streams = [int(s) for s in args.streams.split(",")]
    draft_streams = {int(s) for s in args.draft_streams.split(",")}
    ngram = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    modes = [("off", None, None), (f"ngram k={args.k}", ngram, None),
             (f"ngram k={args.k}, disable_by_batch_size={args.disable_by_batch_size}",
              dict(ngram, disable_by_batch_size=args.disable_by_batch_size), None)]
    if not args.no_draft and F32.is_file() and Q4KM.is_file():
        modes += [("F32 target, off", None, str(F32)),
                  ("F32 target, draft Q4_K_M k=3", {"method": "draft_model", "model": str(Q4KM),
                                                    "num_speculative_tokens": 3}, str(F32))]
    data = {"machine": machine.machine_info(), "threads": args.threads, "max_tokens": args.max_tokens,
            "workload": "code edit / JSON edit / summarize with quotes, greedy, assistant turn started",
            "results": []}
    engines = {}
    for name, cfg, model in modes:
        engines[name] = LLM(model or DEFAULT_MODEL, threads=args.threads, speculative_config=cfg,
                            max_num_seqs=max(streams))
    for n in streams:
        prompts = workload(max(n, 3))  # one stream: the three kinds one after another
        reference = {}
        for name, _, model in modes:
            if model is not None and n not in draft_streams:
                continue
            rates, loads, specs = [], [], []
            for _ in range(args.runs):
                loads.append(os.getloadavg()[0])
                rate, outs, spec = decode_run(engines[name], prompts, args.max_tokens, n)
                rates.append(rate)
                specs.append(spec)
                key = model or "ref"
                if key in reference:
                    assert outs == reference[key], f"{name}: greedy output differs from the run without speculation"
                reference.setdefault(key, outs)
            row = {"streams": n, "mode": name, "decode_tok_s": summarize(rates), "loadavg_1m": loads,
                   "generated_tokens": sum(map(len, reference[model or "ref"]))}
            if specs[0] is not None:
                tot = {k: sum(s[k] for s in specs) for k in specs[0]}
                row["spec"] = tot
                row["acceptance_rate"] = tot["num_accepted_tokens"] / max(1, tot["num_draft_tokens"])
            data["results"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "loadavg_1m"}), flush=True)
    data["other_load_share"] = load.share()
    write(data, args)


def write(data, args):
    rows = []
    base = {}
    for r in data["results"]:
        key = (r["streams"], "F32" if r["mode"].startswith("F32") else "ref")
        med = r["decode_tok_s"]["median"]
        base.setdefault(key, med)
        rows.append([r["streams"], r["mode"], f"{r['decode_tok_s']['min']:.1f}", f"{med:.1f}",
                     f"{r['decode_tok_s']['max']:.1f}", f"{med / base[key]:.2f}x",
                     f"{r['acceptance_rate']:.0%}" if "acceptance_rate" in r else "-",
                     (f"{r['spec']['steps_off']}" if "spec" in r else "-"),
                     " / ".join(f"{x:.1f}" for x in r["loadavg_1m"])])
    speed = {(r["streams"], r["mode"]): r["decode_tok_s"]["median"] for r in data["results"]}
    goals = []
    for n in sorted({r["streams"] for r in data["results"]}):
        for r in data["results"]:
            if r["streams"] == n and r["mode"].startswith("ngram") and (n, "off") in speed:
                goals.append(f"{n} stream(s), {r['mode']}: {speed[(n, r['mode'])] / speed[(n, 'off')]:.2f}x")
    md = (f"# Speculative decoding: input-grounded workload\n\n{machine.busy_warning(data['other_load_share'])}"
          f"Reference model (SmolLM2-135M-Instruct Q4_1) unless noted, {data['threads']} threads, greedy, up to "
          f"{data['max_tokens']} new tokens per request, workload: {data['workload']}. Decode tok/s: tokens "
          "generated after every request has its first token, over that time (all streams together); "
          "min / median / max of the runs; speedup: median over the same streams' `off` median (the F32 rows: "
          "over the F32 target without speculation). Greedy outputs were checked identical across modes. "
          "`steps off`: steps in which disable_by_batch_size turned drafting off. Produced by "
          "`benchmarks/bench_speculative.py` at commit "
          f"{data['machine']['git_commit']}, {data['machine']['date']}.\n\n"
          + machine.md_table(["streams", "mode", "min", "median", "max", "speedup", "acceptance", "steps off",
                              "load avg (1 min) per run"], rows)
          + "\n\nN-gram speedup of the median decode tok/s over `off` (goals: >= 1.8x at 1 stream, no more than 5% "
          "loss at 16): " + "; ".join(goals) + ".")
    machine.write_outputs("speculative", data, md, args.out_dir)


if __name__ == "__main__":
    main()
