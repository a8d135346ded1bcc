"""benchmarks/neon_instruction_mix.py's reading of aarch64 disassembly: instruction classes, loop
bodies from backward branches, and the hot loop's per-pass counts with a nested loop's trip count.
(The script itself cross-compiles; here it reads hand-written listings in objdump's shape.)"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from neon_instruction_mix import classify, hot_loop_mix, loops  # noqa: E402


def test_classify_vector_scalar_and_fp():
    assert classify("ldr", "q0, [x1, #16]") == "load"
    assert classify("ld1", "{v0.16b, v1.16b}, [x2]") == "load"
    assert classify("stp", "q0, q1, [sp]") == "store"
    assert classify("sdot", "v0.4s, v1.16b, v2.4b[1]") == "dot/mul"
    assert classify("smlal2", "v3.4s, v4.8h, v5.h[7]") == "dot/mul"
    assert classify("mul", "x0, x1, x2") == "scalar/branch"  # a scalar multiply is address math
    assert classify("sxtl", "v0.8h, v1.8b") == "shuffle/widen"
    assert classify("uzp1", "v0.16b, v1.16b, v2.16b") == "shuffle/widen"
    assert classify("add", "v0.4s, v0.4s, v1.4s") == "int alu"
    assert classify("add", "x0, x0, #0x20") == "scalar/branch"
    assert classify("fmla", "v0.4s, v1.4s, v2.s[0]") == "fp"
    assert classify("fmadd", "s0, s1, s2, s0") == "fp"
    assert classify("scvtf", "v1.4s, v1.4s") == "fp"
    assert classify("b.ne", "1c <f+0x1c>") == "scalar/branch"


def listing(lines):
    return [(0x100 + 4 * k, mn, ops) for k, (mn, ops) in enumerate(lines)]


def test_hot_loop_counts_nested_loop_by_its_trips():
    code = listing([
        ("mov", "x0, #0"),                       # 0x100
        ("ldr", "q0, [x1]"),                     # 0x104  outer loop starts
        ("sdot", "v2.4s, v0.16b, v1.16b"),       # 0x108  inner loop starts
        ("add", "v3.4s, v3.4s, v2.4s"),          # 0x10c
        ("subs", "x2, x2, #1"),                  # 0x110
        ("b.ne", "108 <f+0x8>"),                 # 0x114  inner back edge
        ("fmla", "v4.4s, v5.4s, v6.4s"),         # 0x118
        ("cbnz", "x3, 104 <f+0x4>"),             # 0x11c  outer back edge
        ("ret", ""),
    ])
    assert sorted((h, sorted(b)) for h, b in loops(code)) == [(1, [1, 2, 3, 4, 5, 6, 7]), (2, [2, 3, 4, 5])]
    mix, info = hot_loop_mix(code, inner_trips=4)
    assert info["nested_loops"] == 1 and info["address"] == hex(0x104)
    # outer body once (ldr, fmla, cbnz), inner body 4 times (sdot, add, subs, b.ne)
    assert mix["load"] == 1 and mix["fp"] == 1 and mix["dot/mul"] == 4 and mix["int alu"] == 4
    assert mix["scalar/branch"] == 1 + 2 * 4


def test_hot_loop_is_the_one_with_the_most_dots():
    code = listing([
        ("ldr", "w0, [x1]"),                     # a scalar tail loop
        ("add", "w2, w2, w0"),
        ("b.ne", "100 <f>"),
        ("sdot", "v0.4s, v1.16b, v2.16b"),       # the vector loop
        ("sdot", "v0.4s, v3.16b, v4.16b"),
        ("b.ne", "10c <f+0xc>"),
    ])
    mix, info = hot_loop_mix(code, inner_trips=1)
    assert mix["dot/mul"] == 2 and mix["load"] == 0 and info["static"] == 3


def test_loop_laid_out_in_pieces():
    """A loop whose body the compiler placed after unrelated code: only its own instructions count."""
    code = listing([
        ("sdot", "v0.4s, v1.16b, v2.16b"),       # 0x100 header
        ("b", "110 <f+0x10>"),                   # 0x104 to the rest of the body
        ("ldr", "q9, [x9]"),                     # 0x108 unrelated (reached from elsewhere)
        ("ret", ""),                             # 0x10c
        ("ldr", "q1, [x1], #16"),                # 0x110 rest of the body
        ("b.ne", "100 <f>"),                     # 0x114 back edge
        ("ret", ""),
    ])
    mix, info = hot_loop_mix(code, inner_trips=1)
    assert info["static"] == 4 and mix["load"] == 1 and mix["dot/mul"] == 1 and mix["scalar/branch"] == 2
