"""N-gram (prompt lookup) proposer: the tokens that followed the latest earlier occurrence of the
sequence's own suffix. Costs no model: it pays off when the output copies from the input (edits,
quotes, code), and proposes nothing otherwise."""
import numpy as np


class NgramProposer:
    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int):
        self.min_n, self.max_n = prompt_lookup_min, prompt_lookup_max

    def propose(self, seq, k: int) -> np.ndarray:
        return self.lookup(seq.token_ids, k)

    def lookup(self, token_ids: np.ndarray, k: int) -> np.ndarray:
        """Up to k tokens: for the longest suffix (max_n down to min_n tokens) that occurred earlier in
        token_ids, the tokens after its latest earlier occurrence. Empty when no suffix recurs."""
        n_tok = len(token_ids)
        if n_tok < 2 or k < 1:
            return token_ids[:0].copy()
        # earlier positions holding the last token: where a match of any length must end
        ends = np.flatnonzero(token_ids[:n_tok - 1] == token_ids[n_tok - 1])
        for j in range(1, self.max_n):  # ends[i] matches a suffix of length >= j + 1 while these agree
            if len(ends) == 0:
                break
            ok = ends >= j
            ok[ok] = token_ids[ends[ok] - j] == token_ids[n_tok - 1 - j]
            if j + 1 > self.min_n and not ok.any():
                break  # the longest recurring suffix has j tokens: take the latest
            if ok.any() or j + 1 <= self.min_n:
                ends = ends[ok]
        if len(ends) == 0:
            return token_ids[:0].copy()
        start = int(ends[-1]) + 1
        return token_ids[start:start + k].copy()
