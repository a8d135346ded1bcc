"""Soak benchmark (issue 16; not a CI test): `tinyvllm serve` under a memory budget takes mixed traffic for
a configurable time (the issue's figure is 30 minutes): completions and chat, streamed and not, n of 1-3,
shared-prefix and distinct prompts, random lengths, and clients that hang up mid-answer at random.
Checked at the end, and written to docs/benchmarks/soak.{json,md}:

- resident memory flat after warm-up: the server's RSS (/proc/<pid>/status) sampled through the run; the
  slope of a least-squares line over the samples after warm-up (MiB per 10 minutes), and the growth from
  the end of warm-up to the end; the peak (VmHWM) against the budget;
- the KV pool back to full once the traffic stops (tinyvllm:kv_blocks_free == used + free);
- no request lost or duplicated: every request sent got exactly one outcome (an answer with n choices
  each finished once and one [DONE] for streams, a deliberate hang-up, or a 4xx), every response id is
  distinct, and the server's count of finished completions (tinyvllm:request_success) covers every
  answered completion once (plus hung-up ones that finished before the server saw the hang-up).

    python benchmarks/bench_soak.py --minutes 30 --threads 1 --clients 8
    python benchmarks/bench_soak.py --minutes 1 --out /tmp      # smoke run
"""
import argparse
import asyncio
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

