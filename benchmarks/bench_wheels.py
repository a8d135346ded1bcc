"""Wheel size and import time: the size of each wheel and of its native library, and how long
`import tinyvllm` (and `from tinyvllm import LLM`, which loads the native core) takes in a fresh
interpreter, for the wheel of this machine's architecture unpacked into a temporary folder (its
dependencies come from the running environment). Goals (issue 14): native library < 2 MB, import < 0.3 s.

    python benchmarks/bench_wheels.py build-wheels/*.whl      # e.g. after cross/prove-arm64-wheel.sh
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import OtherLoad, busy_warning, machine_info, md_table, write_outputs  # noqa: E402

# the time inside the child, from the first import statement to the end (interpreter start-up excluded)
CHILD = ("import time, json; t = time.perf_counter(); {stmt}; d = time.perf_counter() - t\n"
         "import sys; print(json.dumps({{'s': d, 'numpy_loaded': 'numpy' in sys.modules,"
         " 'native_loaded': 'tinyvllm._native' in sys.modules}}))")
STATEMENTS = {"import tinyvllm": "import tinyvllm",
              "from tinyvllm import LLM": "from tinyvllm import LLM",
              "LLM + native core loaded": "from tinyvllm import LLM; from tinyvllm import _native; _native.lib"}


def wheel_facts(whl: Path) -> dict:
    with zipfile.ZipFile(whl) as z:
        libs = [i for i in z.infolist() if i.filename.startswith("tinyvllm/libtinyvllm")]
        tag = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/WHEEL"))).decode()
    return {"wheel": whl.name, "wheel_bytes": whl.stat().st_size,
            "tags": [line.split(": ", 1)[1] for line in tag.splitlines() if line.startswith("Tag: ")],
            "native_library": libs[0].filename if libs else None,
            "native_library_bytes": libs[0].file_size if libs else None}


def time_imports(whl: Path, python: str, runs: int) -> dict:
    out = {}
    with tempfile.TemporaryDirectory(prefix="tinyvllm-wheel-") as tmp:
        with zipfile.ZipFile(whl) as z:
            z.extractall(tmp)
        env = {k: v for k, v in os.environ.items() if k not in ("TINYVLLM_LIB", "TINYVLLM_HEADER", "PYTHONPATH")}
        env["PYTHONPATH"] = tmp
        for name, stmt in STATEMENTS.items():
            subprocess.run([python, "-c", CHILD.format(stmt=stmt)], env=env, cwd=tmp, check=True,
                           capture_output=True)  # warm the page cache once, not counted
            rows = [json.loads(subprocess.run([python, "-c", CHILD.format(stmt=stmt)], env=env, cwd=tmp, check=True,
                                              capture_output=True, text=True).stdout) for _ in range(runs)]
            s = sorted(r["s"] for r in rows)
            out[name] = {"s_min": s[0], "s_median": statistics.median(s), "s_max": s[-1], "runs": runs,
                         "numpy_loaded": rows[0]["numpy_loaded"], "native_loaded": rows[0]["native_loaded"]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wheels", nargs="+", type=Path)
    ap.add_argument("--python", default=sys.executable, help="interpreter with the dependencies installed")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--out-dir", type=Path, default=None, help="default docs/benchmarks")
    a = ap.parse_args()
    info, load = machine_info(), OtherLoad()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    wheels = [wheel_facts(w) for w in a.wheels]
    native = [w for w in a.wheels if w.name.endswith(f"_{arch}.whl")]
    if not native:
        raise SystemExit(f"no wheel for this machine's architecture ({arch}) among {[w.name for w in a.wheels]}")
    imports = time_imports(native[0], a.python, a.runs)
    share = load.share()
    data = {"machine": info, "wheels": wheels, "import_wheel": native[0].name, "imports": imports,
            "other_cpu_share": share, "loadavg_at_end": os.getloadavg()}
    md = ["# Wheel size and import time", "", busy_warning(share).strip(), "",
          f"`benchmarks/bench_wheels.py` on {info['cpu'].get('model', '?')}, Python {info['python']}, commit "
          f"{info['git_commit']}, {info['date']}; load average "
          f"{tuple(round(x, 2) for x in info['loadavg_at_start'] or ())} at start, "
          f"{tuple(round(x, 2) for x in data['loadavg_at_end'])} at end; other processes' CPU share "
          f"{share:.0%}. Goals: native library < 2 MB, `import tinyvllm` < 0.3 s.", "",
          md_table(["wheel", "wheel MB", "native library", "library MB (unpacked)"],
                   [[w["wheel"], f"{w['wheel_bytes'] / 1e6:.2f}", w["native_library"],
                     f"{w['native_library_bytes'] / 1e6:.2f}"] for w in wheels]), "",
          f"Import time in a fresh interpreter (`{native[0].name}` unpacked; {a.runs} runs after one warm-up; "
          "the time from the first import statement, interpreter start-up excluded):", "",
          md_table(["statement", "min s", "median s", "max s", "numpy loaded", "native core loaded"],
                   [[f"`{k}`", f"{v['s_min']:.3f}", f"{v['s_median']:.3f}", f"{v['s_max']:.3f}",
                     v["numpy_loaded"], v["native_loaded"]] for k, v in imports.items()])]
    write_outputs("wheels", data, "\n".join(line for line in md if line is not None).replace("\n\n\n", "\n\n"),
                  **({"out_dir": a.out_dir} if a.out_dir else {}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
