"""Tokenizer tests: the reference GGUF vocab, an independent byte-level BPE, sentencepiece parity,
HF directories, chat templates and incremental detokenization."""
import json
import random
import shutil
from pathlib import Path

import pytest

from tinyvllm.chat_template import TemplateError
from tinyvllm.detokenizer import IncrementalDetokenizer
from tinyvllm.tokenizer import Tokenizer

STRINGS = [
    "Hello world", "Hello, world!", " leading space", "  two leading", "trailing  ", "a\nb\n\nc\r\nd",
    "The year 2024 had 366 days; pi ~ 3.14159.", "12345", "x=1+2*3", "ÉCOLE naïve café", "Straße Füße",
    "日本語のテキスト", "中文测试，你好！", "한국어", "emoji 😀🎉👍🏽 done", "🤖", "Ünïcödé\tTabs\t\tand spaces   ",
    "def f(x):\n    return x**2  # square\n", "{\"key\": [1, 2, 3], 'b': None}", "<html><body>hi</body></html>",
    "    indented\n\tline", "don't won't I'm you're they've", "MiXeD CaSe WORDS", "a" * 40, "!!!???...",
    "$100.00 + €20 = £?", "naïve résumé coöperate", "Ελληνικά και Русский", "  \n  \n", "end.",
    "https://example.com/path?q=1&r=2", "snake_case camelCase kebab-case", "🇫🇷 flag", "ok\u200bzero-width",
]


def _gguf_metadata(path) -> dict:
    """GGUF key/values as plain Python: strings decoded, arrays as lists (what ModelWeights gives)."""
    import gguf
    reader = gguf.GGUFReader(path)

    def value(vtype, part):
        return bytes(part).decode("utf-8") if vtype == gguf.GGUFValueType.STRING else part.tolist()[0]

    md = {}
    for key, f in reader.fields.items():
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
            md[key] = [value(f.types[-1], f.parts[i]) for i in f.data]
        elif f.types:
            md[key] = value(f.types[0], f.parts[f.data[0]])
    return md


@pytest.fixture(scope="module")
def ref_md(reference_gguf_path):
    return _gguf_metadata(str(reference_gguf_path))


@pytest.fixture(scope="module")
def ref_tok(ref_md):
    return Tokenizer.from_gguf_metadata(ref_md)


# ---------------------------------------------------------------------------------------------
# (1) the reference SmolLM2 GGUF tokenizer
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s", STRINGS)
def test_ref_round_trip(ref_tok, s):
    assert ref_tok.decode(ref_tok.encode(s)) == s


def test_ref_digits_split(ref_tok):
    assert len(ref_tok.encode("2024")) == 4
    assert ref_tok.convert_ids_to_tokens(ref_tok.encode("12345")) == list("12345")
    assert ref_tok.convert_ids_to_tokens(ref_tok.encode(" 42")) == ["Ġ", "4", "2"]


def test_ref_special_tokens(ref_tok):
    assert ref_tok.encode("<|im_start|>") == [1]
    assert ref_tok.encode("<|im_end|>") == [2]
    ids = ref_tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == 1
    assert ref_tok.decode(ids) == "user\nhi"
    assert ref_tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"
    assert ref_tok.bos_token_id == 1 and ref_tok.eos_token_id == 2
    assert 2 in ref_tok.eos_token_ids and 1 not in ref_tok.eos_token_ids
    assert {0, 1, 2} <= set(ref_tok.all_special_ids)
    assert ref_tok.vocab_size == 49152 and ref_tok.convert_ids_to_tokens(1) == "<|im_start|>"


def test_ref_no_bos(ref_tok):
    assert not ref_tok.add_bos_token
    assert ref_tok.encode("Hello") == ref_tok.encode("Hello", add_special_tokens=False)


def test_ref_chat_template(ref_tok):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    expected = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert ref_tok.apply_chat_template(msgs, add_generation_prompt=True) == expected
    assert ref_tok.apply_chat_template(msgs, add_generation_prompt=False) == expected[:-len("<|im_start|>assistant\n")]
    sys_msgs = [{"role": "system", "content": "Be brief."}] + msgs
    assert ref_tok.apply_chat_template(sys_msgs).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")
    ids = ref_tok.encode(expected)
    assert ids.count(1) == 3 and ids.count(2) == 2 and ids[-4:] == [1] + ref_tok.encode("assistant\n")


