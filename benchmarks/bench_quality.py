"""What quantization costs: perplexity per weight format of the reference model, tinyvllm vs llama.cpp.

The reference model (SmolLM2-135M-Instruct) ships only as Q4_1, so the baseline is that file
dequantized once to an F32 GGUF (the `gguf` package reads, dequantizes and writes it); Q8_0, Q6_K,
Q5_K_M, Q4_K_M, Q4_0, Q3_K_M and Q2_K are made from the F32 file by llama.cpp's own quantizer
(llama_cpp.llama_model_quantize); the shipped Q4_1 is measured as it is. For each file, each in a
child process of its own:
  * tinyvllm: `tinyvllm.perplexity` (llama-perplexity's rule: non-overlapping windows of --ctx tokens,
    the second half of each scored), peak RSS (VmHWM) after loading and decoding one request, and
    decode tok/s of that request (--decode-tokens tokens, greedy).
  * llama.cpp (llama-cpp-python, logits_all): the same windows over llama.cpp's own tokenization,
    scored with the same formula in float64 from llama.cpp's logits.
Text: benchmarks/data/quality_text.txt, plain English prose written for this project (Apache-2.0,
like the rest of it). Writes docs/benchmarks/quality.{md,json,png}.

    python benchmarks/bench_quality.py [--threads 2] [--ctx 512]
"""
import argparse
import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

TEXT = Path(__file__).resolve().parent / "data" / "quality_text.txt"
FORMATS = ["F32", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_1", "Q4_0", "Q3_K_M", "Q2_K"]
SHIPPED = "Q4_1"  # the reference file as published; the others are made from the F32 baseline


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# ---- the model files ----------------------------------------------------------------------------
def make_f32(src: Path, dst: Path) -> None:
    import gguf
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vtype = f.types[0]
        sub = f.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(f.types) > 1 else None
        w.add_key_value(name, f.contents(), vtype, sub_type=sub)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in r.tensors:
        w.add_tensor(t.name, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def model_files(out: Path) -> dict[str, Path]:
    import llama_cpp
    from tinyvllm.model import resolve_model
    ref = Path(resolve_model("smollm2-135m"))
    out.mkdir(parents=True, exist_ok=True)
    files = {SHIPPED: ref, "F32": out / "SmolLM2-135M-Instruct.F32.gguf"}
    if not files["F32"].is_file():
        print("dequantizing the reference to F32 ...", file=sys.stderr)
        make_f32(ref, files["F32"].with_suffix(".tmp"))
        files["F32"].with_suffix(".tmp").rename(files["F32"])
    for name in FORMATS:
        if name in files:
            continue
        files[name] = out / f"SmolLM2-135M-Instruct.{name}.from-F32.llama-cpp-{llama_cpp.__version__}.gguf"
        if not files[name].is_file():
            print(f"quantizing F32 -> {name} with llama.cpp ...", file=sys.stderr)
            p = llama_cpp.llama_model_quantize_default_params()
            p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
            tmp = files[name].with_suffix(".tmp")
            if llama_cpp.llama_model_quantize(str(files["F32"]).encode(), str(tmp).encode(), ctypes.byref(p)):
                sys.exit(f"llama_model_quantize failed for {name}")
            tmp.rename(files[name])
    return files


def weight_stats(path: Path) -> dict:
    """File size, bits per weight over all tensors, and the tensor types it holds."""
    import gguf
    r = gguf.GGUFReader(str(path))
    nbytes = sum(int(t.n_bytes) for t in r.tensors)
    n = sum(int(t.n_elements) for t in r.tensors)
    types: dict[str, int] = {}
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"file_bytes": path.stat().st_size, "tensor_bytes": nbytes, "weights": n,
            "bits_per_weight": 8 * nbytes / n, "tensor_types": types}


# ---- children -----------------------------------------------------------------------------------
def child_tinyvllm(path: str, a) -> dict:
    from tinyvllm import LLMEngine, SamplingParams
    from tinyvllm.perplexity import perplexity
    text = TEXT.read_text()
    engine = LLMEngine(path, threads=a.threads, max_model_len=max(a.ctx + 1, 64 + a.decode_tokens),
                       max_num_seqs=128, max_num_batched_tokens=512)
    prompt = {"prompt_token_ids": engine.tokenizer.encode(text)[:32]}
    rid = engine.add_request(None, prompt, SamplingParams(temperature=0, max_tokens=a.decode_tokens, ignore_eos=True))
    out = None
    while engine.has_unfinished_requests():
        out = next((o for o in engine.step() if o.request_id == rid), out)
    decode_rss = peak_rss()
    r = perplexity(engine, text, a.ctx)
    return {"ppl": r.ppl, "stderr": r.stderr, "tokens_scored": r.tokens_scored, "windows": r.num_windows,
            "text_tokens": len(engine.tokenizer.encode(text)), "decode_tok_s": 1.0 / out.metrics.tpot,
            "peak_rss_decode": decode_rss, "peak_rss_perplexity": peak_rss()}


def child_llamacpp(path: str, a) -> dict:
    import llama_cpp
    import llama_cpp.llama
    from tinyvllm.perplexity import summarize, windows
    # The llama-cpp-python build here repacks weights into AMX/"extra" CPU buffers on an AMX machine and
    # then faults at the first decode (general protection fault in libggml-cpu); the plain CPU buffers
    # give the same arithmetic per format. llama.cpp's --no-extra-bufts does the same.
    default_params = llama_cpp.llama_model_default_params

    def plain_buffers():
        p = default_params()
        p.use_extra_bufts = False
        return p
    llama_cpp.llama.llama_cpp.llama_model_default_params = plain_buffers
    Llama = llama_cpp.Llama
    llm = Llama(path, n_ctx=a.ctx, n_batch=a.ctx, n_ubatch=a.ctx, logits_all=True, n_threads=a.threads,
                verbose=False)
    ids = llm.tokenize(TEXT.read_text().encode(), add_bos=True, special=False)
    bos = llm.token_bos() if llm.metadata.get("tokenizer.ggml.add_bos_token") == "true" else None
    nll = []
    wins = windows(ids, a.ctx, 0, bos)
    for w, first in wins:
        llm.reset()
        llm.eval(w)
        x = np.asarray(llm.scores[:len(w)], dtype=np.float64)
        m = x.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]
        nll += [lse[p - 1] - x[p - 1, w[p]] for p in range(first, len(w))]
    r = summarize(np.array(nll), len(wins))
    return {"ppl": r.ppl, "stderr": r.stderr, "tokens_scored": r.tokens_scored, "windows": r.num_windows,
            "text_tokens": len(ids), "peak_rss_perplexity": peak_rss(), "use_extra_bufts": False}


