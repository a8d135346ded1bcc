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
    wait_until_up(proc, url + "/health", "tinyvllm serve", lambda: proc.stdout.read().decode(), timeout_s,
                  need_ok=True)
    return proc, url

def wait_until_up(proc: subprocess.Popen, url: str, what: str, log, timeout_s: float, need_ok: bool = False) -> None:
    """Poll url until it answers (with 200 when need_ok); fail with the process's log (log() reads it)
    if the process exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited {proc.returncode}: {log()[-4000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200 or not need_ok:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{what} did not come up in {timeout_s} s")
        time.sleep(0.1)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
