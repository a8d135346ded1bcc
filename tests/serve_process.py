"""Start `tinyvllm serve` as a real process on a free loopback port and wait until /health answers."""
import socket
import subprocess
import time
from pathlib import Path

import httpx

from child_process import child_env, tinyvllm_cmd

ROOT = Path(__file__).resolve().parents[1]


def start_server(model, *args: str, timeout_s: float = 300.0) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(tinyvllm_cmd("serve", "--model", str(model), "--port", str(port), "--log-level", "warning", *args),
                            cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"tinyvllm serve exited {proc.returncode}: {proc.stdout.read().decode()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"tinyvllm serve did not answer /health in {timeout_s} s")
        time.sleep(0.1)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
