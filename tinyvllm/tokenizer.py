"""Tokenizer: one API over a GGUF vocab, an HF tokenizer.json, or a sentencepiece tokenizer.model.

GGUF vocabularies are rebuilt as `tokenizers` pipelines equivalent to the HF ones they came from:
`gpt2` as byte-level BPE with the pre-tokenizer named by `tokenizer.ggml.pre`; `llama` (sentencepiece
BPE) as BPE with merges derived from the piece scores (an adjacent pair whose concatenation is a piece
merges, best score first: sentencepiece's and llama.cpp's rule), byte fallback and "▁" for spaces.
Control and unknown tokens become special added tokens ("<|im_start|>" in text is one id),
user-defined ones plain added tokens. Large sentencepiece vocabularies without a dummy prefix (Gemma 3's
262K) are the exception: the sentencepiece library encodes them over a model proto written from the GGUF
arrays (same ids, ~10x cheaper to load than the `tokenizers` BPE over 513K derived merges; _SPEncoder),
and _SPBackendGGUF decodes them by that pipeline's rule, written out.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import re
import struct
import warnings
from itertools import repeat
from pathlib import Path

import numpy as np

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from .chat_template import TemplateError, check_template, render_chat_template, select_template
from .model.errors import ModelFormatError
from .model.fetch import cache_dir
from .detokenizer import IncrementalDetokenizer  # noqa: F401  (re-exported: streaming goes with the tokenizer)

# llama.cpp token types
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Chat templates end a turn with one of these; vLLM users expect generation to stop there even when
# the model's eos is another token (e.g. Llama 3: eos <|end_of_text|>, turn end <|eot_id|>).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>",
                      "<end_of_turn>", "<|end|>", "</s>")

_GPT2_RE = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_RE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
              r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
_QWEN2_RE = _LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")
_CACHE_MERGES_FROM = 65536  # vocabulary size from which derived sentencepiece merges are cached
_SP_ENCODER_FROM = 65536  # ... and from which sentencepiece encodes those without a dummy prefix (_SPEncoder)
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character map: printable bytes stand for themselves, the others take the
    characters from U+0100 on, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}
    shifted = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(shifted)) for b in range(256)}


def _byte_level(pre: str):
    """(normalizer, pre_tokenizer, ignore_merges) for a byte-level BPE `tokenizer.ggml.pre`,
    mirroring the HF tokenizer.json of each family."""
    def isolated(rx):  # split by the family's regex, then only map bytes to byte-level chars
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(rx), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # the GPT-2 regex built in
    if pre in ("llama-bpe", "llama3", "dbrx", "smaug-bpe"):
        return None, isolated(_LLAMA3_RE), True  # Llama 3 uses whole-word vocab hits before merges
    if pre in ("qwen2", "deepseek-r1-qwen", "stablelm2"):
        return normalizers.NFC(), isolated(_QWEN2_RE), False
    if pre in ("smollm", "starcoder", "refact"):  # digits one by one, then GPT-2
        return None, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2]), False
    if pre not in ("gpt2", "gpt-2", "default", "olmo", "mpt", "jina-es"):
        warnings.warn(f"unknown tokenizer.ggml.pre {pre!r}: using the GPT-2 pre-tokenizer regex")
    return None, gpt2, False


def _gguf_vocab_arrays(md: dict) -> tuple[list[str], list[int]]:
    """tokenizer.ggml.tokens / token_type, checked: a list of strings and a list of ints as long."""
    tokens, types = md.get("tokenizer.ggml.tokens"), md.get("tokenizer.ggml.token_type", [])
    # element types checked as a set of types (one C-level pass: these arrays have up to 262K entries)
    if not isinstance(tokens, list) or not tokens or set(map(type, tokens)) != {str}:
        raise ModelFormatError("GGUF tokenizer.ggml.tokens is missing or not a non-empty array of strings")
    if not isinstance(types, list) or not set(map(type, types)) <= {int}:
        raise ModelFormatError("GGUF tokenizer.ggml.token_type is not an array of integers")
    if types and len(types) != len(tokens):
        raise ModelFormatError(f"GGUF tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    merges = md.get("tokenizer.ggml.merges", [])
    if not isinstance(merges, list) or not set(map(type, merges)) <= {str}:
        raise ModelFormatError("GGUF tokenizer.ggml.merges is not an array of strings")
    scores = md.get("tokenizer.ggml.scores", [])
    if not isinstance(scores, list) or (scores and len(scores) != len(tokens)) or not set(map(type, scores)) <= {
            int, float}:
        raise ModelFormatError("GGUF tokenizer.ggml.scores is not an array of numbers, one per token")
    for k in ("bos", "eos", "eot", "eom", "unknown"):
        i = md.get(f"tokenizer.ggml.{k}_token_id")
        if i is not None and (not isinstance(i, int) or not 0 <= i < len(tokens)):
            raise ModelFormatError(f"GGUF tokenizer.ggml.{k}_token_id {i!r} is not a token id "
                                   f"(the vocabulary has {len(tokens)} tokens)")
    return tokens, types or [_NORMAL] * len(tokens)


def _add_gguf_added_tokens(tok: _HFTokenizer, md: dict, tokens, types):
    # llama.cpp matches control, unknown and user-defined token text in the raw input, before any
    # normalization (so Gemma's user-defined "  " matches two spaces, never "▁▁"), and splits them out
    # before the model sees the rest. Phi-3 GGUFs get right-stripping special tokens by model name in
    # llama.cpp, as Phi-3's tokenizer.json has them.
    phi3 = any(n in str(md.get("general.name", "")).lower() for n in ("phi-3", "phi3"))
    no_rstrip = ("<unk>", "<s>", "<|endoftext|>")

    def added(i, special):
        return AddedToken(tokens[i], special=special, normalized=False, rstrip=phi3 and tokens[i] not in no_rstrip)
    kinds = np.asarray(types)  # one pass in numpy, not two in Python: vocabularies reach 262K entries
    tok.add_special_tokens([added(i, True) for i in np.flatnonzero((kinds == _CONTROL) | (kinds == _UNKNOWN)).tolist()
                            if tokens[i]])
    tok.add_tokens([added(i, False) for i in np.flatnonzero(kinds == _USER_DEFINED).tolist() if tokens[i]])


def _split_merge(m: str) -> tuple[str, str]:
    """Split at the first space after the first character, like llama.cpp: the left part is never empty."""
    k = m.find(" ", 1)
    return m[:k], m[k + 1:]


def _merge_pairs(texts: list[str]) -> list[tuple[str, str]]:
    """_split_merge of every merge text; str.partition does it in C for those that neither start with
    a space nor lack one (all of a real vocabulary's)."""
    return [(a, b) if a and sep else _split_merge(m) for m, (a, sep, b) in zip(texts, map(str.partition, texts, repeat(" ")))]


def _gguf_gpt2(md: dict, tokens: list[str], types: list[int]) -> tuple[_HFTokenizer, bool]:
    """The tokenizer, and whether it has placeholder ids (>= len(tokens)) to drop from its output."""
    vocab = dict(zip(reversed(tokens), range(len(tokens) - 1, -1, -1)))  # a repeated token keeps its first id
    # A vocab can lack some byte symbols (SmolLM2 has none for 0x04, 0x13, 0xF2, ...). llama.cpp drops such
    # a byte after merging, so its neighbours never merge across it; HF's BPE drops it before merging and
    # would merge them. A placeholder id keeps the byte in place while merging; encode() drops it.
    missing = [c for c in pre_tokenizers.ByteLevel.alphabet() if c not in vocab]
    vocab.update({c: len(tokens) + k for k, c in enumerate(sorted(missing))})
    merges = _merge_pairs(md.get("tokenizer.ggml.merges", []))
    normalizer, pre_tokenizer, ignore_merges = _byte_level(str(md.get("tokenizer.ggml.pre", "gpt2")))
    tok = _HFTokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    _add_gguf_added_tokens(tok, md, tokens, types)
    return tok, bool(missing)


def _spm_merge_ids(tokens: list[str], types: list[int], scores: list[float], vocab: dict[str, int]) -> np.ndarray:
    """(2, n) left and right ids of every split of a normal piece into two mergeable pieces (normal or
    user-defined: sentencepiece only merges into those; the first id of a repeated text), highest piece
    score first (ties: piece id, left id, right id). Split k of every piece at once, one length at a time."""
    kinds = np.asarray(types)
    first = np.fromiter(map(vocab.__getitem__, tokens), np.int64, len(tokens)) == np.arange(len(tokens))
    ids = np.flatnonzero(first & ((kinds == _NORMAL) | (kinds == _USER_DEFINED)))
    get = dict(zip(map(tokens.__getitem__, ids.tolist()), ids.tolist())).get
    normal = ids[kinds[ids] == _NORMAL]
    lens = np.fromiter(map(len, map(tokens.__getitem__, normal.tolist())), np.int64, len(normal))
    order = np.argsort(-lens, kind="stable")  # pieces longer than k are a prefix of the list
    normal, lens = normal[order], lens[order]
    pieces = list(map(tokens.__getitem__, normal.tolist()))
    found = [np.zeros((3, 0), np.int64)]
    for k in range(1, int(lens.max(initial=0))):
        n = int(np.count_nonzero(lens > k))
        left = np.fromiter(map(get, [p[:k] for p in pieces[:n]], repeat(-1)), np.int64, n)
        at = np.flatnonzero(left >= 0)
        right = np.fromiter(map(get, [pieces[j][k:] for j in at.tolist()], repeat(-1)), np.int64, len(at))
        at, right = at[right >= 0], right[right >= 0]
        found.append(np.stack([normal[at], left[at], right]))
    piece, left, right = np.concatenate(found, axis=1)
    rank = np.lexsort((right, left, piece, -np.asarray(scores, np.float64)[piece]))
    return np.stack([left[rank], right[rank]]).astype(np.int32)


def _vocab_digest(kind: bytes, tokens: list[str], types: list[int], scores: list[float]) -> str:
    """sha256 of what a cached artefact is derived from: a different vocabulary is a different file."""
    h = hashlib.sha256(kind)
    h.update("\0".join(tokens).encode("utf-8", "surrogatepass"))
    h.update(np.asarray(types, np.int64).tobytes() + np.asarray(scores, np.float64).tobytes())
    return h.hexdigest()


def _store(path: Path, write) -> None:
    """Write a cache file through a temporary name (atomic: a reader never sees half a file); a cache
    that cannot be written is only slower."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)


def _spm_merges(tokens: list[str], types: list[int], scores: list[float], vocab: dict[str, int]):
    """The merges as text pairs. Large vocabularies take seconds to derive: their merge ids are kept in
    the cache dir (tokenizer/<sha256 of the pieces, types and scores>.npy) and read back next time."""
    if len(tokens) < _CACHE_MERGES_FROM:
        merges = _spm_merge_ids(tokens, types, scores, vocab)
    else:
        path = cache_dir() / "tokenizer" / f"{_vocab_digest(b'spm-merges-1', tokens, types, scores)}.npy"
        try:
            merges = np.load(path, allow_pickle=False)
            if merges.ndim != 2 or len(merges) != 2 or merges.dtype != np.int32 or not (
                    merges.size == 0 or 0 <= merges.min() <= merges.max() < len(tokens)):
                raise ValueError("damaged")
        except (OSError, ValueError, EOFError):  # absent or damaged: derive and (try to) store
            merges = _spm_merge_ids(tokens, types, scores, vocab)
            _store(path, lambda f: np.save(f, merges))
    pieces = np.empty(len(tokens), object)  # gather the texts of both halves in numpy, not item by item
    pieces[:] = tokens
    return list(zip(pieces[merges[0]].tolist(), pieces[merges[1]].tolist()))


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _spm_model_proto(tokens: list[str], types: list[int], scores: list[float], unk_id: int) -> bytes:
    """A serialized sentencepiece ModelProto of the vocabulary: BPE with byte fallback, identity
    normalization, spaces escaped as "▁", no dummy prefix. Fields by number (sentencepiece_model.proto):
    pieces=1 {piece=1, score=2, type=3}, trainer_spec=2 {model_type=3, byte_fallback=35, unk_id=40,
    bos_id=41, eos_id=42, pad_id=43}, normalizer_spec=3 {name=1, add_dummy_prefix=3,
    remove_extra_whitespaces=4, escape_whitespaces=5}."""
    out = []
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
        text = piece.encode("utf-8", "surrogateescape")
        kind = _UNKNOWN if i == unk_id else _CONTROL if kind == _UNKNOWN else kind  # exactly one unknown piece
        body = b"\x0a" + _varint(len(text)) + text + b"\x15" + struct.pack("<f", score) + b"\x18" + _varint(kind)
        out.append(b"\x0a" + _varint(len(body)) + body)
    no_id = _varint(2**64 - 1)  # -1: bos / eos / pad are not sentencepiece's business here
    trainer = b"\x18\x02\x98\x02\x01\xc0\x02" + _varint(unk_id) + b"\xc8\x02" + no_id + b"\xd0\x02" + no_id + b"\xd8\x02" + no_id
    normalizer = b"\x0a\x08identity\x18\x00\x20\x00\x28\x01"
    out += [b"\x12" + _varint(len(trainer)) + trainer, b"\x1a" + _varint(len(normalizer)) + normalizer]
    return b"".join(out)


def _load_spm(proto: bytes, tokens: list[str]):
    """The sentencepiece processor of a serialized model if it loads and holds these pieces (every
    4096th checked: a cached file is named by its content's hash), else None."""
    import sentencepiece
    if not proto:
        return None
    try:
        sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    except Exception:  # noqa: BLE001  whatever sentencepiece makes of a damaged file: the caller rebuilds it
        return None
    if sp.get_piece_size() != len(tokens) or any(sp.id_to_piece(i) != tokens[i] for i in range(0, len(tokens), 4096)):
        return None
    return sp


class _SPEncoder:
    """Encodes like the `tokenizers` BPE over derived merges (same ids), through the sentencepiece
    library: its BPE merges adjacent pieces best score first, the rule the merges are derived from, and
    it loads a 262K vocabulary in ~50 ms where building the `tokenizers` BPE from 513K merges takes ~0.6 s.
    Control, unknown and user-defined token texts are split out of the raw text first, leftmost-longest,
    as the `tokenizers` added vocabulary (and llama.cpp) do; sentencepiece sees the text between them."""

    def __init__(self, sp, added: dict[str, int]):
        self.sp, self.added = sp, added
        # a trie walked by hashing: every proper prefix of an added text (Gemma 3: 6,414 texts, 6,321 of them
        # starting with "<"), so a match costs one lookup per character, however many texts share a start
        self._prefixes = {t[:k] for t in added for k in range(1, len(t))}
        firsts = sorted({t[0] for t in added})
        self._starts = re.compile("[" + "".join(map(re.escape, firsts)) + "]") if firsts else None

    @classmethod
    def for_gguf(cls, md: dict, tokens: list[str], types: list[int], scores: list[float], vocab: dict[str, int]):
        """None where the `tokenizers` BPE stays: small vocabularies (it builds in milliseconds), a
        dummy-prefix vocabulary, Phi-3's right-stripping special tokens, or a vocabulary sentencepiece
        refuses (repeated pieces, missing byte pieces, no unknown token)."""
        unk_id, sp = md.get("tokenizer.ggml.unknown_token_id"), None
        kinds = np.asarray(types)
        user_defined = [tokens[i] for i in np.flatnonzero(kinds == _USER_DEFINED).tolist()]
        if (len(tokens) < _SP_ENCODER_FROM or md.get("tokenizer.ggml.add_space_prefix", True)
                or any(n in str(md.get("general.name", "")).lower() for n in ("phi-3", "phi3"))
                or unk_id is None or len(vocab) != len(tokens) or kinds.min() < _NORMAL or kinds.max() > _BYTE
                or any("\u2581" in t for t in user_defined)):  # sentencepiece would match those after escaping spaces
            return None
        try:
            "\0".join(tokens).encode("utf-8")
        except UnicodeEncodeError:  # a piece that is not UTF-8 (surrogate-escaped bytes): `tokenizers` refuses it too
            return None
        path = cache_dir() / "tokenizer" / f"{_vocab_digest(b'spm-proto-1', tokens, types, scores)}.model"
        with contextlib.suppress(OSError):
            sp = _load_spm(path.read_bytes(), tokens)
        if sp is None:  # not cached, or the cached file is damaged: build it (~0.4 s at 262K) and store it
            try:
                proto = _spm_model_proto(tokens, types, scores, unk_id)
            except (OverflowError, struct.error):  # a score no float32 holds
                return None
            sp = _load_spm(proto, tokens)
            if sp is None:
                return None
            _store(path, lambda f: f.write(proto))
        ids = np.flatnonzero((kinds == _CONTROL) | (kinds == _UNKNOWN) | (kinds == _USER_DEFINED)).tolist()
        return cls(sp, {tokens[i]: i for i in ids if tokens[i]})

    def encode(self, text: str) -> list[int]:
        if self._starts is None:
            return self.sp.encode(text)
        parts: list = []  # text between added tokens (str), and the added tokens' ids (int)
        pos = done = 0
        added, prefixes, n = self.added, self._prefixes, len(text)
        while (m := self._starts.search(text, pos)) is not None:
            at = end = m.start()
            hit = 0  # the end of the longest added text starting at `at` (leftmost-longest, as aho-corasick)
            while end < n:
                end += 1
                piece = text[at:end]
                if piece in added:
                    hit = end
                if piece not in prefixes:
                    break
            if not hit:
                pos = at + 1
                continue
            if at > done:
                parts.append(text[done:at])
            parts.append(added[text[at:hit]])
            pos = done = hit
        if done < len(text):
            parts.append(text[done:])
        pieces = iter(self.sp.encode([p for p in parts if isinstance(p, str)], num_threads=1))  # one call
        out: list[int] = []
        for p in parts:
            if isinstance(p, int):
                out.append(p)
            else:
                out += next(pieces)
        return out


class _SPBackendGGUF:
    """A GGUF sentencepiece vocabulary that _SPEncoder encodes. Decoding is the `tokenizers` pipeline's
    rule, written out (building that pipeline only to decode costs ~0.2 s and ~60 MiB at 262K pieces):
    special (control, unknown) ids are skipped when asked, every piece has "▁" turned into a space, runs
    of byte pieces "<0xNN>" become their bytes, or one U+FFFD per byte where they are not UTF-8, and the
    pieces are joined. Ids out of range decode to nothing; negative or >= 2**32 ones raise OverflowError.
    tests/test_tokenizer_build.py compares every method with that pipeline."""

    def __init__(self, encoder: _SPEncoder, tokens: list[str], types: list[int]):
        self.encoder, self.pieces = encoder, tokens
        kinds = np.asarray(types)
        self.special_ids = {i for i in np.flatnonzero((kinds == _CONTROL) | (kinds == _UNKNOWN)).tolist() if tokens[i]}
        self.added_ids = self.special_ids | {i for i in np.flatnonzero(kinds == _USER_DEFINED).tolist() if tokens[i]}
        self.vocab_size = len(tokens)

    def encode(self, text: str) -> list[int]:
        return self.encoder.encode(text)

    @staticmethod
    def _byte(piece: str):
        """The byte a piece "<0xNN>" stands for (as `tokenizers`' ByteFallback reads it: six bytes, two hex
        digits or '+' and one), else None."""
        if len(piece) == 6 and piece.startswith("<0x") and piece[5] == ">" and piece.isascii():
            h = piece[3:5]
            if all(c in "0123456789abcdefABCDEF" for c in h.lstrip("+")) and h.lstrip("+") and h[1] != "+":
                return int(h, 16)
        return None

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        out, run = [], bytearray()
        n, special, pieces = len(self.pieces), self.special_ids, self.pieces
        for i in ids:
            if not 0 <= i < 2**32:
                raise OverflowError(f"token id {i} does not fit in an unsigned 32-bit integer")
            if i >= n or (skip_special_tokens and i in special):
                continue
            piece = pieces[i].replace("\u2581", " ")
            b = self._byte(piece)
            if b is not None:
                run.append(b)
                continue
            if run:
                out.append(self._flush(run))
            out.append(piece)
        if run:
            out.append(self._flush(run))
        return "".join(out)

    @staticmethod
    def _flush(run: bytearray) -> str:
        try:
            text = run.decode("utf-8")
        except UnicodeDecodeError:
            text = "\ufffd" * len(run)
        run.clear()
        return text

    def id_to_token(self, i: int):
        if not 0 <= i < 2**32:
            raise OverflowError(f"token id {i} does not fit in an unsigned 32-bit integer")
        return self.pieces[i] if i < len(self.pieces) else None

    def token_to_id(self, t: str):
        try:
            i = self.encoder.sp.piece_to_id(t)  # the unknown piece's id for text that is no piece
        except (TypeError, UnicodeError, RuntimeError):
            return None
        return i if self.pieces[i] == t else None

    def token_bytes(self) -> list[bytes]:
        """As _HFBackend.token_bytes reads a ByteFallback pipeline: byte pieces are their byte, added
        tokens their own text, other pieces their text with "▁" as a space."""
        out = [bytes([int(p[3:5], 16)]) if p.startswith("<0x") and _BYTE_PIECE.fullmatch(p)
               else p.replace("\u2581", " ").encode() for p in self.pieces]
        for i in self.added_ids:
            out[i] = self.pieces[i].encode()
        return out


def _gguf_spm(md: dict, tokens: list[str], types: list[int]):
    """The backend of a sentencepiece vocabulary: _SPBackendGGUF where sentencepiece encodes it exactly
    (Gemma 3), else the `tokenizers` pipeline over derived merges."""
    scores = md.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]  # numbers: checked
    vocab = dict(zip(reversed(tokens), range(len(tokens) - 1, -1, -1)))  # a repeated piece keeps its first id
    encoder = _SPEncoder.for_gguf(md, tokens, types, scores, vocab)
    if encoder is not None:
        return _SPBackendGGUF(encoder, tokens, types)
    merges = _spm_merges(tokens, types, scores, vocab)
    unk_id = md.get("tokenizer.ggml.unknown_token_id")
    if unk_id is None:
        unk_id = next((i for i, t in enumerate(types) if t == _UNKNOWN), None)
    tok = _HFTokenizer(models.BPE(vocab, merges, byte_fallback=True, fuse_unk=True,
                                  unk_token=tokens[unk_id] if unk_id is not None else None))
    prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
    spaces = normalizers.Replace(" ", "\u2581")
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), spaces]) if prefix else spaces
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    _add_gguf_added_tokens(tok, md, tokens, types)
    return _HFBackend(tok)


