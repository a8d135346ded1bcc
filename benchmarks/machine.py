"""Helpers shared by the benchmark scripts: machine facts, measured ceilings, output files."""
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks"


_ELF_MACHINE = {"x86_64": 62, "amd64": 62, "aarch64": 183, "arm64": 183}


def use_source_tree(installed: bool) -> None:
    """Import tinyvllm from this checkout unless `installed` (then the copy pip installed into the
    running environment is used). The library is the newest build*/libtinyvllm.so built for this
    CPU architecture (cross builds such as build-aarch64/ are skipped; no ASan builds), exported as
    TINYVLLM_LIB so child processes load the same one; a TINYVLLM_LIB already set wins."""
    if installed:
        return
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if os.environ.get("TINYVLLM_LIB"):
        return
    want = _ELF_MACHINE.get(platform.machine().lower())

    def native(p: Path) -> bool:
        with open(p, "rb") as f:
            head = f.read(20)
        return want is None or (head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == want)
    libs = [p for b in ROOT.glob("build*") if "asan" not in b.name for p in b.rglob("libtinyvllm.so")]
    libs = sorted((p for p in libs if native(p)), key=lambda p: -p.stat().st_mtime)
    if libs:
        os.environ["TINYVLLM_LIB"] = str(libs[0])


def _sh(*cmd) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_info() -> dict:
    info = {"machine": platform.machine(), "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", fields.get("Features", "")).split())
    info.update(model=fields.get("model name", fields.get("Processor", "?")),
                mhz_cpuinfo=float(fields["cpu MHz"]) if "cpu MHz" in fields else None,
                simd=sorted(flags & {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                                     "avx512_bf16", "asimd", "asimddp", "i8mm"}))
    return info


def machine_info() -> dict:
    commit = _sh("git", "rev-parse", "--short", "HEAD")
    dirty = bool(_sh("git", "status", "--porcelain", "--untracked-files=no"))
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu_info(), "os": platform.platform(), "python": platform.python_version(),
            "git_commit": commit + ("-dirty" if dirty else ""), "loadavg_at_start": load}


class OtherLoad:
    """CPU time other processes (and the hypervisor: steal) used while the benchmark ran, as a share
    of all CPUs' wall time: /proc/stat's busy + steal time minus this process's and its finished
    children's CPU time. None where /proc/stat is missing."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        except (OSError, ValueError):
            return None
        t = os.times()
        busy = (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / os.sysconf("SC_CLK_TCK")  # + irq, softirq, steal
        return busy, t.user + t.system + t.children_user + t.children_system, time.monotonic()

    def share(self):
        end = self._sample()
        if not (self.start and end):
            return None
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        other = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return max(0.0, other / ((end[2] - self.start[2]) * cpus))


RESULT = "RESULT "  # the line a child benchmark process answers with (anything else it prints is ignored)


def print_result(obj) -> None:
    print(RESULT + json.dumps(obj), flush=True)


def child_result(cmd, what: str, fail=sys.exit, **run_kwargs) -> dict:
    """Run a child benchmark process (subprocess.run's keyword arguments pass through) and return the
    object it gave print_result(). When it fails (non-zero exit, no result line): fail(message), whose
    return is returned (the default exits with the message)."""
    r = subprocess.run(cmd, capture_output=True, text=True, **run_kwargs)
    lines = [line for line in r.stdout.splitlines() if line.startswith(RESULT)]
    if r.returncode or not lines:
        return fail(f"{what} failed (rc {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT):])


def busy_warning(other_share) -> str:
    """A markdown warning when other processes took a noticeable share of the CPUs during the run."""
    if other_share is not None and other_share > 0.05:
        return (f"**Warning: other processes used {other_share:.0%} of the CPUs during this run: "
                "these numbers are not a measurement; rerun on a quiet machine.**\n\n")
    return ""


def caveats(other_share, quick: bool | str = False) -> str:
    """A report's opening warnings: a --quick run is a smoke test (quick: True, or what it shrank), and
    busy_warning's."""
    detail = f": {quick}" if isinstance(quick, str) else ""
    return (f"**Smoke test (--quick){detail}, not a measurement.**\n\n" if quick else "") + busy_warning(other_share)


# ---- measured ceilings (benchmarks/membw.c) ------------------------------------------------------
def _membw() -> Path | None:
    src = Path(__file__).with_name("membw.c")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None
    tag = hashlib.sha256(src.read_bytes() + platform.node().encode()).hexdigest()[:12]
    exe = Path(tempfile.gettempdir()) / f"tinyvllm-membw-{tag}"
    if not exe.is_file():
        r = subprocess.run([cc, "-O3", "-march=native", "-pthread", "-o", str(exe), str(src)],
                           capture_output=True, text=True)
        if r.returncode:
            print(f"note: could not build membw.c ({r.stderr.strip()[:200]}); using numpy", file=sys.stderr)
            return None
    return exe


def read_bandwidth(threads: int, mib: int = 1024, reps: int = 5) -> dict:
    """Best-of-`reps` read bandwidth over a `mib` MiB buffer (far larger than any cache)."""
    exe = _membw()
    if exe:
        out = json.loads(subprocess.run([str(exe), "read", str(mib), str(threads), str(reps)],
                                        capture_output=True, text=True, check=True).stdout)
        return {"bytes_per_s": out["read_bytes_per_s"], "threads": threads, "buffer_bytes": out["bytes"],
                "reps": reps, "method": "benchmarks/membw.c: threads sum their slices (several passes), best of reps"}
    import numpy as np
    a = np.ones(mib << 18, dtype=np.float32)
    best = min(_timed(a.sum) for _ in range(reps))
    return {"bytes_per_s": a.nbytes / best, "threads": 1, "buffer_bytes": a.nbytes, "reps": reps,
            "method": "numpy float32 sum (1 thread; no C compiler found), best of reps"}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def compute_peaks(threads: int) -> dict:
    """Measured int16/int8 dot-product and fp32 FMA throughput (ops/s, 1 MAC = 2 ops), or {}."""
    exe = _membw()
    if not exe:
        return {}
    out = json.loads(subprocess.run([str(exe), "peak", str(threads)], capture_output=True, text=True,
                                    check=True).stdout)
    out.pop("sink", None)
    return out


# ---- the model -----------------------------------------------------------------------------------
def decode_weight_bytes(gguf_path) -> dict:
    """Weight bytes one decoded token reads: every tensor once; with a tied output (no output.weight)
    token_embd is read whole as the output matrix, otherwise only one row of it (the lookup)."""
    from gguf import GGUFReader
    tensors = {t.name: t for t in GGUFReader(str(gguf_path)).tensors}
    total = sum(int(t.n_bytes) for t in tensors.values())
    emb = tensors.get("token_embd.weight")
    tied = "output.weight" not in tensors
    if emb is not None and not tied:
        total -= int(emb.n_bytes) - int(emb.n_bytes) // int(emb.shape[-1])  # one row of [dim, vocab]
    by_type: dict[str, int] = {}
    for t in tensors.values():
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_bytes)
    return {"bytes_per_token": total, "tied_output": tied, "n_tensors": len(tensors), "bytes_by_type": by_type}


# ---- output --------------------------------------------------------------------------------------
def md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_outputs(name: str, data: dict, markdown: str, out_dir: Path = DOCS) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(markdown + "\n")
    print(markdown)
    print(f"\nwrote {out_dir / (name + '.json')} and {name}.md")