def child_reference(path: str, a) -> dict:
    """The float64 numpy forward of tests/reference_forward.py on the same file and windows (slow: about a
    minute per format on 2 cores): which engine is nearer the exact forward of the same weights."""
    sys.path.insert(0, str(machine.ROOT / "tests"))
    from reference_forward import ReferenceModel
    from tinyvllm.model import load_model
    from tinyvllm.perplexity import summarize, windows
    from tinyvllm.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf_metadata(load_model(path).metadata)
    ref = ReferenceModel.from_gguf(path)
    nll = []
    wins = windows(tok.encode(TEXT.read_text()), a.ctx, 0)
    for w, first in wins:
        x = ref.prefill_logits(w)
        m = x.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]
        nll += [lse[p - 1] - x[p - 1, w[p]] for p in range(first, len(w))]
    r = summarize(np.array(nll), len(wins))
    return {"ppl": r.ppl, "stderr": r.stderr, "tokens_scored": r.tokens_scored}


def run_child(engine: str, path: Path, a) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, str(path), "--threads", str(a.threads), "--ctx", str(a.ctx),
           "--decode-tokens", str(a.decode_tokens)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if p.returncode:
        sys.exit(f"{engine} on {path.name} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---- report -------------------------------------------------------------------------------------
def markdown(d: dict) -> str:
    base = d["results"]["F32"]["tinyvllm"]["ppl"]
    base_bytes = d["results"]["F32"]["weights"]["file_bytes"]
    rows = []
    for name, r in d["results"].items():
        t, l, w = r["tinyvllm"], r["llamacpp"], r["weights"]
        loss = 100 * (t["ppl"] / base - 1)
        rows.append([name + (" (as shipped)" if name == SHIPPED else ""), f"{w['file_bytes'] / 2**20:.1f}",
                     f"{base_bytes / w['file_bytes']:.2f}x", f"{w['bits_per_weight']:.2f}",
                     f"{t['ppl']:.4f} ± {t['stderr']:.4f}", f"{l['ppl']:.4f} ± {l['stderr']:.4f}",
                     f"{100 * (t['ppl'] / l['ppl'] - 1):+.2f}%", f"{loss:+.2f}%",
                     f"{t['peak_rss_decode'] / 2**20:.0f}", f"{t['decode_tok_s']:.0f}"])
    f32 = d["results"]["F32"]["tinyvllm"]
    agree = max(abs(r["tinyvllm"]["ppl"] / r["llamacpp"]["ppl"] - 1) for r in d["results"].values())
    lines = [
        "# What quantization costs: perplexity per weight format",
        "",
        f"Generated by `benchmarks/bench_quality.py` on {d['machine']['date']} (commit {d['machine']['git_commit']}, "
        f"{d['threads']} threads, {d['machine']['cpu'].get('model', '?')}). Model: SmolLM2-135M-Instruct. "
        f"Text: `benchmarks/data/quality_text.txt`, {f32['text_tokens']} tokens of plain English prose written for "
        "this project (Apache-2.0, like the rest of it): five short essays (a lighthouse keeper, a bakery, a "
        "hill walk, a clockmaker, learning a language).",
        "",
        f"Perplexity as llama.cpp's `llama-perplexity` computes it: {f32['windows']} non-overlapping windows of "
        f"{d['ctx']} tokens, the second half of each scored ({f32['tokens_scored']} tokens), ± its standard error. "
        "tinyvllm: `tinyvllm.perplexity` (the `tinyvllm perplexity` command) through prompt logprobs. llama.cpp: "
        f"llama-cpp-python {d['llama_cpp_version']} with `logits_all`, the same windows over llama.cpp's own "
        "tokenization, scored with the same formula from its logits (the `llama-perplexity` binary itself is not "
        "built here; its rule is the one in `tools/perplexity/perplexity.cpp`). llama.cpp runs with its extra "
        "CPU buffer types off (`use_extra_bufts = false`, as `--no-extra-bufts`): the installed build faults in "
        "its AMX repacking on this machine.",
        "",
        "Files: the reference ships only as Q4_1, so the baseline is that file dequantized to F32 with the `gguf` "
        "package; every other format is made from the F32 file by llama.cpp's quantizer (`llama_model_quantize`), "
        "the Q4_1 row is the published file. Rows of 576 weights are not a multiple of 256, so the K-quant "
        "files fall back to Q5_0/Q5_1/Q8_0 etc. for most tensors (see `tensor_types` in quality.json): their "
        "bits per weight are what the files really hold. Peak RSS: the tinyvllm process after loading and "
        f"decoding one request ({d['decode_tokens']} tokens, greedy, at the rate shown).",
        "",
        machine.md_table(["format", "file MiB", "smaller than F32", "bits/weight", "tinyvllm PPL",
                          "llama.cpp PPL", "tinyvllm vs llama.cpp", "PPL vs F32", "peak RSS MiB", "decode tok/s"],
                         rows),
        "",
        f"tinyvllm and llama.cpp agree within {100 * agree:.2f}% on every file (the issue asks for 1%). "
        + reference_note(d) +
        "The Q4_1 row equals the baseline by construction: the F32 file holds exactly the Q4_1 file's values, "
        "so every other row is the shipped Q4_1 model requantized, and its loss is measured against those values. "
        "The standard errors are llama.cpp's, per text; two formats scored on the same tokens differ far less "
        "from run to run than they suggest.",
        "",
        "The seed's target, \"2-4x memory reduction, <10% accuracy loss\", read as perplexity no more than 10% "
        "above F32's: " + "; ".join(
            f"{n} {d['results']['F32']['weights']['file_bytes'] / r['weights']['file_bytes']:.1f}x smaller, "
            f"{100 * (r['tinyvllm']['ppl'] / base - 1):+.1f}%" for n, r in d["results"].items() if n != "F32") + ".",
        "",
        "![perplexity vs bits per weight](quality.png)",
        "",
        machine.busy_warning(d.get("other_cpu_share")),
        "Perplexities, sizes and bits per weight do not depend on the machine's load; peak RSS hardly does; "
        "decode tok/s does (compare it only within one quiet run).",
    ]
    return "\n".join(lines)


def reference_note(d: dict) -> str:
    """Where the float64 reference forward scored a file too: how far each engine is from it."""
    checks = {n: r["reference"] for n, r in d["results"].items() if "reference" in r}
    checks.update({n: r for n, r in d.get("reference_after_run", {}).items() if n not in checks})
    if not checks:
        return ""
    parts = [f"{n}: float64 reference {c['ppl']:.4f}, tinyvllm {100 * (d['results'][n]['tinyvllm']['ppl'] / c['ppl'] - 1):+.3f}%, "
             f"llama.cpp {100 * (d['results'][n]['llamacpp']['ppl'] / c['ppl'] - 1):+.3f}%" for n, c in checks.items()]
    after = "; measured after the run, on the same files and text, with `--child reference`" \
        if d.get("reference_after_run") else ""
    return ("Against the exact float64 forward of the same weights (tests/reference_forward.py" + after + "): "
            + "; ".join(parts) + ". tinyvllm computes with int16 activations, llama.cpp quantizes activations to "
            "8 bits for quantized dot products: the gap between the two engines is llama.cpp's rounding. ")


def plot(d: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    names = list(d["results"])
    bpw = [d["results"][n]["weights"]["bits_per_weight"] for n in names]
    for engine, marker, dx in (("tinyvllm", "o", -0.06), ("llamacpp", "s", 0.06)):
        ys = [d["results"][n][engine]["ppl"] for n in names]
        es = [d["results"][n][engine]["stderr"] for n in names]
        ax.errorbar([b + dx for b in bpw], ys, yerr=es, fmt=marker, capsize=3,
                    label="tinyvllm" if engine == "tinyvllm" else "llama.cpp (llama-cpp-python)")
    for n, b in zip(names, bpw):
        ax.annotate(n, (b, d["results"][n]["tinyvllm"]["ppl"]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    base = d["results"]["F32"]["tinyvllm"]["ppl"]
    ax.axhline(base, color="grey", lw=0.8, ls="--", label="F32 baseline")
    ax.axhline(base * 1.1, color="red", lw=0.8, ls=":", label="F32 + 10%")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per weight (all tensors, as stored)")
    ax.set_ylabel(f"perplexity (ctx {d['ctx']})")
    ax.set_title("SmolLM2-135M-Instruct: perplexity vs bits per weight")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--reference", default="", help="formats also scored by the float64 reference forward "
                                                    "(comma-separated; about a minute each)")
    ap.add_argument("--from-json", type=Path, help="only write quality.md and quality.png from a quality.json")
    ap.add_argument("--models-dir", type=Path, default=Path(os.environ.get("TINYVLLM_CACHE", Path.home() / ".cache" /
                                                                          "tinyvllm")) / "quality")
    ap.add_argument("--out-dir", type=Path, default=machine.DOCS)
    ap.add_argument("--installed", action="store_true", help="use the installed tinyvllm, not this checkout")
    ap.add_argument("--child", nargs=2, metavar=("ENGINE", "PATH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    machine.use_source_tree(a.installed)
    if a.child:
        fn = {"tinyvllm": child_tinyvllm, "llamacpp": child_llamacpp, "reference": child_reference}[a.child[0]]
        print(json.dumps(fn(a.child[1], a)))
        return
    if a.from_json:
        data = json.loads(a.from_json.read_text())
        plot(data, a.out_dir / "quality.png")
        (a.out_dir / "quality.md").write_text(markdown(data) + "\n")
        return
    import llama_cpp
    info, load = machine.machine_info(), machine.OtherLoad()
    files = model_files(a.models_dir)
    results = {}
    for name in a.formats.split(","):
        print(f"{name}: tinyvllm ...", file=sys.stderr, flush=True)
        t = run_child("tinyvllm", files[name], a)
        print(f"{name}: llama.cpp ...", file=sys.stderr, flush=True)
        l_ = run_child("llamacpp", files[name], a)
        results[name] = {"file": files[name].name, "weights": weight_stats(files[name]), "tinyvllm": t, "llamacpp": l_}
        if name in a.reference.split(","):
            print(f"{name}: float64 reference ...", file=sys.stderr, flush=True)
            results[name]["reference"] = run_child("reference", files[name], a)
        print(f"{name}: tinyvllm PPL {t['ppl']:.4f}, llama.cpp {l_['ppl']:.4f}, decode {t['decode_tok_s']:.0f} tok/s",
              file=sys.stderr, flush=True)
    data = {"machine": info, "threads": a.threads, "ctx": a.ctx, "decode_tokens": a.decode_tokens,
            "llama_cpp_version": llama_cpp.__version__, "text": str(TEXT.relative_to(machine.ROOT)),
            "results": results, "other_cpu_share": load.share(), "loadavg_at_end": os.getloadavg()}
    a.out_dir.mkdir(parents=True, exist_ok=True)
    if "F32" in results:
        plot(data, a.out_dir / "quality.png")
        machine.write_outputs("quality", data, markdown(data), a.out_dir)
    else:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
