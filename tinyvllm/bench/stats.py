"""Per-request timings in, the summary of a run out (throughputs and latency mean/p50/p99 in ms)."""
import math
from dataclasses import dataclass, field


@dataclass
class RequestResult:
    prompt_len: int
    max_tokens: int
    output_tokens: int = 0
    ttft: float | None = None                      # s, from sending (or arrival in the engine) to the first token
    itl: list[float] = field(default_factory=list)  # s, gaps between streamed chunks / generated tokens
    e2e: float | None = None                       # s, to the last token
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (vLLM's definition)."""
        if self.e2e is None or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def percentile(values, q: float) -> float:
    """Linear interpolation between closest ranks: numpy.percentile's default method."""
    xs = sorted(values)
    if not xs:
        return math.nan
    k = (len(xs) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def latency_ms(values) -> dict:
    xs = [v * 1000.0 for v in values if v is not None]
    mean = sum(xs) / len(xs) if xs else math.nan
    return {"mean": mean, "p50": percentile(xs, 50), "p99": percentile(xs, 99)}


def summarize(results: list[RequestResult], duration: float) -> dict:
    """The numbers of one run; failed requests are counted but left out of throughput and latency."""
    ok = [r for r in results if r.error is None]
    inp, out = sum(r.prompt_len for r in ok), sum(r.output_tokens for r in ok)
    return {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "input_tokens": inp, "output_tokens": out,
        "request_throughput": len(ok) / duration, "output_throughput": out / duration,
        "total_token_throughput": (inp + out) / duration,
        "ttft_ms": latency_ms(r.ttft for r in ok), "tpot_ms": latency_ms(r.tpot for r in ok),
        "itl_ms": latency_ms(x for r in ok for x in r.itl), "e2e_ms": latency_ms(r.e2e for r in ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "requests": [{"prompt_tokens": r.prompt_len, "max_tokens": r.max_tokens, "output_tokens": r.output_tokens,
                      "ttft_ms": None if r.ttft is None else r.ttft * 1000,
                      "e2e_ms": None if r.e2e is None else r.e2e * 1000, "error": r.error} for r in results],
    }
