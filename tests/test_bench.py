"""`tinyvllm bench`: statistics vs numpy, the workload generator, offline runs on the reference model,
the --url client against a scripted SSE server and against a real `tinyvllm serve`."""
import asyncio
import json
import os
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from tinyvllm.bench.client import MetricMissing, parse_prometheus, run_url
from tinyvllm.bench.progress import Progress
from tinyvllm.bench.stats import RequestResult, latency_ms, percentile, summarize
from tinyvllm.bench.workload import (FIRST_ORDINARY_ID, arrival_offsets, load_dataset, parse_range,
                                     random_workload)
from tinyvllm.cli import main

from child_process import child_env, python_cmd
from serve_process import start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- statistics ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("values", [[5.0], [3.0, 1.0], [1, 2, 3, 4, 100], list(np.random.default_rng(0).exponential(
    size=101)), list(np.random.default_rng(1).normal(size=37))])
def test_percentile_matches_numpy(values):
    for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-12, abs=1e-12)
    lat = latency_ms(values)
    assert lat["mean"] == pytest.approx(1000 * np.mean(values))
    assert lat["p99"] == pytest.approx(1000 * np.percentile(values, 99))
    assert np.isnan(percentile([], 50))


def test_summarize_counts_only_successful_requests():
    ok = [RequestResult(10, 4, 4, ttft=0.1, itl=[0.02, 0.03, 0.04], e2e=0.19),
          RequestResult(20, 8, 8, ttft=0.3, itl=[0.01] * 7, e2e=0.37)]
    bad = RequestResult(99, 9, error="HTTP 500")
    s = summarize(ok + [bad], duration=2.0)
    assert (s["completed"], s["failed"], s["input_tokens"], s["output_tokens"]) == (2, 1, 30, 12)
    assert s["output_throughput"] == pytest.approx(6.0) and s["total_token_throughput"] == pytest.approx(21.0)
    assert s["request_throughput"] == pytest.approx(1.0)
    tpots = [(0.19 - 0.1) / 3, (0.37 - 0.3) / 7]  # (e2e - ttft) / (tokens - 1)
    assert s["tpot_ms"]["mean"] == pytest.approx(1000 * np.mean(tpots))
    assert s["itl_ms"]["p50"] == pytest.approx(1000 * np.median([0.02, 0.03, 0.04] + [0.01] * 7))
    assert s["ttft_ms"]["p99"] == pytest.approx(1000 * np.percentile([0.1, 0.3], 99))
    assert [r["error"] for r in s["requests"]] == [None, None, "HTTP 500"] and s["errors"] == ["HTTP 500"]


# ---- workload -----------------------------------------------------------------------------------------
def test_random_workload_exact_lengths_and_deterministic():
    wl = random_workload(50, (3, 40), (5, 9), vocab_size=1000, seed=7)
    assert all(len(r.prompt_token_ids) == r.prompt_len and 3 <= r.prompt_len <= 40 for r in wl)
    assert all(5 <= r.max_tokens <= 9 for r in wl)
    assert all(FIRST_ORDINARY_ID <= t < 1000 for r in wl for t in r.prompt_token_ids)
    assert len({r.prompt_len for r in wl}) > 10  # the range is really sampled
    same, other = random_workload(50, (3, 40), (5, 9), 1000, seed=7), random_workload(50, (3, 40), (5, 9), 1000, 8)
    assert [(r.prompt_token_ids, r.max_tokens) for r in wl] == [(r.prompt_token_ids, r.max_tokens) for r in same]
    assert [r.prompt_token_ids for r in wl] != [r.prompt_token_ids for r in other]
    assert [r.prompt_len for r in random_workload(4, (17, 17), (1, 1), 1000, 0)] == [17] * 4
    salted = random_workload(50, (3, 40), (5, 9), 1000, seed=7, salt=1)  # a sweep's next point: same lengths
    assert [(r.prompt_len, r.max_tokens) for r in salted] == [(r.prompt_len, r.max_tokens) for r in wl]
    assert all(a.prompt_token_ids != b.prompt_token_ids for a, b in zip(salted, wl))
    assert parse_range("32-256") == (32, 256) and parse_range("8") == (8, 8)
    for bad in ("0", "9-3", "x", "1-2-3"):
        with pytest.raises(ValueError):
            parse_range(bad)


