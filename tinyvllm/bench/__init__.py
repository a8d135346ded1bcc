"""`tinyvllm bench`: throughput and latency of the engine (offline) or of any OpenAI-compatible server (--url)."""