# ---------------------------------------------------------------------------------------------
# (2) an independent byte-level BPE: bytes_to_unicode + lowest-rank merge loop
# ---------------------------------------------------------------------------------------------
def _b2u():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class _PyBPE:
    GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

    def __init__(self, md):
        regex = __import__("regex")
        self.vocab = {t: i for i, t in enumerate(md["tokenizer.ggml.tokens"])}
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(md["tokenizer.ggml.merges"])}
        self.pat, self.digits, self.b2u = regex.compile(self.GPT2), regex.compile(r"(\p{N})"), _b2u()

    def _bpe(self, word):
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == 1 << 30:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return [self.vocab[p] for p in parts]

    def encode(self, text):
        ids = []
        for chunk in self.digits.split(text):  # smollm: every digit is its own pre-token
            for piece in self.pat.findall(chunk):
                ids += self._bpe("".join(self.b2u[b] for b in piece.encode("utf-8")))
        return ids


def _random_strings(n, seed=0):
    rng = random.Random(seed)
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789 .,;:'!?-_()[]{}\n\t\"") + \
        list("éüßñçøåæ中文日本語한국😀🎉👍") + ["'s", "'ll", " the", "  ", "\r\n", "ing", " 2024"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def test_ref_matches_independent_bpe(ref_md, ref_tok):
    py = _PyBPE(ref_md)
    cases = STRINGS + _random_strings(30)
    for s in cases:
        assert ref_tok.encode(s) == py.encode(s), s


# ---------------------------------------------------------------------------------------------
# sentencepiece model trained here (BPE with byte fallback, Llama-style options)
# ---------------------------------------------------------------------------------------------
def _corpus(seed=1):
    rng = random.Random(seed)
    words = ("the of and to in is was for on that with as by at from this be are or have an it not but which "
             "you they we he she their hello world token model edge device python tiny cache kernel café naïve "
             "straße über 東京 中文 数据 def return class import print self None True").split()
    syllables = "ka ri to ne mo sa lu pe an in er on st re de ch".split()  # made-up words: more merges
    words += ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(300)]
    lines = []
    for _ in range(1500):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 15)))
        if rng.random() < 0.3:
            line += f" {rng.randint(0, 99999)}"
        if rng.random() < 0.2:
            line = "    " + line + "()" + ":"
        lines.append(line)
    return lines


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    spm = __import__("sentencepiece")
    prefix = tmp_path_factory.mktemp("spm") / "sp"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_prefix=str(prefix), model_type="bpe", vocab_size=1000,
        byte_fallback=True, minloglevel=2, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, character_coverage=1.0)
    return Path(f"{prefix}.model"), spm.SentencePieceProcessor(model_file=f"{prefix}.model")


def _sp_gguf_metadata(sp) -> dict:
    """A sentencepiece model as convert_hf_to_gguf writes it (tokenizer.ggml.model = llama)."""
    n = sp.get_piece_size()
    ttype = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i)
             else 1 for i in range(n)]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)], "tokenizer.ggml.token_type": ttype,
            "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id(),
            "tokenizer.ggml.unknown_token_id": sp.unk_id(), "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.add_eos_token": False}


@pytest.fixture(scope="module")
def spm_gguf_tok(sp_model):
    return Tokenizer.from_gguf_metadata(_sp_gguf_metadata(sp_model[1]))


SP_EXTRA = ["hello world", "the model", " the model", "  two spaces", "the\nnewline", "tab\tinside", "12345 67",
            "café naïve über", "東京 中文 数据", "emoji 😀 here 🎉", "unseen ß ø Ω λ", "    def f():", "x", " ", ""]


def test_spm_gguf_matches_sentencepiece(sp_model, spm_gguf_tok):
    _, sp = sp_model
    cases = STRINGS + SP_EXTRA + _random_strings(60, seed=3) + _corpus(seed=7)[:60]
    for s in cases:
        ids = spm_gguf_tok.encode(s, add_special_tokens=False)
        assert ids == sp.encode(s), s
        assert spm_gguf_tok.decode(ids) == sp.decode(ids), s
    assert spm_gguf_tok.encode("hello") == [sp.bos_id()] + sp.encode("hello")  # add_bos_token
    assert spm_gguf_tok.eos_token_ids == {sp.eos_id()}
    assert spm_gguf_tok.encode("<s>hello", add_special_tokens=False)[0] == sp.bos_id()


# ---------------------------------------------------------------------------------------------
# (3) HF directories
# ---------------------------------------------------------------------------------------------
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TOOL_TEMPLATE = "TOOLS {{ tools | tojson }}{% for m in messages %} {{ m['content'] }}{% endfor %}"
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
          "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
          "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def hf_json_dir(tmp_path_factory):
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(seed=2), trainer)
    d = tmp_path_factory.mktemp("hfjson")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "add_prefix_space": False,
        "chat_template": [{"name": "default", "template": CHATML}, {"name": "tool_use", "template": TOOL_TEMPLATE}]}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return d


