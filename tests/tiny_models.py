"""Writers of tiny random-weight LLaMA/Qwen2 models for tests (HF directories and GGUF files).

Independent of `tinyvllm`: uses numpy, `tokenizers`, `sentencepiece`, `gguf` and a hand-written
safetensors writer (needed for BF16, which safetensors' numpy API cannot write).

Sizes: hidden 64, ffn 160, 2 layers, 4 heads / 2 kv heads, head_dim 16 (all in-features are
multiples of 32). Weights depend only on (seed, arch, vocab size): an HF dir and a GGUF file written
with the same seed (json tokenizer / GGUF share one trained BPE) hold the same numbers, the GGUF with
llama.cpp's Q/K row permutation.
"""
from __future__ import annotations

import functools
import io
import json
import os
import struct

import numpy as np

from reference_forward import permute_qk  # noqa: F401  (used here and by tiny_arch_models)

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 160, 2, 4, 2, 16
EPS, THETA, MAX_POS = 1e-5, 10000.0, 512
EMBED_STD, FINAL_GAIN, OUT_GAIN = 0.25, 5.0, 3.0   # tuned: diverse greedy paths, few near-ties

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")

BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]   # ids 0, 1 (bos), 2 (eos): SmolLM style


# ----------------------------------------------------------------------------- corpus + tokenizers

def _corpus(n: int = 3000) -> list[str]:
    rng = np.random.default_rng(1234)
    words = ("the a of to and is in it that was for on are with as his they be at one have this from "
             "by hot word but what some we can out other were all there when up use your how said an "
             "each she which do their time if will way about many then them write would like so these "
             "her long make thing see him two has look more day could go come did number sound no most "
             "people my over know water than call first who may down side been now find capital France "
             "Paris city river model token engine cache tiny llama quick brown fox jumps lazy dog").split()
    out = ["The capital of France is Paris.", "Hello, world!", "What is the capital of France?"]
    for _ in range(n):
        k = int(rng.integers(3, 12))
        s = " ".join(words[int(i)] for i in rng.integers(0, len(words), k))
        if rng.random() < 0.3:
            s += f" {int(rng.integers(0, 10000))}"
        s = s[0].upper() + s[1:] + str(rng.choice([".", "!", "?", ",", ";"]))
        out.append(s)
    return out


