"""native/src's size in non-blank lines, split the way issue 17 counts it.

Issue 17 aims at native/src <= 3,000 non-blank lines "before the new quant formats are counted".
This script makes that number recomputable from the code instead of typed by hand. Every non-blank
line of native/src falls in exactly one part:

  amx      the AMX path: kernels_amx.cpp, and any line elsewhere that names AMX;
  formats  the formats added after issue 17 was filed (Q5_0, Q5_1, IQ4_NL, Q2_K..Q6_K): a line
           that names one of them, or a layout trait only they use (32-byte nibbles, 2-bit
           values, high bits, the code book, 16-value scales and mins, integer super-block scales);
  rest     everything else (F32/F16, Q4_0, Q4_1, Q8_0, the model, attention, the block manager...).

A line is one marker's when it names it, and so are the comment and `template <...>` lines just
above it. When such a line opens a brace that it does not close (a struct, a function, an
`if constexpr` branch), the lines up to the closing brace go with it. AMX wins over formats.
Lines that name old and new formats at once (a list of every format) count as new.

Usage: python benchmarks/native_size.py [--json] [--src DIR] [--show FILE]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "native" / "src"

AMX_FILES = {"kernels_amx.cpp"}
AMX = re.compile(r"amx", re.IGNORECASE)
NEW_FORMATS = re.compile(
    r"Q5_[01]|IQ4_NL|Q[2-6]_K|\bFmtK\b|LOW_NIB32|LOW_BIT2|HIGH_MASK32|HIGH_BYTES|HAS_TABLE|TABLE\b"
    r"|TWO_SCALES|TWO_MINS|scale_ints|\bsc_index|\bmn_index|\bnsc\b|\bSD_AT|\bSDMIN_AT|\bk_scales|k4_scale"
)
PARTS = ("amx", "formats", "rest")


def _code(line: str) -> str:
    """The line without its comment and string/char literals (so their braces do not count)."""
    line = re.sub(r'"(\\.|[^"\\])*"' + r"|'(\\.|[^'\\])*'", '""', line)
    line = re.sub(r"/\*.*?\*/", "", line)
    return line.split("//", 1)[0]


def _is_lead_in(line: str) -> bool:
    s = line.strip()
    return s.startswith("//") or s.startswith("template <") or s.startswith("template<")


def classify(lines: list[str], whole_file: str | None = None) -> list[str | None]:
    """One part per line (None for blank lines)."""
    n = len(lines)
    if whole_file:
        return [whole_file if ln.strip() else None for ln in lines]
    part: list[str | None] = ["rest" if ln.strip() else None for ln in lines]
    depth, until, owner = 0, -1, None  # `owner` holds lines while depth > `until`
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        own = "amx" if AMX.search(ln) else "formats" if NEW_FORMATS.search(ln) else None
        marked = owner if owner == "amx" or (owner and not own) else own
        if marked:
            part[i] = marked
        low = d = depth
        for ch in _code(ln):
            d += ch == "{"
            d -= ch == "}"
            low = min(low, d)
        if owner is not None and low <= until:  # its closing brace: the region ends on this line
            owner = None
        if owner is None and own and d > low:
            owner, until = own, low
        if own and not _is_lead_in(ln):  # the comment and template lines just above go with it
            j = i - 1
            while j >= 0 and lines[j].strip() and _is_lead_in(lines[j]):
                if part[j] == "rest":
                    part[j] = marked
                j -= 1
        depth = d
    assert len(part) == n
    return part


def count(src: Path = SRC) -> dict:
    files = {}
    for path in sorted(p for p in src.iterdir() if p.suffix in (".cpp", ".h")):
        lines = path.read_text().splitlines()
        parts = classify(lines, "amx" if path.name in AMX_FILES else None)
        files[path.name] = {k: sum(p == k for p in parts) for k in PARTS}
        files[path.name]["total"] = sum(p is not None for p in parts)
    total = {k: sum(f[k] for f in files.values()) for k in (*PARTS, "total")}
    return {
        "files": files,
        "total": total,
        "before_new_formats": total["total"] - total["formats"],
        "aim": 3000,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the counts as JSON")
    ap.add_argument("--src", type=Path, default=SRC, help="the directory to count (default: native/src)")
    ap.add_argument("--show", metavar="FILE", help="print FILE's lines, each with its part, to check the split")
    args = ap.parse_args()
    if args.show:
        path = args.src / args.show
        lines = path.read_text().splitlines()
        for part, ln in zip(classify(lines, "amx" if path.name in AMX_FILES else None), lines):
            print(f"{part or '':<8}| {ln}")
        return
    r = count(args.src)
    if args.json:
        print(json.dumps(r, indent=1))
        return
    print(f"{'file':<22}{'total':>7}{'amx':>7}{'formats':>9}{'rest':>7}")
    for name, f in sorted(r["files"].items(), key=lambda kv: -kv[1]["total"]):
        print(f"{name:<22}{f['total']:>7}{f['amx']:>7}{f['formats']:>9}{f['rest']:>7}")
    t = r["total"]
    print(f"{'native/src':<22}{t['total']:>7}{t['amx']:>7}{t['formats']:>9}{t['rest']:>7}")
    print(
        f"before the new quant formats are counted: {r['before_new_formats']} non-blank lines "
        f"(aim <= {r['aim']}); without the AMX path too: {t['rest']}"
    )


if __name__ == "__main__":
    main()
