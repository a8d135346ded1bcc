"""Benchmark-scale model-file fuzzing (issue 16): the strategies of tests/gguf_fuzz.py, run for N cases
or T seconds with a random seed; reports cases run, distinct ModelFormatError messages (with the path and
numbers masked), and every case that raised anything else (a finding), with its traceback.

    python benchmarks/fuzz_models.py --cases 100000 --seconds 3600 --json out.json

With --forward, every case that loads also goes through the native engine
(`gguf_fuzz.check_native_forward`: `LLM(path)`, the runner packs the weights into the C++ core, and two
generated tokens). Run that under the ASan/UBSan build of the core to catch memory errors the Python
checks miss:

    cmake -S . -B build-asan -G Ninja -DTINYVLLM_SANITIZE=ON && cmake --build build-asan --target tinyvllm_native
    LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
        ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
        TINYVLLM_LIB=build-asan/native/libtinyvllm.so python benchmarks/fuzz_models.py --forward --cases 5000

CI runs the fixed-seed subset this way (tests/test_fuzz_models.py with TINYVLLM_FUZZ_NATIVE=1, .ci/run).
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import gguf_fuzz as gf  # noqa: E402


def _shape(msg: str) -> str:
    """An error message with paths and numbers masked: its kind, for counting distinct messages."""
    msg = re.sub(r"/\S+?\.gguf:?", "<file>", msg)
    return re.sub(r"\d+", "N", msg)[:160]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=3600.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--forward", action="store_true", help="cases that load also run two tokens through the engine")
    args = ap.parse_args()

    from tiny_models import make_tiny_gguf
    work = Path(tempfile.mkdtemp(prefix="tinyvllm-fuzz-bench-"))
    tiny = Path(make_tiny_gguf(work / "tiny.gguf", qtype="Q8_0")).read_bytes()
    counts = collections.Counter()
    messages = collections.Counter()
    findings: dict[str, dict] = {}
    start = time.perf_counter()

    class _Done(Exception):
        pass

    cases = st.one_of(gf.gguf_cases().map(lambda c: ("structure", c[1])),
                      gf.byte_mutations(size=len(tiny), hot=16_000).map(
                          lambda m: ("bytes", gf.apply_mutations(tiny, m))))

    @settings(max_examples=args.cases, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(cases)
    def run(case):
        if time.perf_counter() - start > args.seconds:
            raise _Done
        kind, data = case
        p = gf.write(work / "case.gguf", data)
        counts[kind] += 1
        try:
            msg = gf.check_model_file(p)
            if args.forward and msg == "ok":
                msg = gf.check_native_forward(p)
                counts["forward"] += msg == "ok"
            messages[_shape(msg)] += 1
        except Exception as e:  # a finding: anything but a ModelFormatError
            key = f"{type(e).__name__}: {_shape(str(e))}"
            if key not in findings:
                findings[key] = {"kind": kind, "traceback": traceback.format_exc()[-2000:],
                                 "file": str(work / f"finding{len(findings)}.gguf")}
                Path(findings[key]["file"]).write_bytes(data)

    if args.seed is not None:
        run = seed(args.seed)(run)
    try:
        run()
    except _Done:
        pass
    elapsed = time.perf_counter() - start
    report = {"cases": counts["structure"] + counts["bytes"], "by_kind": dict(counts), "seconds": round(elapsed, 1),
              "distinct_messages": len(messages), "ok": messages.get("ok", 0),
              "top_messages": messages.most_common(40), "findings": findings}
    print(json.dumps({k: v for k, v in report.items() if k != "top_messages"}, indent=1))
    for m, n in messages.most_common(40):
        print(f"{n:7d}  {m}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
