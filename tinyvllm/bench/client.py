"""--url run: streaming /v1/completions against any OpenAI-compatible server (ours, llama-server, vLLM).

TTFT is taken at the first chunk carrying text, ITL between text chunks, E2E at the end of the stream.
Output tokens come from the final `usage` chunk (stream_options.include_usage) when the server sends
one, else from tokenizing the streamed text with our tokenizer."""
import asyncio
import json
import time

import httpx

from .progress import Progress
from .stats import RequestResult
from .workload import BenchRequest


def parse_prometheus(text: str) -> dict[str, float]:
    """Sample name (labels included) -> value, from Prometheus' text exposition format."""
    out = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name and not line.startswith("#"):
            try:
                out[name.strip()] = float(value)
            except ValueError:
                pass
    return out


class MetricMissing(RuntimeError):
    """Our server's /metrics lacks a metric the benchmark reads: a broken server, not a zero."""


def _metric(m: dict, *names: str) -> float:
    """The first of `names` present in m (prometheus_client may add a _total suffix to counters)."""
    for name in names:
        if name in m:
            return m[name]
    raise MetricMissing(f"the server's /metrics has no {' / '.join(names)}")


async def _tinyvllm_metrics(client: httpx.AsyncClient, base: str) -> dict | None:
    """Our server's engine gauges, or None when the server is not ours (or has no /metrics)."""
    try:
        r = await client.get(f"{base}/metrics")
    except httpx.HTTPError:
        return None
    m = parse_prometheus(r.text) if r.status_code == 200 else {}
    return m if any(k.startswith("tinyvllm:") for k in m) else None


async def _model_name(client: httpx.AsyncClient, base: str, headers: dict) -> str:
    try:
        r = await client.get(f"{base}/v1/models", headers=headers)
        return r.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError):
        return "default"  # llama-server and others ignore the field anyway


async def _one(client, base, headers, body: dict, res: RequestResult, tokenizer) -> None:
    text, usage, last = [], None, None
    t0 = time.monotonic()
    try:
        async with client.stream("POST", f"{base}/v1/completions", json=body, headers=headers) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                usage = chunk.get("usage") or usage
                piece = "".join(c.get("text") or "" for c in chunk.get("choices") or [])
                if piece:
                    now = time.monotonic()
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
                    text.append(piece)
        res.e2e = time.monotonic() - t0
        res.output_tokens = (int(usage["completion_tokens"]) if usage and "completion_tokens" in usage else
                             len(tokenizer.encode("".join(text), add_special_tokens=False)))
        if res.ttft is None:
            res.error = "the stream carried no text"
    except (httpx.HTTPError, ValueError, KeyError) as e:
        res.error = f"{type(e).__name__}: {e}"


async def run_url(url: str, workload: list[BenchRequest], offsets: list[float], max_concurrency: int | None, *,
                  tokenizer, ignore_eos: bool, progress: Progress, model: str | None = None,
                  api_key: str | None = None) -> tuple[list[RequestResult], float, dict]:
    base = url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results = [RequestResult(r.prompt_len, r.max_tokens) for r in workload]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0), limits=limits) as client:
        model = model or await _model_name(client, base, headers)
        before = await _tinyvllm_metrics(client, base)
        peaks = {"kv": 0.0, "running": 0.0}

        def sample(m: dict) -> None:
            peaks["kv"] = max(peaks["kv"], _metric(m, "tinyvllm:kv_cache_usage_perc"))
            peaks["running"] = max(peaks["running"], _metric(m, "tinyvllm:num_requests_running"))

        gate = asyncio.Semaphore(max_concurrency or len(workload))
        start = time.monotonic()

        async def send(i: int) -> None:
            await asyncio.sleep(max(0.0, start + offsets[i] - time.monotonic()))
            r = workload[i]
            body = {"model": model, "prompt": r.prompt_token_ids or r.prompt_text, "max_tokens": r.max_tokens,
                    "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
                    "ignore_eos": ignore_eos}
            async with gate:
                await _one(client, base, headers, body, results[i], tokenizer)
            progress.update()

        async def watch() -> None:  # our server only: sample the engine gauges while the run goes
            while True:
                m = await _tinyvllm_metrics(client, base)
                if m is not None:  # None: a scrape failed (the server is busy); the next one counts
                    sample(m)
                await asyncio.sleep(0.5)

        watcher = asyncio.create_task(watch()) if before is not None else None
        await asyncio.gather(*(send(i) for i in range(len(workload))))
        duration = time.monotonic() - start
        progress.close()
        info = {"preemptions": None, "max_running": None, "kv_usage_peak": None, "server": "other"}
        if watcher is not None:
            if watcher.done():  # it only ends by raising: a metric went missing mid-run
                watcher.result()
            watcher.cancel()
            after = await _tinyvllm_metrics(client, base)
            if after is None:
                raise MetricMissing(f"{base}/metrics stopped answering with tinyvllm metrics")
            for m in (before, after):  # every run reads every metric at least twice, however short it is
                sample(m)
            count = lambda m: _metric(m, "tinyvllm:num_preemptions_total", "tinyvllm:num_preemptions")
            info = {"preemptions": int(count(after) - count(before)), "max_running": int(peaks["running"]),
                    "kv_usage_peak": peaks["kv"], "server": "tinyvllm"}
    return results, duration, info