@contextlib.contextmanager
def _gc_paused():
    """Python's cyclic GC off while a vocabulary is built: building makes up to a million tuples and
    strings, none in a cycle, and each generation-2 pass would walk all of them again (~10% of a 262K
    build). The previous state comes back however the build ends."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class _HFBackend:
    """A `tokenizers.Tokenizer` (from tokenizer.json or rebuilt from a GGUF vocab)."""

    def __init__(self, tok: _HFTokenizer, placeholders_from: int | None = None):
        self.tok = tok
        self.special_ids = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self._cut = placeholders_from  # ids from here on are placeholders, never output

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ids if self._cut is None else [i for i in ids if i < self._cut]

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int):
        return self.tok.id_to_token(i)

    def token_to_id(self, t: str):
        return self.tok.token_to_id(t)

    def token_bytes(self) -> list[bytes]:
        """The bytes each id stands for in decoded text, read off the pipeline's decoder: byte-level
        pieces map their characters back to bytes; byte-fallback pieces "<0xNN>" are that byte and "▁"
        is a space; added tokens are their own text."""
        decoder = json.loads(self.tok.decoder.__getstate__()) if self.tok.decoder is not None else {}
        kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
        pieces = [""] * self.vocab_size
        for piece, i in self.tok.get_vocab(with_added_tokens=False).items():  # one call, not one per id
            if i < self.vocab_size:
                pieces[i] = piece
        if "ByteLevel" in kinds:
            to_latin1 = str.maketrans({c: chr(b) for b, c in _byte_level_alphabet().items()})
            out = []
            for p in pieces:
                try:
                    out.append(p.translate(to_latin1).encode("latin-1"))
                except UnicodeEncodeError:  # not a byte-level piece
                    out.append(p.encode())
        else:
            fallback = "ByteFallback" in kinds
            out = [bytes([int(p[3:5], 16)]) if fallback and p.startswith("<0x") and _BYTE_PIECE.fullmatch(p)
                   else p.replace("\u2581", " ").encode() for p in pieces]
        for i, t in self.tok.get_added_tokens_decoder().items():
            if i < len(out):
                out[i] = t.content.encode()
        return out


class _SPBackend:
    """The sentencepiece library itself, plus HF-style added tokens split out of the text first."""

    def __init__(self, model_file, added: dict[int, dict]):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        n = self.sp.get_piece_size()
        self.pieces = [self.sp.id_to_piece(i) for i in range(n)]
        self.special_ids = {i for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self.added = {self.pieces[i]: i for i in self.special_ids}  # content -> id, matched in text
        for i, t in sorted(added.items()):
            self.pieces += [""] * (i + 1 - len(self.pieces))
            self.pieces[i] = t["content"]
            self.added[t["content"]] = i
            if t.get("special", True):
                self.special_ids.add(i)
        self.outside = set(self.added.values()) | set(range(n, len(self.pieces)))  # not decoded by sp
        self.vocab_size = len(self.pieces)
        alts = sorted((c for c in self.added if c), key=len, reverse=True)  # longest match first
        self._split = re.compile("(" + "|".join(map(re.escape, alts)) + ")") if alts else None

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return self.sp.encode(text)
        out: list[int] = []
        for k, part in enumerate(self._split.split(text)):
            if k % 2:
                out.append(self.added[part])
            elif part:
                out += self.sp.encode(part)  # each segment gets the dummy prefix, like HF legacy / llama.cpp
        return out

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        out, run = [], []
        for i in ids:
            if i not in self.outside:
                run.append(i)
                continue
            if run:
                out.append(self.sp.decode(run))
                run = []
            if not (skip_special_tokens and i in self.special_ids):
                out.append(self.pieces[i])
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def id_to_token(self, i: int):
        return self.pieces[i] if 0 <= i < len(self.pieces) else None

    def token_bytes(self) -> list[bytes]:
        n = self.sp.get_piece_size()
        return [bytes([int(p[3:5], 16)]) if i < n and self.sp.is_byte(i) else
                (p.replace("\u2581", " ") if i < n and i not in self.outside else p).encode()
                for i, p in enumerate(self.pieces)]

    def token_to_id(self, t: str):
        if t in self.added:
            return self.added[t]
        i = self.sp.piece_to_id(t)  # returns the unk id for unknown pieces
        return i if self.pieces[i] == t else None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(t):
    """tokenizer_config tokens are strings or serialized AddedTokens."""
    return t.get("content") if isinstance(t, dict) else t


class Tokenizer:
    def __init__(self, backend, *, bos_token_id=None, eos_token_id=None, extra_eos_ids=(), prefix_ids=(),
                 suffix_ids=(), chat_templates: dict[str, str] | None = None, vocab_size: int | None = None):
        self._backend = backend
        self._bos, self._eos = bos_token_id, eos_token_id
        self._prefix, self._suffix = list(prefix_ids), list(suffix_ids)  # what add_special_tokens adds
        self._templates = dict(chat_templates or {})
        for name, template in self._templates.items():  # a damaged template fails the load, not the first chat
            try:
                check_template(template)
            except TemplateError as e:
                raise ModelFormatError(f"the model's {name!r} {e}") from None
        self._vocab_size = vocab_size or backend.vocab_size
        self._special = sorted(backend.special_ids | {i for i in (bos_token_id, eos_token_id) if i is not None})
        eot = (backend.token_to_id(t) for t in END_OF_TURN_TOKENS)
        self._eos_ids = frozenset({eos_token_id, *extra_eos_ids, *(i for i in eot if i in backend.special_ids)}
                                  - {None})

    # ---- constructors -----------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, md: dict) -> "Tokenizer":
        """Raises ModelFormatError for a vocabulary that is missing, malformed or inconsistent (the
        `tokenizers` library's own errors, e.g. a merge naming a token not in the vocabulary, included)."""
        kind = str(md.get("tokenizer.ggml.model", ""))
        tokens, types = _gguf_vocab_arrays(md)
        try:
            with _gc_paused():
                if kind == "gpt2":
                    tok, placeholders = _gguf_gpt2(md, tokens, types)
                    backend = _HFBackend(tok, len(tokens) if placeholders else None)
                elif kind == "llama":
                    backend = _gguf_spm(md, tokens, types)
                else:
                    raise ModelFormatError(f"unsupported GGUF tokenizer.ggml.model {kind!r} (supported: gpt2, llama)")
        except ModelFormatError:
            raise
        except Exception as e:  # `tokenizers` raises bare Exception ("Token `x` out of vocabulary", ...)
            raise ModelFormatError(f"GGUF tokenizer metadata is inconsistent: {type(e).__name__}: {e}") from None
        ids = {k: md.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "eot", "eom")}
        default_bos = kind == "llama" or md.get("tokenizer.ggml.pre") in ("llama-bpe", "llama3")
        add_bos = bool(md.get("tokenizer.ggml.add_bos_token", default_bos)) and ids["bos"] is not None
        add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False)) and ids["eos"] is not None
        templates = {k[len("tokenizer.chat_template."):]: v for k, v in md.items()
                     if k.startswith("tokenizer.chat_template.")}
        if md.get("tokenizer.chat_template"):
            templates["default"] = md["tokenizer.chat_template"]
        return cls(backend, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                   extra_eos_ids=[i for i in (ids["eot"], ids["eom"]) if i is not None],
                   prefix_ids=[ids["bos"]] if add_bos else [], suffix_ids=[ids["eos"]] if add_eos else [],
                   chat_templates=templates, vocab_size=len(tokens))

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """An HF model/tokenizer directory: tokenizer.json (preferred) or tokenizer.model, with
        tokenizer_config.json and generation_config.json when present. Malformed files raise
        ModelFormatError (whatever json, `tokenizers` or sentencepiece raised is in its message)."""
        path = Path(path)
        try:
            return cls._from_dir(path)
        except (ModelFormatError, FileNotFoundError):
            raise
        except Exception as e:  # `tokenizers` raises bare Exception; json ValueError/RecursionError; bad types
            raise ModelFormatError(f"{path}: malformed tokenizer files ({type(e).__name__}: {e})") from None

    @classmethod
    def _from_dir(cls, path: Path) -> "Tokenizer":
        cfg = _read_json(path / "tokenizer_config.json")
        added = {int(k): v for k, v in cfg.get("added_tokens_decoder", {}).items()}
        if (path / "tokenizer.json").is_file():
            backend = _HFBackend(_HFTokenizer.from_file(str(path / "tokenizer.json")))
        elif (path / "tokenizer.model").is_file():
            backend = _SPBackend(path / "tokenizer.model", added)
        else:
            raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path}")

        gen_eos = _read_json(path / "generation_config.json").get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        bos, eos = (backend.token_to_id(_token_content(cfg[k])) if cfg.get(k) else None
                    for k in ("bos_token", "eos_token"))
        if isinstance(backend, _SPBackend):  # sentencepiece knows its own bos/eos
            bos = bos if bos is not None else (backend.sp.bos_id() if backend.sp.bos_id() >= 0 else None)
            eos = eos if eos is not None else (backend.sp.eos_id() if backend.sp.eos_id() >= 0 else None)
        if eos is None and gen_eos:
            eos = gen_eos[0]

        if "add_bos_token" in cfg or "add_eos_token" in cfg or isinstance(backend, _SPBackend):
            # Explicit config wins (transformers rebuilds Llama's post-processor from it too);
            # a bare sentencepiece model follows the Llama convention: BOS yes, EOS no.
            prefix = [bos] if cfg.get("add_bos_token", True) and bos is not None else []
            suffix = [eos] if cfg.get("add_eos_token", False) and eos is not None else []
        else:  # whatever the tokenizer.json post-processor adds around a sample text
            plain = backend.tok.encode("a", add_special_tokens=False).ids
            full = backend.tok.encode("a", add_special_tokens=True).ids
            at = next((k for k in range(len(full) - len(plain) + 1) if full[k:k + len(plain)] == plain), None)
            prefix, suffix = (full[:at], full[at + len(plain):]) if at is not None else ([], [])

        raw = cfg.get("chat_template")
        if raw is None and (path / "chat_template.jinja").is_file():
            raw = (path / "chat_template.jinja").read_text(encoding="utf-8")
        if raw is None:
            raw = _read_json(path / "chat_template.json").get("chat_template")
        templates = {t["name"]: t["template"] for t in raw} if isinstance(raw, list) else (
            {"default": raw} if raw else {})
        return cls(backend, bos_token_id=bos, eos_token_id=eos, extra_eos_ids=gen_eos, prefix_ids=prefix,
                   suffix_ids=suffix, chat_templates=templates)

    # ---- encode / decode --------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._backend.encode(text)
        return self._prefix + ids + self._suffix if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def token_bytes(self) -> list[bytes]:
        """What each id in [0, vocab_size) adds to the decoded text, as bytes (special tokens: their
        text): the vocabulary a constrained-decoding library needs."""
        out = self._backend.token_bytes()[:self._vocab_size]
        return out + [b""] * (self._vocab_size - len(out))

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        return [self._backend.id_to_token(int(i)) for i in ids]

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self._backend.token_to_id(tokens)
        return [self._backend.token_to_id(t) for t in tokens]

    def __len__(self) -> int:
        return self._vocab_size

    # ---- special tokens -----------------------------------------------------------------------
    vocab_size = property(lambda self: self._vocab_size)
    bos_token_id = property(lambda self: self._bos)
    eos_token_id = property(lambda self: self._eos)
    eos_token_ids = property(lambda self: set(self._eos_ids), doc="eos plus the end-of-turn tokens")
    all_special_ids = property(lambda self: list(self._special))
    bos_token = property(lambda self: None if self._bos is None else self._backend.id_to_token(self._bos))
    eos_token = property(lambda self: None if self._eos is None else self._backend.id_to_token(self._eos))
    add_bos_token = property(lambda self: bool(self._prefix) and self._prefix[0] == self._bos)

    # ---- chat ---------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        return self._templates.get("default") or next(iter(self._templates.values()), None)

    @property
    def chat_templates(self) -> dict[str, str]:
        return dict(self._templates)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            chat_template: str | None = None, **kwargs) -> str:
        """Render messages to the prompt text. Raises ValueError when the model has no template and
        none is passed (like transformers >= 4.44 and vLLM: a guessed format silently degrades
        output). Extra kwargs (tools, documents, ...) are passed to the template."""
        template = select_template(self._templates, chat_template, kwargs.get("tools"))
        return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token, eos_token=self.eos_token, **kwargs)

    def detokenizer(self, prompt_token_ids=None, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, prompt_token_ids, skip_special_tokens)
