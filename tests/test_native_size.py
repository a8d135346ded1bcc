"""benchmarks/native_size.py's split of native/src: every non-blank line counted once, and the markers
put known code where it belongs (new formats' structs and branches, the AMX path, the old formats)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from native_size import SRC, classify, count  # noqa: E402


def parts_of(name: str) -> dict[str, str]:
    """Each non-blank line of native/src/<name> (stripped) -> its part (the last one when repeated)."""
    lines = (SRC / name).read_text().splitlines()
    return {ln.strip(): p for ln, p in zip(lines, classify(lines)) if p}


def test_every_non_blank_line_is_counted_once():
    r = count()
    for name, f in r["files"].items():
        non_blank = sum(1 for ln in (SRC / name).read_text().splitlines() if ln.strip())
        assert f["total"] == non_blank == f["amx"] + f["formats"] + f["rest"], name
    assert r["total"]["total"] == sum(f["total"] for f in r["files"].values())
    assert r["before_new_formats"] == r["total"]["total"] - r["total"]["formats"]
    assert r["files"]["kernels_amx.cpp"]["amx"] == r["files"]["kernels_amx.cpp"]["total"] > 0


def test_markers_follow_braces_and_lead_ins():
    lines = [
        "namespace tv {",
        "// a K format",
        "struct FmtQ9_K : FmtK {",
        "    static constexpr int BYTES = 1;",
        "};",
        "template <class F>",
        "void f() {",
        "    if constexpr (F::TWO_SCALES) {",
        "        a();",
        "    } else {",
        "        b();",
        "    }",
        "    const bool amx = true;",
        "}",
        "}  // namespace tv",
    ]
    assert classify(lines) == ["rest", "formats", "formats", "formats", "formats", "rest", "rest", "formats",
                               "formats", "formats", "rest", "rest", "amx", "rest", "rest"]


def test_formats_h_splits_old_from_new():
    p = parts_of("formats.h")
    assert p["struct FmtQ4_0 : FmtBase {  // f16 d, 16 bytes nibbles; w = (q - 8) d"] == "rest"
    assert p["static constexpr int DTYPE = TV_Q8_0, BYTES = 34;"] == "rest"
    assert p["static constexpr int DTYPE = TV_Q5_0, BYTES = 22, OFFSET = 16;"] == "formats"
    assert p["static constexpr int DTYPE = TV_Q4_K, BYTES = 144, SDMIN_AT = 2;"] == "formats"
    assert p["inline void unpack_slice(const uint8_t *blk, int s, int8_t q[32]) {"] == "rest"