def test_hf_json_dir(hf_json_dir):
    from tokenizers import Tokenizer as HFTok
    ref = HFTok.from_file(str(hf_json_dir / "tokenizer.json"))
    tok = Tokenizer.from_dir(hf_json_dir)
    for s in STRINGS + ["<|im_start|>user\nhi<|im_end|>"]:
        ids = tok.encode(s)
        assert ids == ref.encode(s).ids, s
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == s
    assert tok.encode("<|im_end|>") == [2] and tok.eos_token_id == 2 and tok.bos_token_id is None
    assert tok.eos_token_ids == {0, 2}
    msgs = [{"role": "user", "content": "héllo"}]
    assert tok.apply_chat_template(msgs) == "<|im_start|>user\nhéllo<|im_end|>\n<|im_start|>assistant\n"
    assert tok.chat_template == CHATML
    # HF semantics: tools select the "tool_use" template; tojson keeps non-ASCII text
    assert tok.apply_chat_template(msgs, tools=[{"name": "météo"}]) == 'TOOLS [{"name": "météo"}] héllo'
    assert tok.apply_chat_template(msgs, chat_template="{{ messages | length }}") == "1"


def test_hf_json_post_processor_bos(tmp_path, spm_gguf_tok):
    """A Llama-2-style tokenizer.json whose post-processor adds <s>, with no add_bos_token in the config."""
    from tokenizers import processors
    inner = spm_gguf_tok._backend.tok
    inner.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    try:
        inner.save(str(tmp_path / "tokenizer.json"))
    finally:
        inner.post_processor = None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.encode("hello world") == [1] + spm_gguf_tok.encode("hello world", add_special_tokens=False)
    assert tok.encode("hello", add_special_tokens=False) == spm_gguf_tok.encode("hello", add_special_tokens=False)
    assert tok.bos_token_id == 1 and tok.eos_token_ids == {2}
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory, sp_model):
    path, sp = sp_model
    d = tmp_path_factory.mktemp("spdir")
    shutil.copy(path, d / "tokenizer.model")
    n = sp.get_piece_size()
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": {"content": "<s>", "__type": "AddedToken"},
        "eos_token": "</s>", "chat_template": LLAMA2,
        "added_tokens_decoder": {str(n): {"content": "<|im_end|>", "special": True}}}))
    return d


def test_sp_dir(sp_dir, sp_model):
    _, sp = sp_model
    tok = Tokenizer.from_dir(sp_dir)
    n = sp.get_piece_size()
    for s in STRINGS + SP_EXTRA:
        ids = tok.encode(s)
        assert ids == [1] + sp.encode(s), s
        assert tok.decode(ids) == sp.decode(ids[1:]), s
    assert tok.encode("hi<|im_end|>", add_special_tokens=False) == sp.encode("hi") + [n]
    assert tok.decode(sp.encode("hi") + [n]) == "hi"
    assert tok.decode([1] + sp.encode("hi") + [n], skip_special_tokens=False) == "<s>hi<|im_end|>"
    assert tok.vocab_size == n + 1 and tok.eos_token_ids == {2, n} and n in tok.all_special_ids
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "ok"}]
    assert tok.apply_chat_template(msgs) == "<s>[INST] hi [/INST] yo</s><s>[INST] ok [/INST]"
    with pytest.raises(TemplateError, match="no system role"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])


# ---------------------------------------------------------------------------------------------
# (4) incremental detokenization
# ---------------------------------------------------------------------------------------------
STREAM = ["emoji 😀🎉 and 👍🏽 mixed", "中文测试，你好！日本語", "naïve café 12345\n  indented", "🇫🇷🤖",
          " leading space then words", "Ünïcödé\ttabs", "hello world the model"]


@pytest.fixture(scope="module")
def all_toks(ref_tok, spm_gguf_tok, sp_dir, hf_json_dir):
    return {"gguf-gpt2": ref_tok, "gguf-spm": spm_gguf_tok, "sp-dir": Tokenizer.from_dir(sp_dir),
            "hf-json": Tokenizer.from_dir(hf_json_dir)}


@pytest.mark.parametrize("name", ["gguf-gpt2", "gguf-spm", "sp-dir", "hf-json"])
def test_token_bytes_and_llguidance_vocab(all_toks, name):
    """token_bytes() is what each id adds to the text: a string's ids give back its bytes (after the
    one space a sentencepiece dummy prefix adds). llguidance's tokenizer built from it decodes ids to
    the same bytes, and a grammar that allows only the string accepts exactly those ids."""
    from tinyvllm.sampling_params import StructuredOutputsParams
    from tinyvllm.structured import compile_grammar
    from tinyvllm.structured.tokenizer import ll_tokenizer
    import llguidance
    tok = all_toks[name]
    table = tok.token_bytes()
    assert len(table) == tok.vocab_size
    ll = ll_tokenizer(tok, tok.vocab_size, tok.eos_token_ids)
    for s in STRINGS + STREAM:
        ids = tok.encode(s, add_special_tokens=False)
        got = b"".join(table[i] for i in ids)
        assert got in (s.encode(), b" " + s.encode()), (s, got)
        assert ll.decode_bytes(ids) == got
        text = got.decode()
        matcher = llguidance.LLMatcher(ll, compile_grammar(StructuredOutputsParams(choice=[text])), log_level=0)
        assert matcher.consume_tokens(ids), (s, matcher.get_error())
        assert matcher.is_accepting()
    special = [i for i in tok.all_special_ids if i < tok.vocab_size]
    assert special and all(ll.is_special_token(i) for i in special)


