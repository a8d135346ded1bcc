"""Start-up (issue 15, target 7): what loading a GGUF imports and how the vocabulary build leaves the
interpreter. Times are benchmarks (benchmarks/bench_engines.py), not tests; these check the mechanisms."""
import gc
import subprocess

import pytest

import tiny_models as tm
from child_process import child_env, python_cmd
from tinyvllm.model import ModelFormatError
from tinyvllm.model.gguf_parse import parse_gguf
from tinyvllm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return tm.make_tiny_gguf(tmp_path_factory.mktemp("startup") / "t.gguf")


def _child(code: str, *args) -> str:
    r = subprocess.run(python_cmd(code, *args), capture_output=True, text=True, env=child_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


# Packages a plain LLM() on a GGUF has no use for: each costs tens of milliseconds to import.
_NOT_AT_LOAD = ("gguf", "llguidance", "fastapi", "uvicorn", "tinygrad", "sentencepiece", "huggingface_hub", "safetensors.torch")


def test_load_does_not_import_gguf(tiny_gguf):
    """LLM() on a GGUF runs without the `gguf` package's ~60 ms import (the loader's own parser and the
    format table in model/weights.py do its work), nor the server's, structured outputs', tinygrad's or
    the downloaders' packages; dequantize() still reaches for gguf when asked."""
    out = _child("import sys\nfrom tinyvllm import LLM\n"
                 "llm = LLM(sys.argv[1], threads=1, max_model_len=64, max_num_seqs=1)\n"
                 f"print('after load', sorted(set({_NOT_AT_LOAD!r}) & sys.modules.keys()))\n"
                 "print('after load', 'gguf' in sys.modules)\n"
                 "next(iter(llm.engine.weights.tensors.values())).dequantize()\n"
                 "print('after dequantize', 'gguf' in sys.modules)\n", tiny_gguf)
    assert "after load []" in out and "after load False" in out and "after dequantize True" in out, out


def test_model_without_template_does_not_import_jinja2(tiny_gguf):
    """jinja2 comes with the first template: a model that ships none never imports it, and a template
    passed later still renders (and a shipped one is still checked at load: test_damaged_chat_templates)."""
    out = _child("import sys\nfrom tinyvllm.model.gguf_parse import parse_gguf\nfrom tinyvllm.tokenizer import Tokenizer\n"
                 "md = parse_gguf(sys.argv[1]).metadata\nmd.pop('tokenizer.chat_template')\n"
                 "tok = Tokenizer.from_gguf_metadata(md)\nprint('after load', 'jinja2' in sys.modules)\n"
                 "text = tok.apply_chat_template([{'role': 'user', 'content': 'hi'}],"
                 " chat_template=\"{{ messages[0]['content'] }}!\")\n"
                 "print('rendered', text, 'jinja2' in sys.modules)\n", tiny_gguf)
    assert "after load False" in out and "rendered hi! True" in out, out


@pytest.mark.parametrize("enabled_before", [True, False])
def test_vocab_build_restores_gc_state(tiny_gguf, enabled_before):
    """The cyclic GC is paused while a vocabulary is built; whatever state it had comes back after a
    build, and after a build that fails (as ModelFormatError, the error it always was)."""
    md = parse_gguf(tiny_gguf).metadata
    bad = dict(md, **{"tokenizer.ggml.merges": ["no-such-piece another-missing-piece"]})
    was = gc.isenabled()
    try:
        gc.enable() if enabled_before else gc.disable()
        assert Tokenizer.from_gguf_metadata(md).encode("hello world")
        assert gc.isenabled() == enabled_before
        with pytest.raises(ModelFormatError, match="inconsistent"):
            Tokenizer.from_gguf_metadata(bad)
        assert gc.isenabled() == enabled_before
    finally:
        gc.enable() if was else gc.disable()
