"""Offline run: the workload through an LLMEngine in this process, arrivals honoured with add_request."""
import time
from collections import deque

from ..sampling_params import SamplingParams
from .progress import Progress
from .stats import RequestResult
from .workload import BenchRequest


def peak_rss_reset() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes(pid="self") -> int | None:
    """VmHWM of a process: its peak resident memory since start (or the last reset); None without /proc."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        if pid != "self":
            return None
        import resource  # no /proc: the lifetime peak is the best there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_offline(engine, workload: list[BenchRequest], offsets: list[float], max_concurrency: int | None,
                ignore_eos: bool, progress: Progress) -> tuple[list[RequestResult], float, dict]:
    """Requests enter the engine at start + offset (Poisson or all at once), at most max_concurrency in
    flight; the engine steps until all finish. Returns results, wall time and what the engine reported."""
    limit = max_concurrency or len(workload)
    results = [RequestResult(r.prompt_len, r.max_tokens) for r in workload]
    pending, in_flight = deque(sorted(range(len(workload)), key=lambda i: offsets[i])), set()
    preempt0, max_running, kv_peak = engine.stats()["preemptions"], 0, 0.0
    start = slot_freed = time.monotonic()
    while pending or in_flight:
        now = time.monotonic()
        while pending and start + offsets[pending[0]] <= now and len(in_flight) < limit:
            i = pending.popleft()
            r = workload[i]
            prompt = {"prompt_token_ids": r.prompt_token_ids} if r.prompt_token_ids else r.prompt_text
            params = SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=ignore_eos)
            # Held back by the concurrency limit, a request is sent when a slot frees, not when it arrived.
            try:
                engine.add_request(f"bench-{i}", prompt, params, arrival_time=max(start + offsets[i], slot_freed))
                in_flight.add(f"bench-{i}")
            except ValueError as e:  # e.g. a prompt longer than the engine's max_model_len
                results[i].error = str(e)
                progress.update()
        if not in_flight:
            if pending:
                time.sleep(max(0.0, start + offsets[pending[0]] - time.monotonic()))
            continue
        outs = engine.step()
        s = engine.stats()
        max_running = max(max_running, s["running"])
        kv_peak = max(kv_peak, 1 - s["blocks_free"] / s["blocks_total"])
        for out in outs:
            if out.finished:
                m, res = out.metrics, results[int(out.request_id.split("-")[1])]
                res.output_tokens, res.ttft, res.itl, res.e2e = len(out.outputs[0].token_ids), m.ttft, m.itl, m.e2e
                in_flight.discard(out.request_id)
                slot_freed = time.monotonic()
                progress.update()
    duration = time.monotonic() - start
    progress.close()
    return results, duration, {"preemptions": engine.stats()["preemptions"] - preempt0,
                               "max_running": max_running, "kv_usage_peak": kv_peak}
