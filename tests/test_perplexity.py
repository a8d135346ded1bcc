"""`tinyvllm perplexity` against a numpy computation from the float64 reference forward, with llama.cpp's
llama-perplexity rules written out independently here: default, floor(n / ctx) non-overlapping windows
of ctx tokens, the tokens after position ctx/2 scored; --stride S, a window every S tokens, its last S
tokens scored."""
import math

import numpy as np
import pytest

from tinyvllm import LLMEngine
from tinyvllm.cli import main
from tinyvllm.perplexity import perplexity

TEXT = ("The river ran quietly past the old mill, where the miller's daughter sat reading in the afternoon "
        "sun. Every summer the village held a fair on the green, with music, games and long tables of food. "
        "Children raced along the banks, and the older people watched from benches under the chestnut trees. "
        "When the evening came, lanterns were lit along the bridge and the whole village walked home together, "
        "talking about the harvest, the weather and the news from the town beyond the hills.")
CTX = 32


def reference_nll(ref, window, first_scored) -> list[float]:
    logits = ref.prefill_logits(window)
    m = logits.max(axis=1, keepdims=True)
    lsm = logits - (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))
    return [-lsm[p - 1, window[p]] for p in range(first_scored, len(window))]


def reference_perplexity(ref, ids, ctx, stride):
    nll = []
    if stride == 0:
        for i in range(len(ids) // ctx):  # the tokenizer adds no BOS for this model: windows as cut
            nll += reference_nll(ref, ids[i * ctx:(i + 1) * ctx], ctx // 2 + 1)
    else:
        for start in range(0, len(ids) - ctx, stride):
            nll += reference_nll(ref, ids[start:start + ctx], ctx - stride)
    nll = np.array(nll)
    ppl = math.exp(nll.mean())
    return ppl, math.sqrt((np.mean(nll ** 2) - nll.mean() ** 2) / (len(nll) - 1)) * ppl, len(nll)


@pytest.fixture(scope="module")
def engine(reference_gguf_path):
    return LLMEngine(str(reference_gguf_path), threads=2, max_model_len=CTX + 1, max_num_seqs=8,
                     max_num_batched_tokens=CTX)


@pytest.mark.parametrize("stride", [0, 8])
def test_perplexity_matches_reference(engine, reference_model, stride):
    ids = engine.tokenizer.encode(TEXT)
    assert ids[0] != engine.tokenizer.bos_token_id and len(ids) >= 2 * CTX
    want_ppl, want_err, want_n = reference_perplexity(reference_model, ids, CTX, stride)
    got = perplexity(engine, TEXT, CTX, stride)
    print(f"stride {stride}: tinyvllm {got}; float64 reference PPL {want_ppl:.4f} +/- {want_err:.5f} ({want_n})")
    assert got.tokens_scored == want_n == ((len(ids) // CTX) * (CTX - CTX // 2 - 1) if stride == 0 else
                                           (len(ids) - CTX + stride - 1) // stride * stride)
    assert got.ppl == pytest.approx(want_ppl, rel=5e-3)
    assert got.stderr == pytest.approx(want_err, rel=2e-2)
    assert not engine.has_unfinished_requests()


def test_perplexity_cli(engine, reference_gguf_path, reference_model, tmp_path, capsys):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    assert main(["perplexity", "--model", str(reference_gguf_path), "--file", str(path), "--ctx", str(CTX),
                 "--threads", "2"]) == 0
    out = capsys.readouterr()
    assert "windows" in out.err  # the progress bar
    line = next(x for x in out.out.splitlines() if x.startswith("PPL = "))
    ppl, err = float(line.split()[2]), float(line.split()[4])
    want_ppl, want_err, want_n = reference_perplexity(reference_model, engine.tokenizer.encode(TEXT), CTX, 0)
    assert ppl == pytest.approx(want_ppl, rel=5e-3) and err == pytest.approx(want_err, rel=2e-2)
    assert f"tokens scored: {want_n}" in out.out
    # too short a text for the window is a clear error, not a crash
    path.write_text("Too short.")
    assert main(["perplexity", "--model", str(reference_gguf_path), "--file", str(path), "--ctx", str(CTX)]) == 2
    assert "needs at least" in capsys.readouterr().err


def test_perplexity_takes_the_shared_engine_flags():
    """`tinyvllm perplexity` parses every engine flag the other commands take, to the same EngineArgs."""
    from tinyvllm.cli import build_parser
    from tinyvllm.engine_args import EngineArgs
    flags = ["--model", "m.gguf", "--threads", "3", "--memory-budget", "300MB", "--max-num-seqs", "7",
             "--max-num-batched-tokens", "96", "--no-enable-prefix-caching", "--max-model-len", "1024"]
    a = build_parser().parse_args(["perplexity", "--file", "t.txt", "--ctx", "256", "--stride", "64", *flags])
    assert (a.file, a.ctx, a.stride) == ("t.txt", 256, 64)
    assert EngineArgs.from_cli_args(a) == EngineArgs(model="m.gguf", threads=3, memory_budget="300MB", max_num_seqs=7,
                                                     max_num_batched_tokens=96, enable_prefix_caching=False,
                                                     max_model_len=1024)