ROOT = machine.ROOT
MODEL = "smollm2-135m"  # the reference GGUF (resolved from the cache)
SHARED = "You are a helpful assistant who answers in plain words. Here is the question of the day. "
TOPICS = ["the sea", "a lighthouse", "bread", "the moon", "trains", "a garden", "winter", "a violin", "rivers"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def metric(text: str, name: str) -> float:
    """Sum of a metric's samples (over its labels)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if re.match(re.escape(name) + r"(\{|\s)", line))


class Traffic:
    def __init__(self, url: str, seed: int, abort_share: float):
        self.url, self.rng, self.abort_share = url, random.Random(seed), abort_share
        self.sent = 0
        self.outcomes = {"answered": 0, "hung_up": 0, "refused_4xx": 0}
        self.choices = {"answered": 0, "hung_up": 0}  # completions (n per request) of each outcome
        self.problems: list[str] = []  # lost, duplicated, malformed, 5xx
        self.ids: set[str] = set()
        self.tokens = 0
        self.refusals: dict[str, int] = {}  # 4xx message (numbers masked) -> count

    def request(self):
        rng = self.rng
        chat, stream, n = rng.random() < 0.5, rng.random() < 0.6, rng.choice([1, 1, 1, 2, 3])
        text = (SHARED if rng.random() < 0.5 else "") + f"Tell me about {rng.choice(TOPICS)} " * rng.randint(1, 12)
        body = {"max_tokens": rng.randint(4, 96), "n": n, "stream": stream, "ignore_eos": rng.random() < 0.5,
                "temperature": rng.choice([0, 0.7, 1.0]), "seed": rng.randint(0, 2**31)}
        if chat:
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        hang_up_after = rng.randint(1, 8) if stream and rng.random() < self.abort_share else None
        if not stream and rng.random() < self.abort_share / 2:
            hang_up_after = 0  # a non-streaming client that gives up before the answer
        return ("/v1/chat/completions" if chat else "/v1/completions"), body, hang_up_after

    def record_id(self, rid):
        if rid in self.ids:
            self.problems.append(f"duplicated response id {rid}")
        self.ids.add(rid)

    async def one(self, client: httpx.AsyncClient):
        path, body, hang_up_after = self.request()
        self.sent += 1
        try:
            if not body["stream"]:
                if hang_up_after == 0:
                    try:  # answered within 50 ms (a quick 4xx): counted by what it says
                        return self.check_whole(await client.post(self.url + path, json=body, timeout=0.05), body)
                    except httpx.TimeoutException:
                        self.outcomes["hung_up"] += 1
                        self.choices["hung_up"] += body["n"]
                        return
                r = await client.post(self.url + path, json=body, timeout=600)
                return self.check_whole(r, body)
            async with client.stream("POST", self.url + path, json=body, timeout=600) as r:
                if r.status_code != 200:
                    return self.check_error(r.status_code, await r.aread())
                finished, done, chunks, rid = {}, 0, 0, None
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done += 1
                        continue
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        self.problems.append(f"in-band error: {ev['error']}")
                        return
                    rid = rid or ev["id"]
                    for c in ev["choices"]:
                        if c.get("finish_reason"):
                            finished[c["index"]] = finished.get(c["index"], 0) + 1
                    chunks += 1
                    if hang_up_after and chunks >= hang_up_after and len(finished) < body["n"]:
                        self.outcomes["hung_up"] += 1
                        self.choices["hung_up"] += body["n"]
                        return  # leaving the block closes the connection
                self.record_id(rid)
                if done != 1 or sorted(finished) != list(range(body["n"])) or set(finished.values()) != {1}:
                    self.problems.append(f"stream with {done} [DONE] and finishes {finished} for n={body['n']}")
                else:
                    self.outcomes["answered"] += 1
                    self.choices["answered"] += body["n"]
        except (httpx.TransportError, json.JSONDecodeError, KeyError) as e:
            self.problems.append(f"lost: {type(e).__name__}: {e}")

    def check_error(self, status: int, raw: bytes):
        if 400 <= status < 500 and "error" in json.loads(raw):
            self.outcomes["refused_4xx"] += 1
            msg = re.sub(r"\d+", "N", json.loads(raw)["error"]["message"])
            self.refusals[msg] = self.refusals.get(msg, 0) + 1
        else:
            self.problems.append(f"status {status}: {raw[:200]!r}")

    def check_whole(self, r: httpx.Response, body):
        if r.status_code != 200:
            return self.check_error(r.status_code, r.content)
        d = r.json()
        self.record_id(d["id"])
        if sorted(c["index"] for c in d["choices"]) != list(range(body["n"])) or \
                any(c["finish_reason"] is None for c in d["choices"]):
            self.problems.append(f"answer with choices {[c['index'] for c in d['choices']]} for n={body['n']}")
            return
        self.tokens += d["usage"]["completion_tokens"]
        self.outcomes["answered"] += 1
        self.choices["answered"] += body["n"]


async def run_traffic(traffic: Traffic, clients: int, seconds: float):
    end = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits) as client:
        async def worker():
            while time.monotonic() < end:
                await traffic.one(client)
        await asyncio.gather(*(worker() for _ in range(clients)))


def sample_rss(pid: int, samples: list, stop: asyncio.Event, every: float):
    async def loop():
        t0 = time.monotonic()
        while not stop.is_set():
            samples.append((time.monotonic() - t0, proc_status(pid, "VmRSS")))
            try:
                await asyncio.wait_for(stop.wait(), every)
            except asyncio.TimeoutError:
                pass
    return loop()


def slope(points) -> float:
    """Least-squares slope (bytes per second) of (t, rss) points."""
    n = len(points)
    if n < 2:
        return 0.0
    mt, mr = sum(t for t, _ in points) / n, sum(r for _, r in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (r - mr) for t, r in points) / var if var else 0.0


def load_note(other_share) -> str:
    """What other work on the machine changes here: the traffic's volume, not the checks (a soak is about
    correctness and memory, so it may run beside other work)."""
    if other_share is None or other_share <= 0.05:
        return ""
    return (f"**Other processes used {other_share:.0%} of the CPUs during this run: the request and token "
            "counts are lower than on a quiet machine; the checks (nothing lost or duplicated, pool back to "
            "full, RSS flat after warm-up) do not depend on it.**\n\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--warmup-minutes", type=float, default=None, help="default: a fifth of the run")
    ap.add_argument("--memory-budget", default="200MB")
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--abort-share", type=float, default=0.2, help="share of streamed requests hung up mid-answer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output directory (default docs/benchmarks)")
    ap.add_argument("--installed", action="store_true", help="the installed tinyvllm, not this checkout")
    a = ap.parse_args()
    machine.use_source_tree(a.installed)
    warmup = (a.warmup_minutes if a.warmup_minutes is not None else a.minutes / 5) * 60
    info = machine.machine_info()
    other = machine.OtherLoad()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    server = subprocess.Popen([sys.executable, "-m", "tinyvllm", "serve", "--model", a.model, "--port", str(port),
                               "--memory-budget", a.memory_budget, "--max-num-seqs", str(a.max_num_seqs),
                               "--threads", str(a.threads), "--log-level", "warning"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"server exited: {server.stdout.read().decode()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        rss_loaded = proc_status(server.pid, "VmRSS")
        traffic, samples = Traffic(url, a.seed, a.abort_share), []

        async def soak():
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample_rss(server.pid, samples, stop, every=5.0))
            await run_traffic(traffic, a.clients, a.minutes * 60)
            stop.set()
            await sampler
        t0 = time.monotonic()
        asyncio.run(soak())
        elapsed = time.monotonic() - t0

        # the pool back to full, and the server's own count of finished requests
        deadline, m = time.monotonic() + 120, ""
        while time.monotonic() < deadline:
            m = httpx.get(url + "/metrics", timeout=10).text
            if metric(m, "tinyvllm:kv_blocks_used") == 0 and metric(m, "tinyvllm:num_requests_running") == 0 \
                    and metric(m, "tinyvllm:num_requests_waiting") == 0:
                break
            time.sleep(0.5)
        blocks_free, blocks_used = metric(m, "tinyvllm:kv_blocks_free"), metric(m, "tinyvllm:kv_blocks_used")
        finished_by_reason = {mm[1]: float(mm[2]) for mm in re.finditer(
            r'^tinyvllm:request_success_total\{finished_reason="([^"]+)"\} (\S+)', m, re.M)}
        server_finished = sum(finished_by_reason.values())
        hwm = proc_status(server.pid, "VmHWM")
    finally:
        server.terminate()
        server.wait(60)

    after = [(t, r) for t, r in samples if t >= warmup]
    at_warm = after[0][1] if after else None
    per10 = slope(after) * 600 / 2**20
    o, c = traffic.outcomes, traffic.choices
    accounted = sum(o.values())
    from tinyvllm.engine.memory import parse_bytes
    budget = parse_bytes(a.memory_budget)
    data = dict(machine=info, other_load_share=other.share(), loadavg_at_end=os.getloadavg(),
                config=vars(a), seconds=round(elapsed, 1), warmup_seconds=warmup,
                requests_sent=traffic.sent, outcomes=o, completions=c, refusals=traffic.refusals, problems=traffic.problems[:50],
                num_problems=len(traffic.problems), completion_tokens_non_stream=traffic.tokens,
                server_finished=server_finished, server_finished_by_reason=finished_by_reason,
                kv_blocks_free_after=blocks_free, kv_blocks_used_after=blocks_used,
                rss_loaded=rss_loaded, rss_at_warm=at_warm, rss_end=samples[-1][1] if samples else None,
                rss_peak_vmhwm=hwm, memory_budget_bytes=budget,
                rss_slope_mib_per_10min_after_warmup=round(per10, 3),
                rss_samples=[(round(t, 1), r) for t, r in samples])
    ok = dict(no_problems=not traffic.problems, all_accounted=accounted == traffic.sent,
              # every answered completion counted once; a hung-up one only if it finished before the server saw
              server_count_matches=c["answered"] <= server_finished <= c["answered"] + c["hung_up"],
              pool_full=blocks_used == 0, rss_flat=abs(per10) < 2.0)
    data["checks"] = ok
    mib = lambda b: f"{b / 2**20:.1f}" if b is not None else "-"
    md = (f"# Soak: {a.minutes:g} minutes of mixed traffic under --memory-budget {a.memory_budget}\n\n"
          + load_note(data["other_load_share"])
          + f"{info['date']}, commit {info['git_commit']}, load average at start {tuple(round(x, 2) for x in info['loadavg_at_start'])}, "
            f"at end {tuple(round(x, 2) for x in data['loadavg_at_end'])}. Server: `tinyvllm serve` on the "
            f"reference model, --threads {a.threads} --max-num-seqs {a.max_num_seqs}; {a.clients} concurrent "
            f"clients (completions and chat, streamed and not, n 1-3, max_tokens 4-96, half with a shared "
            f"prefix, {a.abort_share:.0%} of streams hung up mid-answer). Written by benchmarks/bench_soak.py.\n\n"
          + machine.md_table(["figure", "value"], [
              ["requests sent", traffic.sent],
              ["answered / hung up / refused 4xx", f"{o['answered']} / {o['hung_up']} / {o['refused_4xx']}"],
              ["lost, duplicated or malformed", len(traffic.problems)],
              ["completions answered / hung up (n per request)", f"{c['answered']} / {c['hung_up']}"],
              ["completions the server counted finished", f"{server_finished:g}"],
              ["KV blocks used after the run", f"{blocks_used:g} (free {blocks_free:g})"],
              ["RSS after load (MiB)", mib(rss_loaded)],
              [f"RSS after {warmup / 60:g} min warm-up / at the end (MiB)", f"{mib(at_warm)} / {mib(data['rss_end'])}"],
              ["RSS slope after warm-up (MiB per 10 min)", f"{per10:+.2f}"],
              ["peak RSS (VmHWM) / budget (MiB)", f"{mib(hwm)} / {mib(budget)}"],
          ])
          + "\n\n4xx answers: " + ("; ".join(f"{n} x `{m}`" for m, n in sorted(traffic.refusals.items(),
                                                                              key=lambda kv: -kv[1])) or "none")
          + "\n\nChecks: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in ok.items()) + ".\n\n"
          "The budget bounds what the engine adds to the process (weights, KV, workspace, load overhead); the "
          "server process's RSS also holds the interpreter, FastAPI and uvicorn, so its peak is compared with "
          "the budget for scale only (tests/test_memory_budget*.py check the engine's growth against it).")
    out = Path(a.out) if a.out else machine.DOCS
    machine.write_outputs("soak", data, md, out)
    if not all(ok.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
