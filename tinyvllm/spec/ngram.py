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
        for n in range(min(self.max_n, n_tok - 1), self.min_n - 1, -1):
            suffix = token_ids[n_tok - n:]
            # windows over all but the suffix itself: a match at i is followed by token_ids[i + n]
            windows = np.lib.stride_tricks.sliding_window_view(token_ids[:n_tok - 1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                return token_ids[start:start + k].copy()
        return token_ids[:0].copy()
