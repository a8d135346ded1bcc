"""Perplexity of a text, scored the way llama.cpp's `llama-perplexity` does, through the engine's prompt
logprobs (every window is one request with prompt_logprobs=0).

Default (stride 0), llama-perplexity's `perplexity()`: the text's tokens (special tokens added as the
tokenizer does) are cut into floor(n / ctx) non-overlapping windows of ctx tokens; when the tokenizer
adds a BOS, each window's first token is replaced by BOS. In each window the first ctx/2 positions
only give context: the tokens at positions ctx/2 + 1 .. ctx - 1 are scored (ctx - ctx/2 - 1 per
window). It needs at least 2 * ctx tokens. ppl = exp(mean nll); the standard error is
sqrt((mean(nll^2) - mean(nll)^2) / (count - 1)) * ppl.

Stride S > 0, llama-perplexity's `--ppl-stride` (`perplexity_v2()`): windows of ctx tokens start every
S tokens ((n - ctx + S - 1) // S of them) and the last S tokens of each are scored; no BOS is put in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .sampling_params import SamplingParams


@dataclass
class PerplexityResult:
    ppl: float
    stderr: float          # standard error of ppl (llama.cpp's "+/-")
    tokens_scored: int
    num_windows: int
    nll: np.ndarray        # per scored token, in window order


def windows(ids: list[int], ctx: int, stride: int = 0, bos: int | None = None) -> list[tuple[list[int], int]]:
    """(window tokens, index of the first scored position) per window, as llama-perplexity cuts them."""
    if ctx < 4:
        raise ValueError(f"ctx must be at least 4, got {ctx}")
    if stride < 0 or stride >= ctx:
        raise ValueError(f"stride must be in [0, ctx), got {stride}")
    if stride == 0:
        if len(ids) < 2 * ctx:
            raise ValueError(f"the text has {len(ids)} tokens: perplexity with ctx {ctx} needs at least {2 * ctx}")
        out = []
        for i in range(len(ids) // ctx):
            w = list(ids[i * ctx:(i + 1) * ctx])
            if bos is not None:
                w[0] = bos
            out.append((w, ctx // 2 + 1))
        return out
    if len(ids) <= ctx:
        raise ValueError(f"the text has {len(ids)} tokens: perplexity with ctx {ctx} needs more than {ctx}")
    n = (len(ids) - ctx + stride - 1) // stride
    return [(list(ids[i * stride:i * stride + ctx]), ctx - stride) for i in range(n)]


def summarize(nll: np.ndarray, num_windows: int) -> PerplexityResult:
    nll = np.asarray(nll, dtype=np.float64)
    mean = float(nll.mean())
    ppl = math.exp(mean)
    var = float((nll * nll).mean()) - mean * mean
    stderr = math.sqrt(var / (len(nll) - 1)) * ppl if var > 0 and len(nll) > 1 else 0.0
    return PerplexityResult(ppl, stderr, len(nll), num_windows, nll)


def perplexity(engine, text: str, ctx: int = 512, stride: int = 0, progress=None) -> PerplexityResult:
    """Score `text` on an LLMEngine (its max_model_len must exceed ctx). progress: an object with
    update(n) called per finished window, or None."""
    tok = engine.tokenizer
    ids = tok.encode(text)
    adds_bos = tok.bos_token_id is not None and tok.encode("")[:1] == [tok.bos_token_id]
    wins = windows(ids, ctx, stride, tok.bos_token_id if adds_bos and stride == 0 else None)
    if ctx >= engine.max_model_len:
        raise ValueError(f"ctx {ctx} needs max_model_len > {ctx}; this engine has {engine.max_model_len}")
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    rids = [engine.add_request(f"ppl-{i}", {"prompt_token_ids": w}, params) for i, (w, _) in enumerate(wins)]
    done = {}
    try:
        while len(done) < len(rids):
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
                    if progress is not None:
                        progress.update(1)
    except BaseException:
        for rid in rids:
            engine.abort(rid)
        raise
    nll = [-done[rid].prompt_logprobs[p][w[p]].logprob
           for rid, (w, first) in zip(rids, wins) for p in range(first, len(w))]
    return summarize(np.array(nll), len(wins))
