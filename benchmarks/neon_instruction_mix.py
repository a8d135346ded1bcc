"""The instruction mix of the aarch64 matmul kernels, counted in the compiled code: tinyvllm's NEON and
dotprod kernels (native/src/kernels_neon.cpp) next to llama.cpp's ggml_vec_dot_* for the same weight
format (ggml-cpu's arch/arm/quants.c), both cross-compiled here, so the gap is visible without an ARM
machine.

For each kernel the hot loop (the loop with the most multiply/dot instructions; an inner loop the
compiler kept is counted with its trip count from the source) is read from `objdump -d`, its
instructions sorted into classes, and the counts divided by what one pass of the loop computes, as
instructions per 32 weights x 1 output (one 32-value slice against one activation row) and per
stored block of the format (32 or 256 weights):
    tinyvllm decode   gemv_<Dot><F, 1>: 4 weight rows x 1 activation row x 1 block per pass
    tinyvllm prefill  micro_<path><F>:  4 weight rows x 4 activation rows x 1 slice per pass
    tinyvllm rows x4  rows_<Dot><F>:    1 weight row x 4 activation rows x two 32-value blocks or one
                      256-value block per pass (prefill before QuantGemm; Q2_K's kernel still)
                      (the panel's unpacking, once per weight row and matmul, is not in this loop)
    llama.cpp         ggml_vec_dot_<f>_q8_*: 1 x 1, two 32-value blocks or one 256-value block per pass
llama.cpp's activations are int8 (Q8_0/Q8_1/Q8_K), tinyvllm's int16 (one more SDOT per 16 bytes on
the dotprod path, SMLAL on 16-bit lanes on the neon one): its dot count per weight is lower by design.

    python benchmarks/neon_instruction_mix.py [--llama-cpp DIR] [--cxx aarch64-linux-gnu-g++]
Writes docs/benchmarks/neon_mix.{json,md}.
    python benchmarks/neon_instruction_mix.py --compare REV
compiles native/src of git revision REV and of the working tree and compares every tinyvllm kernel's
hot loop, format by format (exit status 1 when one differs): a refactoring's check that no NEON
hot loop got longer. Needs the Debian cross toolchain (g++-aarch64-linux-gnu,
binutils-aarch64-linux-gnu).
"""
import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LLAMA_CPP = Path("/work/llama-tools/llama_cpp_python-0.3.36/vendor/llama.cpp")

# format: (our trait, block values, llama.cpp vec_dot, llama.cpp blocks per pass, inner-loop trips)
FORMATS = {
    "Q4_0": ("FmtQ4_0", 32, "ggml_vec_dot_q4_0_q8_0", 2, 1),
    "Q4_1": ("FmtQ4_1", 32, "ggml_vec_dot_q4_1_q8_1", 2, 1),
    "Q5_0": ("FmtQ5_0", 32, "ggml_vec_dot_q5_0_q8_0", 2, 1),
    "Q5_1": ("FmtQ5_1", 32, "ggml_vec_dot_q5_1_q8_1", 2, 1),
    "Q8_0": ("FmtQ8_0", 32, "ggml_vec_dot_q8_0_q8_0", 2, 1),
    "IQ4_NL": ("FmtIQ4_NL", 32, "ggml_vec_dot_iq4_nl_q8_0", 2, 1),
    "Q4_K": ("FmtQ4_K", 256, "ggml_vec_dot_q4_K_q8_K", 1, 4),  # for (j < QK_K/64)
    "Q5_K": ("FmtQ5_K", 256, "ggml_vec_dot_q5_K_q8_K", 1, 4),
    "Q6_K": ("FmtQ6_K", 256, "ggml_vec_dot_q6_K_q8_K", 1, 2),  # for (j < QK_K/128)
}
CLASSES = ("load", "store", "dot/mul", "shuffle/widen", "int alu", "fp", "scalar/branch")

LOADS = re.compile(r"^(ld[1-4]r?|ldr\w*|ldp\w*|ldur\w*|ldnp)$")
STORES = re.compile(r"^(st[1-4]|str\w*|stp|stur\w*|stnp)$")
DOTS = {"sdot", "udot", "usdot", "sudot", "smmla", "ummla", "usmmla", "smlal", "smlal2", "smull", "smull2", "umlal",
        "umlal2", "umull", "umull2", "mla", "mls", "mul", "smlsl", "smlsl2", "sqdmulh"}
SHUFFLES = {"sxtl", "sxtl2", "uxtl", "uxtl2", "sshll", "sshll2", "ushll", "ushll2", "xtn", "xtn2", "uzp1", "uzp2",
            "zip1", "zip2", "trn1", "trn2", "tbl", "tbx", "ext", "dup", "ins", "mov", "umov", "smov", "rev16", "rev32",
            "rev64"}