def test_arrival_offsets():
    assert arrival_offsets(5, float("inf"), 0) == [0.0] * 5
    t = arrival_offsets(20000, 4.0, seed=3)
    gaps = np.diff(t)
    assert t == arrival_offsets(20000, 4.0, seed=3) and np.all(gaps >= 0)
    assert np.mean(gaps) == pytest.approx(0.25, rel=0.03)  # Poisson: exponential gaps, mean 1/rate
    assert np.std(gaps) == pytest.approx(0.25, rel=0.05)
    with pytest.raises(ValueError):
        arrival_offsets(3, 0.0, 0)


class _WordTokenizer:  # an independent count for the tests: one token per whitespace-separated word
    def encode(self, text, add_special_tokens=True):
        return text.split()


def test_load_dataset(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a b c", "max_tokens": 5}\n\n{"prompt": "one two"}\n')
    reqs = load_dataset(f, _WordTokenizer(), (7, 7), None, 0)
    assert [(r.prompt_text, r.prompt_len, r.max_tokens) for r in reqs] == [("a b c", 3, 5), ("one two", 2, 7)]
    assert len(load_dataset(f, _WordTokenizer(), (7, 7), 1, 0)) == 1
    f.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=":2:"):
        load_dataset(f, _WordTokenizer(), (7, 7), None, 0)


def test_parse_prometheus():
    text = ("# HELP x y\n# TYPE tinyvllm:num_preemptions counter\ntinyvllm:num_preemptions_total 3.0\n"
            'tinyvllm:request_success_total{finished_reason="length"} 2.0\ntinyvllm:kv_cache_usage_perc 0.25\n')
    m = parse_prometheus(text)
    assert m == {"tinyvllm:num_preemptions_total": 3.0, 'tinyvllm:request_success_total{finished_reason="length"}': 2.0,
                 "tinyvllm:kv_cache_usage_perc": 0.25}


# ---- offline runs on the reference model ------------------------------------------------------------
def _args(tmp_path, *extra):
    return ["bench", "--input-len", "6-20", "--output-len", "3-9", "--seed", "5", "--ignore-eos",
            "--no-progress", "--output-json", str(tmp_path / "r.json"), "--output-md", str(tmp_path / "r.md"),
            "--plot", str(tmp_path / "r.png"), *extra]


def test_offline_run_writes_json_md_png(reference_gguf_path, tmp_path, capsys):
    assert main(_args(tmp_path, "--model", str(reference_gguf_path), "--threads", "1", "--num-prompts", "5",
                      "--request-rate", "50")) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    (run,) = report["runs"]
    expected = random_workload(5, (6, 20), (3, 9), vocab_size=49152, seed=5)  # regenerated independently
    assert run["completed"] == 5 and run["failed"] == 0 and len(run["requests"]) == 5
    assert [q["max_tokens"] for q in run["requests"]] == [r.max_tokens for r in expected]
    assert [q["output_tokens"] for q in run["requests"]] == [r.max_tokens for r in expected]  # ignore_eos
    assert [q["prompt_tokens"] for q in run["requests"]] == [r.prompt_len for r in expected]
    assert run["output_tokens"] == sum(r.max_tokens for r in expected)
    assert all(0 < q["ttft_ms"] <= q["e2e_ms"] for q in run["requests"])
    assert run["output_throughput"] == pytest.approx(run["output_tokens"] / run["duration_s"])
    assert 1 <= run["max_running"] <= 5 and run["preemptions"] == 0 and 0 < run["kv_usage_peak"] <= 1
    assert run["peak_rss_mb"] > 50
    md = (tmp_path / "r.md").read_text()
    assert "| output tok/s |" in md and "| TTFT p99 (ms) |" in md and md in capsys.readouterr().out
    assert (tmp_path / "r.png").read_bytes()[:8] == PNG_MAGIC


