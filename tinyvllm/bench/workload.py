"""What a benchmark sends: prompts with exact token counts, output lengths, and when each request arrives."""
import json
import random
from dataclasses import dataclass
from pathlib import Path

# Random prompts draw from ids past the first 256: special tokens and most single bytes sit below.
FIRST_ORDINARY_ID = 256


@dataclass
class BenchRequest:
    prompt_token_ids: list[int] | None  # random workloads: exactly the requested count
    prompt_text: str | None              # dataset workloads: text, counted with our tokenizer
    prompt_len: int
    max_tokens: int


def parse_range(value: str) -> tuple[int, int]:
    """"128" -> (128, 128), "32-256" -> (32, 256)."""
    lo, _, hi = str(value).partition("-")
    try:
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"cannot read {value!r} as a length or a range like 32-256") from None
    if not 1 <= lo <= hi:
        raise ValueError(f"length range {value!r} must satisfy 1 <= low <= high")
    return lo, hi


def random_workload(n: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab_size: int,
                    seed: int, salt: int = 0) -> list[BenchRequest]:
    """n requests with uniform lengths in the ranges; the same seed gives the same workload. `salt` draws
    other token ids for the same lengths (each point of a sweep: no prefix-cache hits from the last one)."""
    if n < 1:
        raise ValueError("--num-prompts must be at least 1")
    if vocab_size <= FIRST_ORDINARY_ID:
        raise ValueError(f"vocabulary of {vocab_size} tokens is too small for random prompts")
    lengths, ids = random.Random(seed), random.Random(f"{seed}/{salt}" if salt else seed + 1)
    reqs = []
    for _ in range(n):
        p, o = lengths.randint(*input_len), lengths.randint(*output_len)
        reqs.append(BenchRequest([ids.randrange(FIRST_ORDINARY_ID, vocab_size) for _ in range(p)], None, p, o))
    return reqs


def load_dataset(path, tokenizer, output_len: tuple[int, int], n: int | None, seed: int) -> list[BenchRequest]:
    """JSONL, one {"prompt": str, "max_tokens": int (optional)} a line; missing max_tokens come from output_len."""
    rng, reqs = random.Random(seed), []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, max_tokens = row["prompt"], int(row.get("max_tokens") or rng.randint(*output_len))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}:{lineno}: need a JSON object with a 'prompt' string ({e})") from None
        if not isinstance(prompt, str) or not prompt or max_tokens < 1:
            raise ValueError(f"{path}:{lineno}: 'prompt' must be a non-empty string and max_tokens >= 1")
        reqs.append(BenchRequest(None, prompt, len(tokenizer.encode(prompt)), max_tokens))
    if not reqs:
        raise ValueError(f"{path}: no requests")
    return reqs[:n] if n else reqs


def arrival_offsets(n: int, request_rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request arrives: all at 0 for rate inf, else a Poisson
    process (exponential gaps with mean 1/rate)."""
    if request_rate <= 0:
        raise ValueError("--request-rate must be positive (or inf)")
    if request_rate == float("inf"):
        return [0.0] * n
    rng, t, out = random.Random(seed + 2), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(request_rate)
    return out