@functools.lru_cache(maxsize=None)
def trained_bpe_json(vocab_size: int = 360) -> str:
    """Byte-level BPE (SmolLM-like: digits split one by one) trained on the fixed corpus; JSON string."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=BPE_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def bpe_vocab_and_merges(vocab_size: int = 360) -> tuple[list[str], list[str]]:
    """(tokens ordered by id, merges as 'a b' strings) of the trained byte-level BPE."""
    model = json.loads(trained_bpe_json(vocab_size))["model"]
    vocab = model["vocab"]
    tokens = [None] * len(vocab)
    for s, i in vocab.items():
        tokens[i] = s
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


@functools.lru_cache(maxsize=None)
def trained_spm_model(vocab_size: int = 384) -> bytes:
    """SentencePiece BPE with byte fallback (<unk>=0, <s>=1, </s>=2); serialized model bytes."""
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, num_threads=1, minloglevel=2)
    return buf.getvalue()


def _ceil32(n: int) -> int:
    return (n + 31) // 32 * 32


# ----------------------------------------------------------------------------- weights

def tiny_weights(vocab: int, *, seed: int = 0, arch: str = "llama", tie: bool = True) -> dict[str, np.ndarray]:
    """Random float32 weights with HF names, HF (half-split) Q/K layout. Matrices: std 1/sqrt(fan_in)
    (o/down x OUT_GAIN so layers dominate the residual: tied models then do not just repeat the last
    token); embeddings / lm_head std EMBED_STD; norms 1 + 0.1 N(0,1), the final one x FINAL_GAIN."""
    rng = np.random.default_rng(seed)
    mat = lambda o, i: (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)
    norm = lambda: (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
    W = {"model.embed_tokens.weight": (EMBED_STD * rng.standard_normal((vocab, HIDDEN))).astype(np.float32)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        W[p + "input_layernorm.weight"] = norm()
        W[p + "self_attn.q_proj.weight"] = mat(HEADS * HEAD_DIM, HIDDEN)
        W[p + "self_attn.k_proj.weight"] = mat(KV_HEADS * HEAD_DIM, HIDDEN)
        W[p + "self_attn.v_proj.weight"] = mat(KV_HEADS * HEAD_DIM, HIDDEN)
        W[p + "self_attn.o_proj.weight"] = OUT_GAIN * mat(HIDDEN, HEADS * HEAD_DIM)
        if arch == "qwen2":
            for n, d in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
                W[p + f"self_attn.{n}_proj.bias"] = (0.5 * rng.standard_normal(d * HEAD_DIM)).astype(np.float32)
        W[p + "post_attention_layernorm.weight"] = norm()
        W[p + "mlp.gate_proj.weight"] = mat(FFN, HIDDEN)
        W[p + "mlp.up_proj.weight"] = mat(FFN, HIDDEN)
        W[p + "mlp.down_proj.weight"] = OUT_GAIN * mat(HIDDEN, FFN)
    W["model.norm.weight"] = FINAL_GAIN * norm()
    lm_head = (EMBED_STD * rng.standard_normal((vocab, HIDDEN))).astype(np.float32)   # drawn always: same stream
    if not tie:
        W["lm_head.weight"] = lm_head
    return W


# ----------------------------------------------------------------------------- safetensors writer

def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def write_safetensors(path: str, tensors: dict[str, np.ndarray], dtype: str = "float32") -> int:
    """Raw safetensors writer (F32/F16/BF16). Returns the number of tensor-data bytes."""
    code = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtype]
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name, a in tensors.items():
        if dtype == "bfloat16":
            raw = to_bf16_bits(a).tobytes()
        else:
            raw = np.ascontiguousarray(a, dtype=np.dtype(dtype)).tobytes()
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for raw in blobs:
            f.write(raw)
    return off


# ----------------------------------------------------------------------------- HF directory

def make_tiny_hf_dir(path, *, tokenizer: str = "json", dtype: str = "float32", arch: str = "llama",
                     tie: bool = True, rope_scaling: dict | None = None, seed: int = 0,
                     sharded: bool = False) -> str:
    """Write a tiny HF checkpoint dir (config.json, safetensors, tokenizer files); returns the path."""
    path = str(path)
    os.makedirs(path, exist_ok=True)
    if tokenizer == "json":
        tok_json = trained_bpe_json()
        n_tok = len(json.loads(tok_json)["model"]["vocab"])
        with open(os.path.join(path, "tokenizer.json"), "w") as f:
            f.write(tok_json)
        bos, eos = 1, 2
        tok_cfg = {"add_bos_token": False, "add_eos_token": False, "bos_token": "<|im_start|>",
                   "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                   "chat_template": CHATML_TEMPLATE, "model_max_length": MAX_POS,
                   "clean_up_tokenization_spaces": False, "tokenizer_class": "GPT2Tokenizer",
                   "added_tokens_decoder": {str(i): {"content": s, "special": True, "lstrip": False,
                                                     "rstrip": False, "normalized": False, "single_word": False}
                                            for i, s in enumerate(BPE_SPECIALS)}}
    elif tokenizer == "spm":
        import sentencepiece as spm
        model = trained_spm_model()
        n_tok = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
        with open(os.path.join(path, "tokenizer.model"), "wb") as f:
            f.write(model)
        bos, eos = 1, 2
        tok_cfg = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "chat_template": LLAMA2_TEMPLATE, "model_max_length": MAX_POS,
                   "legacy": False, "clean_up_tokenization_spaces": False, "tokenizer_class": "LlamaTokenizer"}
    else:
        raise ValueError(tokenizer)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=1)

    vocab = _ceil32(n_tok)
    cfg = {
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "model_type": arch, "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "hidden_act": "silu", "rms_norm_eps": EPS, "rope_theta": THETA, "rope_scaling": rope_scaling,
        "vocab_size": vocab, "max_position_embeddings": MAX_POS, "tie_word_embeddings": tie,
        "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": dtype, "initializer_range": 0.02,
    }
    if arch == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=LAYERS)
    else:
        cfg.update(attention_bias=False, mlp_bias=False)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": bos, "eos_token_id": eos}, f)

    W = tiny_weights(vocab, seed=seed, arch=arch, tie=tie)
    if not sharded:
        write_safetensors(os.path.join(path, "model.safetensors"), W, dtype)
    else:
        names = list(W)
        cut = next(i for i, n in enumerate(names) if n.startswith("model.layers.1."))
        shards = [dict((n, W[n]) for n in names[:cut]), dict((n, W[n]) for n in names[cut:])]
        weight_map, total = {}, 0
        for k, part in enumerate(shards):
            fn = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            total += write_safetensors(os.path.join(path, fn), part, dtype)
            weight_map.update({n: fn for n in part})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return path


# ----------------------------------------------------------------------------- GGUF file

def add_bpe_tokenizer(w, tokens, types, merges) -> None:
    """The tiny byte-level BPE vocabulary as GGUF tokenizer metadata (SmolLM2's conventions: ChatML)."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)


def synthetic_bpe_vocab(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary of exactly n tokens (BPE_SPECIALS, the 256 byte symbols, then merged
    tokens) and its merges, each joining two tokens into a later one: a stand-in for a big real vocabulary
    (Gemma 3's 262,144 entries) that `tokenizers` accepts."""
    from tokenizers import pre_tokenizers
    rng = np.random.default_rng(seed)
    tokens = BPE_SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet())
    seen, merges = set(tokens), []
    base = len(BPE_SPECIALS)
    while len(tokens) < n:
        for a, b in rng.integers(base, len(tokens), size=(n - len(tokens), 2)).tolist():
            t = tokens[a] + tokens[b]
            if len(t) <= 16 and t not in seen:
                seen.add(t)
                tokens.append(t)
                merges.append(f"{tokens[a]} {tokens[b]}")
    return tokens, merges


def make_tiny_gguf(path, *, qtype: str = "Q8_0", seed: int = 0, tie: bool = True, vocab_size: int | None = None) -> str:
    """Write a tiny llama GGUF (gpt2/smollm-style BPE tokenizer metadata, ChatML template). Same
    weights as make_tiny_hf_dir(tokenizer="json", seed=seed, tie=tie), Q/K permuted for interleaved
    RoPE; 2-D matrices (embedding included) stored as `qtype`, norms as F32. vocab_size: a synthetic
    vocabulary of that many tokens instead (with scores too: every tokenizer array a big model has)."""
    import gguf
    path = str(path)
    tokens, merges = synthetic_bpe_vocab(vocab_size, seed) if vocab_size else bpe_vocab_and_merges()
    vocab = _ceil32(len(tokens))
    types = ([gguf.TokenType.CONTROL] * len(BPE_SPECIALS) + [gguf.TokenType.NORMAL] * (len(tokens) - len(BPE_SPECIALS))
             + [gguf.TokenType.UNUSED] * (vocab - len(tokens)))
    tokens = tokens + [f"[PAD{i}]" for i in range(len(tokens), vocab)]
    qt = gguf.GGMLQuantizationType[qtype]

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-llama-test")
    w.add_block_count(LAYERS)
    w.add_context_length(MAX_POS)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(EPS)
    w.add_vocab_size(vocab)
    w.add_file_type({"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}[qtype])
    add_bpe_tokenizer(w, tokens, types, merges)
    if vocab_size:
        w.add_token_scores([-float(i) for i in range(vocab)])

    W = tiny_weights(vocab, seed=seed, arch="llama", tie=tie)

    def put(name, a):
        if a.ndim == 1:
            w.add_tensor(name, a.astype(np.float32))
        elif qt in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_tensor(name, gguf.quants.quantize(a, qt))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qt), raw_dtype=qt)

    put("token_embd.weight", W["model.embed_tokens.weight"])
    for i in range(LAYERS):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        put(b + "attn_norm.weight", W[p + "input_layernorm.weight"])
        put(b + "attn_q.weight", permute_qk(W[p + "self_attn.q_proj.weight"], HEADS))
        put(b + "attn_k.weight", permute_qk(W[p + "self_attn.k_proj.weight"], KV_HEADS))
        put(b + "attn_v.weight", W[p + "self_attn.v_proj.weight"])
        put(b + "attn_output.weight", W[p + "self_attn.o_proj.weight"])
        put(b + "ffn_norm.weight", W[p + "post_attention_layernorm.weight"])
        put(b + "ffn_gate.weight", W[p + "mlp.gate_proj.weight"])
        put(b + "ffn_up.weight", W[p + "mlp.up_proj.weight"])
        put(b + "ffn_down.weight", W[p + "mlp.down_proj.weight"])
    put("output_norm.weight", W["model.norm.weight"])
    if not tie:
        put("output.weight", W["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ----------------------------------------------------------------------------- vocab-only GGUFs for tokenizer checks
# Trained vocabularies written with the metadata that real Llama 3 / Qwen2.5 / Gemma 3 / SmolLM2 GGUF
# files carry, so that llama.cpp (`Llama(path, vocab_only=True)`) and tinyvllm read the same vocab.

_WORDS_INTL = ("café naïve résumé coöperate Straße Füße ÉCOLE Ünïcödé señor niño garçon "
               "Ελληνικά καλημέρα Русский привет мир Україна "
               "日本語 テキスト ひらがな 東京 中文 数据 你好 世界 测试 한국어 안녕하세요 "
               "مرحبا بالعالم العربية שלום עולם עברית हिन्दी नमस्ते ภาษาไทย Tiếng Việt").split()
_CODE_LINES = ["def f(x):", "    return x ** 2  # square", "for i in range(10):", "if (a != b && c >= 0) {",
               "    printf(\"%d\\n\", i);", "}", "{\"key\": [1, 2, 3], 'b': None}", "<html><body>hi</body></html>",
               "import numpy as np", "x = np.zeros((3, 4), dtype=np.float32)", "SELECT * FROM t WHERE id = 42;",
               "https://example.com/path?q=1&r=2", "snake_case camelCase kebab-case PascalCase",
               "\tindented\twith\ttabs", "$ ls -la /usr/bin | grep py", "a += 1; b -= 2; c *= 3;"]


def _tokenizer_corpus(n: int = 8000, seed: int = 7) -> list[str]:
    """Training text for the check vocabularies: English words, made-up words (many merges), other scripts,
    code, numbers, emoji and whitespace runs."""
    rng = np.random.default_rng(seed)
    base = " ".join(_corpus(400)).split()
    syll = "ka ri to ne mo sa lu pe an in er on st re de ch th qu ou ai".split()
    made = ["".join(syll[int(i)] for i in rng.integers(0, len(syll), int(rng.integers(2, 5)))) for _ in range(1500)]
    words = base + made + _WORDS_INTL * 4 + ["😀", "🎉", "👍🏽", "🤖", "🇫🇷", "—", "…", "€", "£", "½"]
    out = list(_CODE_LINES) * 20
    for _ in range(n):
        k = int(rng.integers(2, 14))
        s = " ".join(words[int(i)] for i in rng.integers(0, len(words), k))
        r = rng.random()
        if r < 0.15:
            s += f" {int(rng.integers(0, 10 ** int(rng.integers(1, 8))))}"
        elif r < 0.25:
            s = "    " + s + ":"
        elif r < 0.3:
            s = s.replace(" ", "  ")
        elif r < 0.35:
            s = s.upper()
        out.append(s + str(rng.choice(["", ".", "!", "?", ",", "\n", "\n\n"])))
    return out


_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BPE_VOCAB_STYLES = {  # GGUF conventions of the models each `tokenizer.ggml.pre` comes from
    "llama-bpe": dict(specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                "<|eot_id|>", "<|python_tag|>"], user=[], bos=0, eos=4, add_bos=True),
    "qwen2": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>"],
                  user=["<tool_call>", "</tool_call>", "<think>"], bos=0, eos=2, add_bos=False),
    "smollm": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], user=[], bos=1, eos=2, add_bos=False),
}


