"""Prometheus metrics of one app (its own registry, so several apps can live in one process).

Engine state (queues, KV blocks, preemptions, prefix cache) is read from the AsyncLLM's stats
snapshot at scrape time; latencies and token counts are observed as requests finish, and the
batch size (sequences per engine step) after every step, so batched execution is visible."""
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..outputs import RequestOutput
from ..async_llm import AsyncLLM

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _EngineCollector:
    def __init__(self, engine: AsyncLLM):
        self.engine = engine

    def collect(self):
        s, eng = self.engine.stats, self.engine
        total, free = s["blocks_total"], s["blocks_free"]
        pc = s["prefix_cache"]
        for name, doc, value in [
                ("num_requests_running", "Sequences in the running batch.", s["running"]),
                ("num_requests_waiting", "Requests accepted but not yet running.", eng.num_waiting),
                ("kv_blocks_used", "KV-cache blocks in use.", total - free),
                ("kv_blocks_free", "KV-cache blocks free (including evictable prefix-cache blocks).", free),
                ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", (total - free) / total)]:
            yield GaugeMetricFamily(f"tinyvllm:{name}", doc, value=value)
        for name, doc, value in [
                ("num_preemptions", "Sequences preempted (recomputed later) for lack of KV blocks.", s["preemptions"]),
                ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", pc["query_tokens"]),
                ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", pc["hit_tokens"]),
                ("engine_steps", "Engine steps (batched forward passes).", s["steps"])]:
            yield CounterMetricFamily(f"tinyvllm:{name}", doc, value=value)


class ServerMetrics:
    def __init__(self, engine: AsyncLLM):
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("tinyvllm:time_to_first_token_seconds", "Time to first token.", buckets=_LATENCY,
                              registry=r)
        self.tpot = Histogram("tinyvllm:time_per_output_token_seconds", "Mean time per output token after the "
                              "first, per request.", buckets=_LATENCY, registry=r)
        self.e2e = Histogram("tinyvllm:e2e_request_latency_seconds", "Arrival to finish.", buckets=_LATENCY,
                             registry=r)
        self.batch_size = Histogram("tinyvllm:batch_size", "Sequences per engine step.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.prompt_tokens = Counter("tinyvllm:prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("tinyvllm:generation_tokens", "Generated tokens of finished requests.",
                                         registry=r)
        self.finished = Counter("tinyvllm:request_success", "Finished requests by reason.", ["finished_reason"],
                                registry=r)
        r.register(_EngineCollector(engine))
        engine.step_observers.append(lambda eng: self.batch_size.observe(eng.last_batch_size))

    def on_finished(self, out: RequestOutput) -> None:
        m = out.metrics
        for hist, value in ((self.ttft, m.ttft), (self.tpot, m.tpot), (self.e2e, m.e2e)):
            if value is not None:
                hist.observe(value)
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.generation_tokens.inc(sum(len(c.token_ids) for c in out.outputs))
        for c in out.outputs:
            self.finished.labels(c.finish_reason or "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
