"""Prometheus metrics of one app (its own registry, so several apps can live in one process).

Engine state (queues, KV blocks, preemptions, prefix cache) is read from the AsyncLLM's stats
snapshot at scrape time; latencies and token counts are observed as requests finish, and the
batch size (sequences per engine step) after every step, so batched execution is visible.

The main series are also exported under vLLM's names (`vllm:num_requests_running`, ...,
`vllm:time_to_first_token_seconds`) with vLLM's `model_name` label, so that routers and dashboards
built for vLLM fleets can score a tinyvllm backend unchanged."""
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..outputs import RequestOutput
from ..async_llm import AsyncLLM

# the engine gauges also exported as vllm:<name>{model_name="..."} (all latency histograms are)
VLLM_GAUGES = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_LATENCY_DOCS = {"time_to_first_token_seconds": "Time to first token.",
                 "time_per_output_token_seconds": "Mean time per output token after the first, per request.",
                 "e2e_request_latency_seconds": "Arrival to finish."}


class _EngineCollector:
    def __init__(self, engine: AsyncLLM, model_name: str):
        self.engine, self.model_name = engine, model_name

    def collect(self):
        s, eng = self.engine.stats, self.engine
        total, free = s["blocks_total"], s["blocks_free"]
        pc = s["prefix_cache"]
        gauges = [("num_requests_running", "Sequences in the running batch.", s["running"]),
                  ("num_requests_waiting", "Requests accepted but not yet running.", eng.num_waiting),
                  ("kv_blocks_used", "KV-cache blocks in use.", total - free),
                  ("kv_blocks_free", "KV-cache blocks free (including evictable prefix-cache blocks).", free),
                  ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", (total - free) / total)]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"tinyvllm:{name}", doc, value=value)
            if name in VLLM_GAUGES:
                g = GaugeMetricFamily(f"vllm:{name}", doc, labels=["model_name"])
                g.add_metric([self.model_name], value)
                yield g
        for name, doc, value in [
                ("num_preemptions", "Sequences preempted (recomputed later) for lack of KV blocks.", s["preemptions"]),
                ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", pc["query_tokens"]),
                ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", pc["hit_tokens"]),
                ("engine_steps", "Engine steps (batched forward passes).", s["steps"]),
                ("beam_search_steps", "Engine steps that ran beam-search beams.", s["beam_search"]["steps"]),
                ("beam_search_rows", "Beam logits rows scored (one per live beam per step).",
                 s["beam_search"]["beam_rows"])]:
            yield CounterMetricFamily(f"tinyvllm:{name}", doc, value=value)
        spec = s.get("spec_decode")
        if spec:  # speculative decoding, under vLLM's names too
            for name, doc, value in [
                    ("spec_decode_num_drafts", "Speculating steps of a sequence (each verifies its drafts).",
                     spec["num_drafts"]),
                    ("spec_decode_num_draft_tokens", "Draft tokens proposed and verified.", spec["num_draft_tokens"]),
                    ("spec_decode_num_accepted_tokens", "Draft tokens accepted.", spec["num_accepted_tokens"])]:
                yield CounterMetricFamily(f"tinyvllm:{name}", doc, value=value)
                c = CounterMetricFamily(f"vllm:{name}", doc, labels=["model_name"])
                c.add_metric([self.model_name], value)
                yield c
            yield GaugeMetricFamily("tinyvllm:spec_decode_acceptance_rate",
                                    "Accepted / proposed draft tokens since start.", value=spec["acceptance_rate"])


class ServerMetrics:
    def __init__(self, engine: AsyncLLM, model_name: str):
        r = self.registry = CollectorRegistry()
        # each latency twice: tinyvllm:<name>, and vLLM's vllm:<name>{model_name=...}
        self.latency = {name: (Histogram(f"tinyvllm:{name}", doc, buckets=_LATENCY, registry=r),
                               Histogram(f"vllm:{name}", doc, ["model_name"], buckets=_LATENCY,
                                         registry=r).labels(model_name))
                        for name, doc in _LATENCY_DOCS.items()}
        self.batch_size = Histogram("tinyvllm:batch_size", "Sequences per engine step.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.prompt_tokens = Counter("tinyvllm:prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("tinyvllm:generation_tokens", "Generated tokens of finished requests.",
                                         registry=r)
        self.finished = Counter("tinyvllm:request_success", "Finished requests by reason.", ["finished_reason"],
                                registry=r)
        r.register(_EngineCollector(engine, model_name))
        engine.step_observers.append(lambda eng: self.batch_size.observe(eng.last_batch_size))

    def on_finished(self, out: RequestOutput) -> None:
        m = out.metrics
        for name, value in (("time_to_first_token_seconds", m.ttft), ("time_per_output_token_seconds", m.tpot),
                            ("e2e_request_latency_seconds", m.e2e)):
            if value is not None:
                for hist in self.latency[name]:
                    hist.observe(value)
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.generation_tokens.inc(sum(len(c.token_ids) for c in out.outputs))
        for c in out.outputs:
            self.finished.labels(c.finish_reason or "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