@functools.lru_cache(maxsize=None)
def trained_byte_bpe(pre: str, vocab_size: int = 8000) -> tuple[list[str], list[str]]:
    """(tokens, merges) of a byte-level BPE for `pre`, no special tokens. Trained with digit runs kept
    together (Llama 3's split regex, GPT-2's for smollm), so the vocab has multi-digit tokens that only a
    correct pre-tokenizer keeps apart: real Qwen2 and SmolLM2 vocabs have them too."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [None] * len(model["vocab"])
    for s, i in model["vocab"].items():
        tokens[i] = s
    return tokens, [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]


@functools.lru_cache(maxsize=None)
def trained_spm_bytes(vocab_size: int = 8000, dummy_prefix: bool = False) -> bytes:
    """SentencePiece BPE with byte fallback (<pad>=0 <eos>=1 <bos>=2 <unk>=3, Gemma's order), digits split,
    whitespace-only pieces allowed; serialized model."""
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_tokenizer_corpus()), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", add_dummy_prefix=dummy_prefix,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, normalization_rule_name="identity",
        control_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"], user_defined_symbols=["[multimodal]"],
        num_threads=1, minloglevel=2, max_sentencepiece_length=16)
    return buf.getvalue()


def write_vocab_gguf(path, md: dict) -> str:
    """A vocab-only GGUF (no tensors) with `md`'s tokenizer.ggml.* keys; llama hparams so that llama.cpp's
    vocab_only loader accepts it."""
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(md.get("general.name", "vocab-check"))
    w.add_block_count(1)
    w.add_context_length(4096)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(md["tokenizer.ggml.tokens"]))
    w.add_tokenizer_model(md["tokenizer.ggml.model"])
    w.add_tokenizer_pre(md.get("tokenizer.ggml.pre", "default"))
    w.add_token_list(md["tokenizer.ggml.tokens"])
    w.add_token_types(md["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.scores" in md:
        w.add_token_scores(md["tokenizer.ggml.scores"])
    if "tokenizer.ggml.merges" in md:
        w.add_token_merges(md["tokenizer.ggml.merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unknown", w.add_unk_token_id),
                     ("padding", w.add_pad_token_id)):
        if f"tokenizer.ggml.{key}_token_id" in md:
            add(md[f"tokenizer.ggml.{key}_token_id"])
    for key, add in (("add_bos_token", w.add_add_bos_token), ("add_eos_token", w.add_add_eos_token),
                     ("add_space_prefix", w.add_add_space_prefix)):
        if f"tokenizer.ggml.{key}" in md:
            add(md[f"tokenizer.ggml.{key}"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def bpe_vocab_metadata(pre: str, vocab_size: int = 8000) -> dict:
    """GGUF tokenizer metadata of a trained byte-level BPE in the style of `pre`'s models (Llama 3: specials
    appended after the vocab, add_bos; Qwen2.5: ChatML control tokens and user-defined tool tokens, no bos
    added; SmolLM2: specials first)."""
    tokens, merges = trained_byte_bpe(pre, vocab_size)
    st = BPE_VOCAB_STYLES[pre]
    if pre == "smollm":  # ids 0..2 are the specials, the vocab is shifted after them
        base = len(st["specials"])
        tokens = st["specials"] + tokens
        types = [3] * base + [1] * (len(tokens) - base)
        bos, eos = st["bos"], st["eos"]
    else:
        base = len(tokens)
        tokens = tokens + st["specials"] + st["user"]
        types = [1] * base + [3] * len(st["specials"]) + [4] * len(st["user"])
        bos, eos = base + st["bos"], base + st["eos"]
    assert len(tokens) == len(set(tokens)), "a special token collides with a trained one"
    md = {"general.name": f"trained-{pre}", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
          "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
          "tokenizer.ggml.bos_token_id": bos, "tokenizer.ggml.eos_token_id": eos,
          "tokenizer.ggml.add_bos_token": st["add_bos"]}
    if pre == "qwen2":
        md["tokenizer.ggml.padding_token_id"] = bos
    return md


# Gemma 3's GGUF vocab has runs of newlines, spaces and tabs as user-defined tokens (raw text, not "▁").
GEMMA_WHITESPACE_RUNS = (["\n" * k for k in range(1, 9)] + [" " * k for k in range(2, 9)]
                         + ["\t" * k for k in range(1, 5)])


def spm_vocab_metadata(style: str = "gemma3", vocab_size: int = 8000) -> dict:
    """GGUF tokenizer metadata of a trained sentencepiece BPE, as convert_hf_to_gguf writes it
    (tokenizer.ggml.model = llama). gemma3: no dummy prefix (add_space_prefix false), bos 2 / eos 1 /
    unk 3 / pad 0, control and user-defined tokens with score -1000, whitespace runs as user-defined
    tokens. llama2: the dummy-prefix default (no add_space_prefix key), <unk>/<s>/</s> renamed ids."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_proto=trained_spm_bytes(vocab_size, dummy_prefix=style != "gemma3"))
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    scores = [float(sp.get_score(i)) for i in range(n)]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i)
             else 4 if tokens[i] == "[multimodal]" else 1 for i in range(n)]
    md = {"general.name": f"trained-spm-{style}", "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
          "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.unknown_token_id": 3,
          "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_bos_token": True,
          "tokenizer.ggml.add_eos_token": False}
    if style == "gemma3":
        for t in GEMMA_WHITESPACE_RUNS:  # user-defined, appended (Gemma has them inside its vocab)
            if t not in tokens:
                tokens.append(t)
                scores.append(-1000.0)
                types.append(4)
        scores = [-1000.0 if t in (2, 3, 4) else s for s, t in zip(scores, types)]
        md["tokenizer.ggml.add_space_prefix"] = False
    md.update({"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types})
    return md


_BLOCKS = [(0x20, 0x7E), (0xA0, 0x17F), (0x180, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF),
           (0x590, 0x5FF), (0x600, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F), (0x1100, 0x11FF), (0x2000, 0x206F),
           (0x2100, 0x22FF), (0x2460, 0x24FF), (0x3000, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),
           (0xFF00, 0xFFEF), (0x1D400, 0x1D7FF), (0x1F300, 0x1FAFF), (0x0, 0x1F), (0x80, 0x9F)]
_SPACES = " \t\n\r\x0b\x0c\u0085\u00a0\u1680\u2000\u2003\u2009\u200a\u2028\u2029\u202f\u205f\u3000"


def _unicode_strings(n: int, seed: int) -> list[str]:
    """Random text over many Unicode blocks (letters, marks, digits of several scripts, symbols, emoji, C0/C1
    controls), all kinds of whitespace and any code point: where regex category tables could disagree."""
    import random
    rng = random.Random(seed)

    def char():
        r = rng.random()
        if r < 0.15:
            return rng.choice(_SPACES)
        if r < 0.25:
            c = rng.randrange(0x110000)
            return chr(c) if not 0xD800 <= c < 0xE000 else "?"
        lo, hi = rng.choice(_BLOCKS)
        return chr(rng.randint(lo, hi))
    return ["".join(char() for _ in range(rng.randint(1, 24))) for _ in range(n)]


def tokenizer_check_strings(n_random: int = 120, seed: int = 0, n_unicode: int = 0) -> list[str]:
    """Strings that stress tokenizers: scripts, digits, whitespace runs, code, emoji, CJK, RTL, control
    characters, long repeats, leading/trailing spaces; plus random mixes of those pieces and random text
    over many Unicode blocks."""
    fixed = [
        "", " ", "  ", "   ", "\t", "\n", "\n\n", "\n\n\n", " \n", "\n ", "\r\n", "\r\n\r\n", " \t \n ",
        "Hello world", "Hello, world!", " Hello world", "  Hello world", "Hello world ", "Hello world  ",
        "hello\nworld", "hello\n\nworld", "hello \n world", "a\tb\t\tc", "a  b   c    d", "   leading", "trailing   ",
        "The year 2024 had 366 days; pi ~ 3.14159.", "0", "1", "12", "123", "1234", "12345", "123456789",
        "3.14 1,000,000 1e-5 0x1F 007", "phone: +1 (555) 123-4567", "v1.2.3-rc.4", "1st 2nd 3rd 4th", "٣٤٥ ١٢", "①②③ ½ ¾",
        "don't won't I'm you're they've he'd we'll it's", "DON'T WON'T I'M", "'s 'S 're 'RE", "x'y'z''",
        "ÉCOLE naïve café", "Straße Füße", "naïve résumé coöperate", "e\u0301 a\u0308 o\u0302 (combining marks)",
        "ﬁ ﬂ ﬃ ligatures", "ＡＢＣ full-width １２３", "Ελληνικά και Русский", "Україна привіт",
        "日本語のテキスト", "中文测试，你好！", "東京タワー", "한국어 텍스트입니다", "ภาษาไทย", "Tiếng Việt có dấu",
        "مرحبا بالعالم", "שלום עולם", "العربية 123 English", "עברית (RTL) + LTR", "हिन्दी नमस्ते",
        "emoji 😀🎉👍🏽 done", "🤖", "😀😀😀", "🇫🇷🇩🇪🇯🇵 flags", "👨‍👩‍👧‍👦 family", "❤️ ✨ ☃ ♥", "🎉x🎉", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕄𝕒𝕥𝕙",
        "ok\u200bzero-width", "soft\u00adhyphen", "nb\u00a0sp", "line\u2028sep", "bidi\u202eoverride\u202c", "\ufeffBOM",
        "ctrl\x00nul", "bell\x07 esc\x1b[0m", "\x01\x02\x03", "del\x7f", "\x0b\x0c vertical tab form feed",
        "!\x04!", "..\x13..\x14..", "--\x16\x1d--", "\U000bdc1a\U000f1234",  # bytes SmolLM2's vocab lacks
        "def f(x):\n    return x**2  # square\n", "    indented\n\tline", "if (a) {\n\treturn b;\n}\n",
        "{\"key\": [1, 2, 3], 'b': None}", "<html><body>hi</body></html>", "x=1+2*3", "a->b && c<=d || !e",
        "#include <stdio.h>\nint main(void) { return 0; }", "SELECT * FROM users WHERE id = 42;",
        "https://example.com/path?q=1&r=2#frag", "user@example.com", "C:\\Users\\name\\file.txt",
        "snake_case camelCase kebab-case PascalCase", "MiXeD CaSe WORDS", "!!!???...", "---===+++", "$100.00 + €20 = £?",
        "a" * 64, "ab" * 40, " a" * 30, "0" * 50, "\n" * 20, " " * 33, "\t" * 9, "😀" * 12, "的" * 25, "-" * 80,
        "Hello" * 10, "hello " * 15, "▁", "▁▁hello", "▁ ▁", "<0x0A>", "<0x41><0xFF>", "<unk>", "<s>", "</s>",
        "<|endoftext|>", "<|im_start|>user\nhi<|im_end|>", "<|begin_of_text|>Hi", "<start_of_turn>user\nhi<end_of_turn>",
        "<bos>hello", "[multimodal]", "<tool_call>{}</tool_call>", "<think>\nok\n</think>", "<|eot_id|><|eot_id|>",
        "a<|im_end|>b", " <|im_start|> ", "<|im_start", "im_start|>", "<<|im_end|>>",
    ]
    rng = np.random.default_rng(seed)
    pieces = [s for s in fixed if s] + _WORDS_INTL + _CODE_LINES + [" ", "  ", "\n", "\t", "'s", "'ll", "2024", "😀"]
    rand = ["".join(pieces[int(i)] + str(rng.choice(["", " ", "", "\n"])) for i in
                    rng.integers(0, len(pieces), int(rng.integers(1, 6)))) for _ in range(n_random)]
    return fixed + rand + _unicode_strings(n_unicode, seed + 1)
