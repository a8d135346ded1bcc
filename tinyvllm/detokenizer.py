"""Incremental detokenization for streaming (vLLM's prefix/read offset scheme).

Decoding one token at a time is wrong for two reasons: a character can span several byte tokens
(byte-level BPE, sentencepiece byte fallback), and sentencepiece decoders strip the leading space
of the first token they see. So we decode a short window of already-emitted tokens plus the new
ones and emit only what the new tokens add; text is held back while it ends in U+FFFD (an
unfinished UTF-8 sequence).
"""
from __future__ import annotations

# How many prompt tokens to keep as left context for the first generated tokens (vLLM uses 5).
_PROMPT_CONTEXT = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids=None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # A window, not the sequence's tokens: ids[prefix_offset:read_offset] were already emitted and
        # serve as context, ids[read_offset:] are pending. With a prompt, the context lets the first
        # token keep its leading space.
        self.ids: list[int] = [int(t) for t in (prompt_token_ids if prompt_token_ids is not None else [])[-_PROMPT_CONTEXT:]]
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self._text: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far (without the held-back tail)."""
        return "".join(self._text)

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one generated token and return the new text it completes (maybe "")."""
        self.ids.append(int(token_id))
        return self._emit(final=False)

    def add_many(self, token_ids) -> str:
        return "".join(self.add(t) for t in token_ids)

    def flush(self) -> str:
        """At the end of generation: emit held-back text even if it is an unfinished character
        (as U+FFFD), so that `text` equals decoding the generated tokens."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        delta = new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""
        if not final and (not delta or new_text.endswith(_REPLACEMENT)):
            return ""  # nothing visible yet (special token skipped) or half a character
        del self.ids[:self.read_offset]  # what is left of the window is the new context
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        if delta:
            self._text.append(delta)
        return delta
