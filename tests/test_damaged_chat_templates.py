"""Damaged chat templates (issue 16): a template is code from a stranger's model file. One that jinja2
cannot compile fails the load with a ModelFormatError naming the problem; one that compiles but breaks
while rendering is a TemplateError (a ValueError) that the server answers with a 400, not a 500."""
import json

import httpx
import pytest

import tiny_models
from tinyvllm import LLM, LLMEngine
from tinyvllm.chat_template import TemplateError, check_template, render_chat_template
from tinyvllm.model import ModelFormatError
from tinyvllm.server.api import build_app
from tinyvllm.tokenizer import Tokenizer

from test_server import LiveServer

HI = [{"role": "user", "content": "Hi"}]
UNCLOSED_FOR = "{% for m in messages %}{{ m.content }}"
# Compiles; assumes a second message and breaks (UndefinedError) on a one-message conversation.
BREAKS_ON_ONE_MESSAGE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                         "{{ messages[1].content.strip() }}{% if add_generation_prompt %}<|im_start|>assistant\n"
                         "{% endif %}")


def tiny_gguf_with_template(tmp_path, monkeypatch, template) -> str:
    monkeypatch.setattr(tiny_models, "CHATML_TEMPLATE", template)  # what add_bpe_tokenizer writes
    return tiny_models.make_tiny_gguf(tmp_path / "t.gguf")


# ---- at load -------------------------------------------------------------------------------------
@pytest.mark.parametrize("template,problem", [
    (UNCLOSED_FOR, r"line 1: Unexpected end of template.*'endfor'"),
    ("<|im_start|>\n\n{{ messages[0].content ", r"line 3: unexpected end of template"),
    ("{% endif %}", r"line 1: Encountered unknown tag 'endif'"),
    ("{{ a b }}", r"line 1: expected token 'end of print statement'"),
])
def test_uncompilable_gguf_chat_template_is_model_format_error_at_load(tmp_path, monkeypatch, template, problem):
    path = tiny_gguf_with_template(tmp_path, monkeypatch, template)
    with pytest.raises(ModelFormatError, match=r"'default' chat template does not compile: " + problem):
        LLM(path, threads=1, max_model_len=64)


def test_uncompilable_hf_dir_chat_template_is_model_format_error_at_load(tmp_path):
    tiny_models.make_tiny_hf_dir(tmp_path / "m")
    cfg_path = tmp_path / "m" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = [{"name": "default", "template": cfg["chat_template"]},
                            {"name": "tool_use", "template": "{% if tools %}{{ tools | tojson }"}]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match=r"'tool_use' chat template does not compile: line 1: "):
        Tokenizer.from_dir(cfg_path.parent)


def test_non_text_chat_template_is_model_format_error_at_load():
    with pytest.raises(ModelFormatError, match=r"'default' chat template is a int, not text"):
        Tokenizer.from_gguf_metadata(_vocab_metadata(template=42))


def _vocab_metadata(template):
    tokens, merges = tiny_models.bpe_vocab_and_merges()
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1] * len(tokens), "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.chat_template": template}


def test_check_template_accepts_what_renders():  # the load-time check must not refuse working templates
    check_template(tiny_models.CHATML_TEMPLATE)
    check_template(tiny_models.LLAMA2_TEMPLATE)
    check_template(BREAKS_ON_ONE_MESSAGE)


# ---- while rendering ------------------------------------------------------------------------------
@pytest.mark.parametrize("template,problem", [
    (BREAKS_ON_ONE_MESSAGE, r"\(line 3\): UndefinedError: list object has no element 1"),
    ("{% for m in messages %}\n{{ m.content + 1 }}{% endfor %}", r"\(line 2\): TypeError: can only concatenate"),
    ("{{ (messages | length) // 0 }}", r"ZeroDivisionError"),
    ("{{ messages.append(1) }}", r"SecurityError: access to attribute 'append'"),
    ("{{ messages[0].content.__class__.__mro__ }}", r"SecurityError: access to attribute '__class__'"),
])
def test_template_failing_while_rendering_is_template_error(template, problem):
    with pytest.raises(TemplateError, match=r"chat template failed while rendering.*" + problem):
        render_chat_template(template, HI)


def test_uncompilable_template_given_at_render_is_template_error():
    with pytest.raises(TemplateError, match="chat template does not compile: line 1"):
        render_chat_template(UNCLOSED_FOR, HI)


@pytest.fixture(scope="module")
def damaged_server(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    path = tiny_gguf_with_template(tmp_path_factory.mktemp("damaged"), mp, BREAKS_ON_ONE_MESSAGE)
    mp.undo()
    s = LiveServer(build_app(LLMEngine(path, threads=1, max_model_len=128, max_num_seqs=2), "m"))
    yield s
    s.stop()


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": HI, "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": 2, "stream": True}),
    ("/tokenize", {"messages": HI}),
])
def test_template_render_error_is_400_not_500(damaged_server, path, body):
    r = httpx.post(damaged_server.url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert "chat template failed while rendering (line 3): UndefinedError" in err["message"], err
    # ...and the server goes on: a conversation the template can render is answered.
    ok = httpx.post(damaged_server.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "system", "content": "Be brief."}, *HI], "max_tokens": 2})
    assert ok.status_code == 200, ok.text