VREG = re.compile(r"\bv\d+\b|\bq\d+\b")
FPREG = re.compile(r"\b[sdh]\d+\b")


def classify(mnemonic: str, operands: str) -> str:
    if LOADS.match(mnemonic):
        return "load"
    if STORES.match(mnemonic):
        return "store"
    vector = bool(VREG.search(operands))
    if mnemonic in DOTS and vector:
        return "dot/mul"
    if mnemonic in SHUFFLES and vector:
        return "shuffle/widen"
    if mnemonic.startswith(("f", "scvtf", "ucvtf")) and (vector or FPREG.search(operands)):
        return "fp"
    if vector:
        return "int alu"
    return "scalar/branch"


def disassemble(obj: Path, objdump: str) -> dict:
    """symbol (demangled) -> [(address, mnemonic, operands)], aliases (identical code folded) included."""
    nm = subprocess.run([objdump.replace("objdump", "nm"), "-C", "-S", "--defined-only", str(obj)],
                        capture_output=True, text=True, check=True).stdout
    spans = {}
    for line in nm.splitlines():
        parts = line.split(" ", 3)
        if len(parts) == 4 and parts[2] in "tT":
            spans[parts[3]] = (int(parts[0], 16), int(parts[1], 16))
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(obj)], capture_output=True, text=True, check=True).stdout
    insns = []
    for line in text.splitlines():
        m = re.match(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$", line)
        if m:
            insns.append((int(m.group(1), 16), m.group(2), m.group(3).split("//")[0].split("<")[0].strip()))
    return {name: [i for i in insns if start <= i[0] < start + size] for name, (start, size) in spans.items()}


BRANCH = re.compile(r"^(b(\.\w+)?|cbn?z|tbn?z)$")
ENDS = {"b", "br", "ret"}  # no fall-through


def successors(code):
    """Control-flow successors of each instruction (indices), from branch targets and fall-through."""
    index = {a: k for k, (a, _, _) in enumerate(code)}
    succ = []
    for k, (addr, mn, ops) in enumerate(code):
        out = [] if mn in ENDS or k + 1 == len(code) else [k + 1]
        if BRANCH.match(mn):
            try:
                t = int(ops.split(",")[-1].strip().split()[0], 16)
            except (ValueError, IndexError):
                t = None
            if t in index:
                out.append(index[t])
        succ.append(out)
    return succ


def dominators(succ):
    """Immediate dominator of each instruction reachable from the entry (index 0): Cooper, Harvey and
    Kennedy's iterative algorithm over reverse postorder. None where unreachable."""
    order, seen, stack = [], {0}, [(0, iter(succ[0]))]
    while stack:  # iterative DFS postorder
        node, it = stack[-1]
        nxt = next((t for t in it if t not in seen), None)
        if nxt is None:
            order.append(node)
            stack.pop()
        else:
            seen.add(nxt)
            stack.append((nxt, iter(succ[nxt])))
    rpo = order[::-1]
    pos = {n: i for i, n in enumerate(rpo)}
    pred = {n: [] for n in rpo}
    for n in rpo:
        for t in succ[n]:
            pred[t].append(n)
    idom = {0: 0}

    def meet(a, b):
        while a != b:
            while pos[a] > pos[b]:
                a = idom[a]
            while pos[b] > pos[a]:
                b = idom[b]
        return a
    changed = True
    while changed:
        changed = False
        for n in rpo[1:]:
            done = [p for p in pred[n] if p in idom]
            new = done[0]
            for p in done[1:]:
                new = meet(p, new)
            if idom.get(n) != new:
                idom[n], changed = new, True
    return idom


def loops(code):
    """Natural loops: for every edge latch -> header where the header dominates the latch, the
    header plus every instruction that reaches the latch without passing the header (the body need
    not be contiguous: compilers lay loops out in pieces). Returns (header, frozenset of indices)."""
    succ = successors(code)
    idom = dominators(succ)
    pred = [[] for _ in code]
    for k, ss in enumerate(succ):
        for t in ss:
            pred[t].append(k)

    def dominates(h, n):
        while n in idom:
            if n == h:
                return True
            if idom[n] == n:
                return False
            n = idom[n]
        return False
    out = []
    for latch, ss in enumerate(succ):
        for header in ss:
            if latch not in idom or not dominates(header, latch):
                continue
            body, stack = {header, latch}, [latch]
            while stack:
                for p in pred[stack.pop()]:
                    if p not in body:
                        body.add(p)
                        stack.append(p)
            out.append((header, body))
    merged = {}  # one loop per header (several latches: continue-like back edges)
    for header, body in out:
        merged.setdefault(header, set()).update(body)
    return [(h, frozenset(b)) for h, b in merged.items()]


def hot_loop_mix(code, inner_trips: int):
    """Dynamic instruction classes of one pass of the hottest loop: the loop with the most dot/mul
    instructions per pass; loops nested in it count inner_trips times (their trip count from the
    source) and, of loops with equal counts, the outermost is taken."""
    ls = loops(code)
    if not ls:
        raise SystemExit("no loop found")
    cls = [classify(mn, ops) for _, mn, ops in code]

    def weights(loop):  # executions of each body instruction per pass
        w = dict.fromkeys(loop[1], 1)
        for other in ls:
            if other[1] < loop[1]:  # a proper subset: nested
                for k in other[1]:
                    w[k] = inner_trips
        return w

    def dots(loop):
        return sum(n for k, n in weights(loop).items() if cls[k] == "dot/mul")
    best = max(ls, key=lambda l: (dots(l), len(l[1])))
    mix = dict.fromkeys(CLASSES, 0)
    for k, n in weights(best).items():
        mix[cls[k]] += n
    nested = len({o[1] for o in ls if o[1] < best[1]})
    return mix, {"static": len(best[1]), "nested_loops": nested, "address": hex(code[best[0]][0])}


def find(syms, pattern):
    hits = [s for s in syms if re.search(pattern, s)]
    if not hits:
        raise SystemExit(f"no symbol matches {pattern!r}")
    return min(hits, key=len)


def compile_ours(cxx: str, root: Path, obj: Path) -> Path:
    # the project's flags (native/CMakeLists.txt, Release); dotprod per function (target attribute)
    subprocess.run([cxx, "-std=c++17", "-O3", "-DNDEBUG", "-fPIC", f"-I{root}/native/include", f"-I{root}/native/src",
                    "-c", str(root / "native/src/kernels_neon.cpp"), "-o", str(obj)], check=True)
    return obj


def tinyvllm_kernels(trait: str, slices: int) -> list:
    """(label, symbol pattern, slice dots per pass, inner trips) of tinyvllm's kernels for one format."""
    return [
        # decode: a loop the compiler keeps inside is the per-row scales loop (NW = 4 rows)
        ("tinyvllm neon decode", rf"gemv_NeonDot<tv::{trait}, 1>", 4 * slices, 4),
        ("tinyvllm dotprod decode", rf"gemv_DotprodDot<tv::{trait}, 1>", 4 * slices, 4),
        # the rows kernels (one weight row x NX activation rows; its hottest loop is NX = 4: two
        # 32-value blocks or one super-block x 4 rows per pass): prefill before QuantGemm
        ("tinyvllm neon rows x4", rf"rows_NeonDot<tv::{trait}>", 4 * (2 if slices == 1 else 8), 1),
        ("tinyvllm dotprod rows x4", rf"rows_DotprodDot<tv::{trait}>", 4 * (2 if slices == 1 else 8), 1),
        ("tinyvllm neon prefill", rf"micro_neon<tv::{trait}>", 16, 1),
        ("tinyvllm dotprod prefill", rf"micro_dotprod<tv::{trait}>", 16, 1),
    ]


def compare(rev: str, cxx: str) -> int:
    """Hot-loop instruction mixes of every tinyvllm kernel at git revision rev vs the working tree."""
    objdump = cxx.replace("g++", "objdump")
    traits = [t for t, *_ in FORMATS.values()] + ["FmtQ2_K", "FmtQ3_K"]
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        old.mkdir()
        archive = subprocess.run(["git", "archive", rev, "native"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        code = {tag: disassemble(compile_ours(cxx, root, Path(tmp) / f"{tag}.o"), objdump)
                for tag, root in ((rev, old), ("working tree", ROOT))}
    differ = 0
    for trait in traits:
        for label, pattern, _, inner in tinyvllm_kernels(trait, 1):
            mixes = []
            for syms in code.values():
                hits = [s for s in syms if re.search(pattern, s)]
                mixes.append(hot_loop_mix(syms[min(hits, key=len)], inner)[0] if hits else None)
            same = mixes[0] == mixes[1]
            differ += not same
            totals = ["-" if m is None else sum(m.values()) for m in mixes]
            print(f"{'same' if same else 'DIFFERS':8}{trait:11}{label:26}{rev}: {totals[0]}  working tree: {totals[1]}")
    print(f"{differ} kernel(s) differ")
    return 1 if differ else 0


def compile_objects(cxx: str, llama: Path, tmp: Path) -> dict:
    cc = cxx.replace("g++", "gcc")
    ours = compile_ours(cxx, ROOT, tmp / "kernels_neon.o")
    src = llama / "ggml/src/ggml-cpu/arch/arm/quants.c"
    inc = [f"-I{llama}/ggml/include", f"-I{llama}/ggml/src", f"-I{llama}/ggml/src/ggml-cpu"]
    out = {"tinyvllm": ours}
    for tag, march in (("llama.cpp dotprod", "armv8.2-a+dotprod"), ("llama.cpp neon", "armv8-a")):
        o = tmp / f"quants-{march.replace('+', '_')}.o"
        subprocess.run([cc, "-std=c11", "-O3", "-DNDEBUG", "-fPIC", f"-march={march}", *inc, "-c", str(src), "-o", str(o)],
                       check=True)
        out[tag] = o
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, default=LLAMA_CPP, help="llama.cpp source tree")
    ap.add_argument("--cxx", default="aarch64-linux-gnu-g++")
    ap.add_argument("--out-dir", type=Path, default=machine.DOCS)
    ap.add_argument("--compare", metavar="REV", help="compare tinyvllm's hot loops with git revision REV's, then exit")
    args = ap.parse_args()
    if args.compare:
        raise SystemExit(compare(args.compare, args.cxx))
    objdump = args.cxx.replace("g++", "objdump")
    with tempfile.TemporaryDirectory() as tmp:
        objs = compile_objects(args.cxx, args.llama_cpp, Path(tmp))
        code = {tag: disassemble(o, objdump) for tag, o in objs.items()}
    version = subprocess.run([args.cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    rows = []
    for fmt, (trait, values, vec_dot, llama_blocks, trips) in FORMATS.items():
        slices = values // 32
        kernels = [(label, "tinyvllm", *rest) for label, *rest in tinyvllm_kernels(trait, slices)] + [
            ("llama.cpp neon (armv8.0)", "llama.cpp neon", rf"^{vec_dot}$", llama_blocks * slices, trips),
            ("llama.cpp dotprod", "llama.cpp dotprod", rf"^{vec_dot}$", llama_blocks * slices, trips),
        ]
        for label, tag, pattern, per_pass, inner in kernels:
            sym = find(code[tag], pattern)
            mix, info = hot_loop_mix(code[tag][sym], inner)
            rows.append({"format": fmt, "kernel": label, "symbol": sym.split("(")[0], "slice_dots_per_pass": per_pass,
                         "per_pass": mix, "per_slice_dot": {c: mix[c] / per_pass for c in CLASSES},
                         "block_values": values, "inner_trips": inner, **info})
    data = {"machine": machine.machine_info(), "compiler": version, "llama_cpp": str(args.llama_cpp),
            "flags": {"tinyvllm": "-O3 (dotprod functions: target attribute armv8.2-a+dotprod)",
                      "llama.cpp": "-O3 -march=armv8.2-a+dotprod / -march=armv8-a"},
            "rows": rows}
    machine.write_outputs("neon_mix", data, markdown(data), args.out_dir)


def markdown(d) -> str:
    header = ["format", "kernel", *CLASSES, "total", "per block", "loop (inner loops)"]
    table = []
    for r in d["rows"]:
        p = r["per_slice_dot"]
        total = sum(p.values())
        table.append([r["format"], r["kernel"], *(f"{p[c]:.2f}" for c in CLASSES), f"{total:.2f}",
                      f"{total * r['block_values'] / 32:.1f}",
                      f"{r['static']} insns" + (f" ({r['nested_loops']} x {r['inner_trips']})" if r["nested_loops"] else "")])
    m = d["machine"]
    return "\n".join([
        "# aarch64 kernels: instruction mix per weight slice, tinyvllm vs llama.cpp", "",
        f"{m['date']} · git {m['git_commit']} · {d['compiler']} · llama.cpp source `{d['llama_cpp']}` · "
        f"tinyvllm {d['flags']['tinyvllm']}; llama.cpp quants.c {d['flags']['llama.cpp']}", "",
        "Instructions of the hot loop (a natural loop of the control-flow graph; inner loops the compiler kept "
        "count their trip count from the source: the per-row scales loop of tinyvllm's decode kernel 4 times, "
        "llama.cpp's `j` loops over a super-block 4 or 2 times) from `objdump -d` of the cross-compiled code, per 32 weights x 1 output "
        "(one 32-value slice of a weight row against one activation row); `per block` is the total per stored "
        "block of the format (32 or 256 weights). Static counts, not timings: no ARM machine here. tinyvllm's "
        "decode kernel runs 4 weight rows per pass, its prefill kernel a panel of 4 weight rows against 4 "
        "activation rows (the weights unpacked once per matmul, outside this loop); llama.cpp's vec_dot runs one "
        "row against one row (its prefill on ARM goes through the same vec_dot for these formats unless a "
        "repacked layout applies). llama.cpp quantizes activations to int8, tinyvllm to int16: on the dotprod "
        "path each 16 bytes of int16 activations take two SDOTs (high and low bytes).", "",
        machine.md_table(header, table),
    ])


if __name__ == "__main__":
    main()