def test_memory_budget_sweep(reference_gguf_path, tmp_path):
    args = _args(tmp_path, "--model", str(reference_gguf_path), "--threads", "1", "--num-prompts", "4",
                 "--memory-budget", "50MB,200MB,300MB",
                 "--max-concurrency", "4")
    assert main(args) == 0
    small, mid, big = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert "too small" in small["error"] and small["memory_budget"] == "50MB"
    assert mid["completed"] == big["completed"] == 4 and mid["kv_blocks"] < big["kv_blocks"]
    for run in (mid, big):
        assert [q["output_tokens"] for q in run["requests"]] == [q["max_tokens"] for q in run["requests"]]
        assert 1 <= run["max_running"] <= 4
    assert "too small" in (tmp_path / "r.md").read_text()


# ---- --url against a scripted OpenAI-compatible SSE server ---------------------------------------------
class FakeServer:
    """Streams `pieces` with `delay` seconds before each, then (if usage) a usage-only chunk and [DONE].
    Records request bodies, the most requests it had in flight at once, and per request the monotonic
    times it arrived and sent each piece (`sent`: [arrival, piece 1, ...]); status 500 for prompt [666].
    With `hold=(k, n)` a request's first piece waits until k requests are in flight or all n have arrived,
    so a concurrency limit of k is reached whatever the machine's speed. `metrics`: GET /metrics text."""

    def __init__(self, pieces, delay, usage_tokens=None, hold=None, metrics=None):
        self.bodies, self.sent, self.in_flight, self.max_in_flight = [], [], 0, 0
        lock = threading.Condition()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body: bytes, ctype="application/json"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/v1/models":
                    return self._send(200, b'{"object": "list", "data": [{"id": "fake-model"}]}')
                if self.path == "/metrics" and metrics is not None:
                    return self._send(200, metrics.encode(), "text/plain")
                self._send(404, b"{}")

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                times = [time.monotonic()]
                with lock:
                    fake.bodies.append(body)
                    fake.sent.append(times)
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    lock.notify_all()
                    if hold is not None:
                        lock.wait_for(lambda: fake.in_flight >= hold[0] or len(fake.bodies) >= hold[1], 60)

                def leave():  # before the last write: once the client has it, it may send the next request
                    with lock:
                        fake.in_flight -= 1
                if body["prompt"] == [666]:
                    leave()
                    return self._send(500, b'{"error": "boom"}')
                self._send(200, b"", "text/event-stream")
                for p in pieces:
                    time.sleep(delay)
                    chunk = {"choices": [{"index": 0, "text": p, "finish_reason": None}], "usage": None}
                    times.append(time.monotonic())
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                if usage_tokens is not None:
                    chunk = {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": usage_tokens}}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                leave()
                self.wfile.write(b"data: [DONE]\n\n")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _run(fake, workload, conc):
    return asyncio.run(run_url(fake.url + "/v1", workload, [0.0] * len(workload), conc, tokenizer=_WordTokenizer(),
                               ignore_eos=True, progress=Progress(len(workload), enabled=False)))


def test_url_client_timings_and_usage():
    """Timings are checked by causality, not against the machine's speed: a piece cannot be received
    before the server sent it, measured from when the request reached the server (the client started
    its clock earlier), on the same monotonic clock (the fake server runs in this process)."""
    delay = 0.05
    fake = FakeServer(["Hello", " big", " world"], delay, usage_tokens=7, hold=(2, 5))
    try:
        wl = random_workload(5, (4, 12), (7, 7), 1000, seed=1)
        results, duration, info = _run(fake, wl, 2)
    finally:
        fake.close()
    assert fake.max_in_flight == 2 and len(fake.bodies) == 5  # the concurrency limit holds, and is used
    for body, r in zip(sorted(fake.bodies, key=lambda b: b["prompt"]), sorted(wl, key=lambda r: r.prompt_token_ids)):
        assert body["prompt"] == r.prompt_token_ids and body["max_tokens"] == 7 and body["model"] == "fake-model"
        assert body["stream"] and body["stream_options"] == {"include_usage": True} and body["ignore_eos"]
    sent = {tuple(b["prompt"]): t for b, t in zip(fake.bodies, fake.sent)}
    for req, r in zip(wl, results):
        assert r.error is None and r.output_tokens == 7  # from usage, not the 3 chunks or 4 words
        assert len(r.itl) == 2 and all(g >= 0 for g in r.itl)
        arrival, *pieces = sent[tuple(req.prompt_token_ids)]
        received = np.cumsum([r.ttft, *r.itl])  # since the client sent the request
        assert all(got >= put - arrival for got, put in zip(received, pieces)), (received, pieces, arrival)
        assert r.e2e >= r.ttft + sum(r.itl) and r.tpot == pytest.approx((r.e2e - r.ttft) / 6)
    assert duration >= 3 * 3 * delay  # 5 requests of 3 sleeps each, 2 at a time: at least 3 rounds of sleeps
    assert info["server"] == "other" and info["preemptions"] is None


def test_url_client_fails_loudly_on_a_missing_metric():
    """A server whose /metrics says it is tinyvllm but lacks a metric the report reads is an error, not 0."""
    text = ("tinyvllm:num_requests_running 0.0\ntinyvllm:kv_cache_usage_perc 0.0\n"
            "tinyvllm:num_preemptions_total 0.0\n")
    wl = random_workload(2, (3, 3), (2, 2), 1000, seed=0)
    fake = FakeServer(["a", "b"], 0.0, usage_tokens=2, metrics=text)
    try:
        results, _, info = _run(fake, wl, None)  # the full set: fine
    finally:
        fake.close()
    assert info["server"] == "tinyvllm" and info["preemptions"] == 0 and info["max_running"] == 0
    for missing in ("tinyvllm:num_preemptions_total", "tinyvllm:kv_cache_usage_perc"):
        fake = FakeServer(["a", "b"], 0.0, usage_tokens=2,
                          metrics="".join(line + "\n" for line in text.splitlines() if not line.startswith(missing)))
        try:
            with pytest.raises(MetricMissing, match=missing.removesuffix("_total")):
                _run(fake, wl, None)
        finally:
            fake.close()


def test_url_client_counts_text_without_usage_and_records_errors():
    fake = FakeServer(["one two", " three"], 0.01, usage_tokens=None)
    try:
        wl = random_workload(2, (3, 3), (4, 4), 1000, seed=0)
        wl[1].prompt_token_ids = [666]
        results, _, _ = _run(fake, wl, None)
    finally:
        fake.close()
    assert results[0].error is None and results[0].output_tokens == 3  # "one two three" by our tokenizer
    assert results[1].error.startswith("HTTP 500") and results[1].ttft is None


def test_url_unreachable_server_is_an_error_per_request():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    wl = random_workload(2, (3, 3), (4, 4), 1000, seed=0)
    results, _, _ = asyncio.run(run_url(f"http://127.0.0.1:{port}", wl, [0.0, 0.0], None, tokenizer=_WordTokenizer(),
                                        ignore_eos=True, progress=Progress(2, enabled=False)))
    assert all(r.error and "Connect" in r.error for r in results)


def test_bench_command_against_fake_server(reference_gguf_path, tmp_path):
    fake = FakeServer(["a", "b", "c", "d"], 0.01, usage_tokens=4)
    try:
        args = _args(tmp_path, "--model", str(reference_gguf_path), "--url", fake.url, "--num-prompts", "6",
                     "--max-concurrency", "1,3", "--server-pid", str(os.getpid()))
        assert main(args) == 0
    finally:
        fake.close()
    runs = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert [r["max_concurrency"] for r in runs] == [1, 3] and all(r["completed"] == 6 for r in runs)
    first, second = fake.bodies[:6], fake.bodies[6:]
    assert sorted(map(len, (b["prompt"] for b in first))) == sorted(map(len, (b["prompt"] for b in second)))
    assert not {tuple(b["prompt"]) for b in first} & {tuple(b["prompt"]) for b in second}
    assert all(r["output_tokens"] == 24 and r["peak_rss_mb"] > 0 for r in runs)
    assert "n/a" in (tmp_path / "r.md").read_text()  # no KV / preemption numbers from a foreign server
    assert (tmp_path / "r.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(SystemExit):
        main(["bench", "--max-concurrency", "0"])


# ---- --url against a real `tinyvllm serve` ---------------------------------------------------------------
def test_bench_url_against_tinyvllm_serve(reference_gguf_path, tmp_path):
    proc, url = start_server(reference_gguf_path, "--threads", "1")
    try:
        args = _args(tmp_path, "--model", str(reference_gguf_path), "--url", url, "--num-prompts", "4",
                     "--server-pid", str(proc.pid))
        assert main(args) == 0
    finally:
        stop_server(proc)
    (run,) = json.loads((tmp_path / "r.json").read_text())["runs"]
    expected = random_workload(4, (6, 20), (3, 9), vocab_size=49152, seed=5)
    assert run["completed"] == 4 and run["server"] == "tinyvllm"
    assert [q["output_tokens"] for q in run["requests"]] == [r.max_tokens for r in expected]  # usage, ignore_eos
    assert all(0 < q["ttft_ms"] <= q["e2e_ms"] for q in run["requests"])
    assert run["preemptions"] == 0 and run["peak_rss_mb"] > 50 and run["max_running"] <= 4


@pytest.mark.parametrize("bad, message", [(["--input-len", "9-3"], "1 <= low <= high"),
                                          (["--num-prompts", "0"], "at least 1"),
                                          (["--request-rate", "0"], "positive"),
                                          (["--memory-budget", "64MB,12XB"], "12XB"),
                                          (["--dataset", "/no/such.jsonl"], "no such file"),
                                          (["--url", "http://127.0.0.1:9", "--memory-budget", "1GB"], "offline")])
def test_bad_arguments_fail_before_loading(bad, message, capsys):
    assert main(["bench", "--model", "/no/such/model.gguf", *bad]) == 2
    assert message in capsys.readouterr().err


def test_dataset_prompts_sent_as_text(reference_gguf_path, tmp_path):
    from tinyvllm.model import load_model
    from tinyvllm.tokenizer import Tokenizer
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "The capital of France is", "max_tokens": 3}) + "\n" +
                    json.dumps({"prompt": "Hello"}) + "\n")
    fake = FakeServer(["x"], 0.0, usage_tokens=None)
    try:
        assert main(_args(tmp_path, "--model", str(reference_gguf_path), "--url", fake.url, "--dataset", str(data),
                          "--output-len", "4")) == 0
    finally:
        fake.close()
    assert sorted((b["prompt"], b["max_tokens"]) for b in fake.bodies) == [("Hello", 4), ("The capital of France is", 3)]
    tok = Tokenizer.from_gguf_metadata(load_model(reference_gguf_path).metadata)
    (run,) = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert run["input_tokens"] == len(tok.encode("The capital of France is")) + len(tok.encode("Hello"))
    assert run["output_tokens"] == 2  # "x" twice, counted with our tokenizer (no usage chunk)


def test_bench_cli_imports_stay_light():
    code = "import sys, tinyvllm.cli, tinyvllm.bench.cli; sys.exit(bool({'httpx', 'matplotlib'} & set(sys.modules)))"
    assert subprocess.run(python_cmd(code), cwd=ROOT, env=child_env()).returncode == 0
