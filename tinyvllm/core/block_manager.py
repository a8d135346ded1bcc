"""BlockManager: the native paged-KV block manager (tv_block_manager_* in tinyvllm.h).

A pool of `num_blocks` blocks of `block_size` token slots with reference counts; each sequence
(a caller-chosen int id) has a block table (logical block -> physical block id). Prefix caching
shares the leading full blocks of a new prompt with earlier sequences whose KV for the same token
prefix is computed; copy-on-write splits a shared partial block before a sequence writes into it.

Running out of blocks is not an error: `allocate` and `append_slots` return None and change
nothing (use `can_allocate` / `can_append_slots` first, or preempt and retry). Invalid use
(unknown or reused sequence id, double free, negative counts...) raises NativeError.
"""
import numpy as np

from .._native import NativeError, check, ffi, lib

__all__ = ["BlockManager", "NativeError"]


def _ids(token_ids) -> np.ndarray:
    return np.ascontiguousarray(token_ids, dtype=np.int32).reshape(-1)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        out = ffi.new("tv_block_manager **")
        check(lib.tv_block_manager_create(int(num_blocks), int(block_size), int(bool(enable_prefix_caching)), out))
        self._h = ffi.gc(out[0], lib.tv_block_manager_free)
        self._num_blocks, self._block_size = int(num_blocks), int(block_size)
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self._table = ffi.new("int32_t[]", self._num_blocks)  # a table never holds a block twice
        self._i32 = ffi.new("int32_t[3]")
        self._cow = ffi.new("int32_t[2]")
        self._stats = ffi.new("tv_prefix_cache_stats *")

    # ---- pool ----------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation can take: free ones plus evictable cached ones."""
        return check(lib.tv_block_manager_num_free_blocks(self._h))

    @property
    def num_seqs(self) -> int:
        return check(lib.tv_block_manager_num_seqs(self._h))

    def __contains__(self, seq_id: int) -> bool:
        return bool(check(lib.tv_block_manager_has_seq(self._h, seq_id)))

    # ---- sequences -----------------------------------------------------------------------------
    def can_allocate(self, token_ids) -> bool:
        t = _ids(token_ids)
        return bool(check(lib.tv_block_manager_can_allocate(self._h, ffi.from_buffer("int32_t[]", t), len(t))))

    def allocate(self, seq_id: int, token_ids) -> int | None:
        """Give sequence `seq_id` slots for its prompt. Returns how many leading prompt tokens are
        already in the cache (a multiple of block_size, less than the prompt length; they count as
        computed), or None when the pool cannot hold the prompt now (nothing changed)."""
        t = _ids(token_ids)
        rc = check(lib.tv_block_manager_allocate(self._h, seq_id, ffi.from_buffer("int32_t[]", t), len(t), self._i32))
        return None if rc == lib.TV_NO_FREE_BLOCKS else self._i32[0]

    def can_append_slots(self, seq_id: int, n: int) -> bool:
        return bool(check(lib.tv_block_manager_can_append_slots(self._h, seq_id, n)))

    def append_slots(self, seq_id: int, token_ids) -> list[tuple[int, int]] | None:
        """Slots for more tokens of `seq_id`. Returns the copy-on-write pairs [(src, dst)] whose KV
        must be copied before the new tokens run ([] or one pair), or None when the pool cannot
        hold them now (nothing changed)."""
        t = _ids(token_ids)
        rc = check(lib.tv_block_manager_append_slots(self._h, seq_id, ffi.from_buffer("int32_t[]", t), len(t),
                                                     self._cow, 1, self._i32))
        if rc == lib.TV_NO_FREE_BLOCKS:
            return None
        return [(self._cow[0], self._cow[1])] if self._i32[0] else []

    def mark_computed(self, seq_id: int, num_computed_tokens: int) -> None:
        """The first `num_computed_tokens` tokens of `seq_id` have their KV in the cache; its full
        blocks among them become reusable by later prompts."""
        check(lib.tv_block_manager_mark_computed(self._h, seq_id, num_computed_tokens))

    def fork(self, parent_id: int, child_id: int) -> None:
        check(lib.tv_block_manager_fork(self._h, parent_id, child_id))

    def free(self, seq_id: int) -> None:
        check(lib.tv_block_manager_free_seq(self._h, seq_id))

    def block_table(self, seq_id: int) -> np.ndarray:
        n = check(lib.tv_block_manager_get_block_table(self._h, seq_id, self._table, self._num_blocks))
        return np.frombuffer(ffi.buffer(self._table, 4 * n), dtype=np.int32).copy()

    def seq_info(self, seq_id: int) -> tuple[int, int, int]:
        """(number of tokens, number of blocks, number of computed tokens) of `seq_id`."""
        p = self._i32
        check(lib.tv_block_manager_seq_info(self._h, seq_id, p, p + 1, p + 2))
        return p[0], p[1], p[2]

    def num_tokens(self, seq_id: int) -> int:
        return self.seq_info(seq_id)[0]

    def num_computed_tokens(self, seq_id: int) -> int:
        return self.seq_info(seq_id)[2]

    # ---- inspection ----------------------------------------------------------------------------
    def ref_counts(self) -> np.ndarray:
        out = np.empty(self._num_blocks, dtype=np.int32)
        check(lib.tv_block_manager_block_info(self._h, ffi.from_buffer("int32_t[]", out), ffi.NULL, self._num_blocks))
        return out

    def cached_mask(self) -> np.ndarray:
        """Per block: True when it holds a prefix-cache entry (in use or evictable)."""
        out = np.empty(self._num_blocks, dtype=np.int32)
        check(lib.tv_block_manager_block_info(self._h, ffi.NULL, ffi.from_buffer("int32_t[]", out), self._num_blocks))
        return out.astype(bool)

    @property
    def prefix_cache_stats(self) -> dict:
        """queries, query_tokens, hit_tokens, query_blocks, hit_blocks (cumulative over successful
        allocate calls), cached_blocks, evictable_blocks (now), evictions (cumulative), hit_rate."""
        s = self._stats
        check(lib.tv_block_manager_prefix_cache_stats(self._h, s))
        d = {k: int(getattr(s, k)) for k in ("queries", "query_tokens", "hit_tokens", "query_blocks", "hit_blocks",
                                              "cached_blocks", "evictable_blocks", "evictions")}
        d["hit_rate"] = d["hit_tokens"] / d["query_tokens"] if d["query_tokens"] else 0.0
        return d

    def set_hash_bits(self, bits: int) -> None:
        """Tests only: truncate block hashes to `bits` bits to force collisions (empty cache only)."""
        check(lib.tv_block_manager_set_hash_bits(self._h, bits))

    def check(self) -> None:
        """Tests: recount the whole state natively; NativeError names the broken rule."""
        check(lib.tv_block_manager_check(self._h))