@pytest.mark.parametrize("name", ["gguf-gpt2", "gguf-spm", "sp-dir", "hf-json"])
def test_incremental_detokenizer(all_toks, name):
    tok = all_toks[name]
    for s in STREAM:
        ids = tok.encode(s, add_special_tokens=False)
        detok = IncrementalDetokenizer(tok)
        deltas = [detok.add(i) for i in ids]
        assert all("\ufffd" not in d for d in deltas), (s, deltas)
        assert "".join(deltas) == detok.text == tok.decode(ids) == s
        assert detok.flush() == ""
        # with a prompt: the reply keeps its leading space, and prompt + reply == decode(everything)
        prompt = tok.encode("Say:", add_special_tokens=True)
        ids = tok.encode(" " + s, add_special_tokens=False)
        detok = tok.detokenizer(prompt_token_ids=prompt)
        text = detok.add_many(ids)
        assert "\ufffd" not in text
        assert tok.decode(prompt) + text == tok.decode(prompt + ids)


@pytest.mark.parametrize("name", ["gguf-gpt2", "gguf-spm", "sp-dir", "hf-json"])
def test_incremental_detokenizer_random_ids(all_toks, name):
    """Arbitrary ids (invalid UTF-8, special tokens): after flush, text == decode(ids)."""
    tok = all_toks[name]
    rng = random.Random(5)
    for skip in (True, False):
        for _ in range(20):
            ids = [rng.randrange(min(tok.vocab_size, 600)) for _ in range(rng.randint(1, 25))]
            detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
            for i in ids:
                detok.add(i)
            detok.flush()
            full = tok.decode(ids, skip_special_tokens=skip)
            if name == "gguf-spm" and "\ufffd" in full:
                # tokenizers' ByteFallback (like HF's Llama tokenizer.json) turns a whole run of byte
                # tokens into U+FFFDs when the run is invalid UTF-8, valid bytes included, so a
                # stream that already showed such a byte cannot match it. Valid text always does.
                continue
            assert detok.text == full, ids


def test_detokenizer_holds_partial_utf8(ref_tok):
    ids = ref_tok.encode("😀")
    assert len(ids) > 1  # the emoji spans several byte tokens
    detok = IncrementalDetokenizer(ref_tok)
    assert [detok.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1]) == "😀"
    detok = IncrementalDetokenizer(ref_tok)
    detok.add(ids[0])
    assert detok.text == "" and detok.flush() == ref_tok.decode(ids[:1])  # flush emits what is left


# ---------------------------------------------------------------------------------------------
# pre-tokenizer families and added tokens of byte-level GGUF vocabs (synthetic vocab, no merges)
# ---------------------------------------------------------------------------------------------
PRE_REGEX = {
    "gpt2": _PyBPE.GPT2,
    "llama-bpe": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    "qwen2": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
}


@pytest.mark.parametrize("pre", sorted(PRE_REGEX))
def test_byte_level_pre_tokenizers(pre):
    regex = __import__("regex")
    b2u = _b2u()
    tokens = ["<|endoftext|>", "<tool_call>"] + [b2u[b] for b in range(256)]
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.token_type": [3, 4] + [1] * 256, "tokenizer.ggml.merges": [],
          "tokenizer.ggml.eos_token_id": 0, "tokenizer.ggml.add_bos_token": False}
    tok = Tokenizer.from_gguf_metadata(md)
    pat = regex.compile(PRE_REGEX[pre])
    for s in STRINGS + ["I'M HERE, they'LL go 1234567 times\n\n  x", "a\r\n\r\nb  \n c"]:
        pieces = [p for p, _ in tok._backend.tok.pre_tokenizer.pre_tokenize_str(s)]
        assert pieces == ["".join(b2u[b] for b in p.encode()) for p in pat.findall(s)], s
        assert tok.encode(s) == [2 + b for b in s.encode()] and tok.decode(tok.encode(s)) == s
    # control tokens are special (skipped when decoding), user-defined ones are kept
    assert tok.encode("a<tool_call>b<|endoftext|>") == [2 + ord("a"), 1, 2 + ord("b"), 0]
    assert tok.decode([1, 0]) == "<tool_call>" and tok.all_special_ids == [0] and tok.eos_token_ids == {0}
