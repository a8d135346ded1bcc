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


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py permutation (HF half-split rows -> GGUF interleaved rows)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


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

def make_tiny_gguf(path, *, qtype: str = "Q8_0", seed: int = 0, tie: bool = True) -> str:
    """Write a tiny llama GGUF (gpt2/smollm-style BPE tokenizer metadata, ChatML template). Same
    weights as make_tiny_hf_dir(tokenizer="json", seed=seed, tie=tie), Q/K permuted for interleaved
    RoPE; 2-D matrices (embedding included) stored as `qtype`, norms as F32."""
    import gguf
    path = str(path)
    tokens, merges = bpe_vocab_and_merges()
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
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)

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
