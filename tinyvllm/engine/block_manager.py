"""BlockManager: the native paged-KV block manager (tv_block_manager_* in tinyvllm.h).

A pool of `num_blocks` blocks of `block_size` token slots with reference counts; each sequence
(a caller-chosen int id) has a block table (logical block -> physical block id). Prefix caching
shares the leading full blocks of a new prompt with earlier sequences whose KV for the same token
prefix is computed; copy-on-write splits a shared partial block before a sequence writes into it.

Every change is an op (ALLOCATE, ALLOCATE_UNCACHED, APPEND, TRUNCATE, FORK, FREE) and a list of ops runs
in one native call: the scheduler sends one list per step. The manager keeps no token ids: ops lend the caller's
int32 token buffer by address. Running out of blocks is not an error: `apply` reports how many
ops ran. Invalid use (unknown or reused sequence id, decreasing counts...) raises NativeError.
"""
import numpy as np

from .._native import NativeError, check, ffi, lib

__all__ = ["BlockManager", "NativeError", "OP_DTYPE", "ALLOCATE", "ALLOCATE_UNCACHED", "APPEND", "FORK", "FREE",
           "TRUNCATE"]

ALLOCATE, APPEND, FORK, FREE = lib.TV_BLOCK_ALLOCATE, lib.TV_BLOCK_APPEND, lib.TV_BLOCK_FORK, lib.TV_BLOCK_FREE
ALLOCATE_UNCACHED = lib.TV_BLOCK_ALLOCATE_UNCACHED  # as ALLOCATE, sharing nothing from the prefix cache
TRUNCATE = lib.TV_BLOCK_TRUNCATE  # mark, then give back the slots of rejected draft tokens (speculative decoding)
# tv_block_op as a numpy record, so a step's ops are filled column by column, not per FFI struct.
OP_DTYPE = np.dtype([("kind", "<i4"), ("num_tokens", "<i4"), ("num_computed", "<i4"), ("table_row", "<i4"),
                     ("seq_id", "<i8"), ("parent_id", "<i8"), ("tokens", "<u8")])
assert OP_DTYPE.itemsize == ffi.sizeof("tv_block_op") and OP_DTYPE.fields["tokens"][1] == ffi.offsetof("tv_block_op", "tokens")


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        out = ffi.new("tv_block_manager **")
        check(lib.tv_block_manager_create(int(num_blocks), int(block_size), int(bool(enable_prefix_caching)), out))
        self._h = ffi.gc(out[0], lib.tv_block_manager_free)
        self._num_blocks, self._block_size = int(num_blocks), int(block_size)
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self._table = ffi.new("int32_t[]", self._num_blocks)  # a table never holds a block twice
        self._i32 = ffi.new("int32_t[3]")
        self._counts = ffi.new("int32_t[2]")  # n_cow, n_done
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

    # ---- ops -----------------------------------------------------------------------------------
    def apply(self, ops: np.ndarray, tables: np.ndarray | None = None) -> tuple[int, list[tuple[int, int]]]:
        """Run `ops` (an OP_DTYPE array; ALLOCATE ops get their cached-token count written back to
        num_computed) in order. Block tables go to rows of `tables` (int32 [rows, max_blocks]).
        Returns (how many ops ran, copy-on-write pairs [(src, dst)] to apply to the KV cache before
        the new tokens run). Fewer than len(ops) ran when the next one found no free block."""
        assert ops.dtype == OP_DTYPE and ops.flags["C_CONTIGUOUS"]
        n = len(ops)
        cow = np.empty((n, 2), dtype=np.int32)
        t = ffi.NULL if tables is None else ffi.cast("int32_t *", tables.ctypes.data)
        c = self._counts
        check(lib.tv_block_manager_apply(self._h, ffi.cast("tv_block_op *", ops.ctypes.data), n, t,
                                         0 if tables is None else tables.shape[1],
                                         ffi.cast("int32_t *", cow.ctypes.data), n, c, c + 1))
        return c[1], [(int(a), int(b)) for a, b in cow[:c[0]]]

    # ---- inspection ----------------------------------------------------------------------------
    def block_table(self, seq_id: int) -> np.ndarray:
        n = check(lib.tv_block_manager_get_block_table(self._h, seq_id, self._table, self._num_blocks))
        return np.frombuffer(ffi.buffer(self._table, 4 * n), dtype=np.int32).copy()

    def seq_info(self, seq_id: int) -> tuple[int, int, int]:
        """(number of slots, number of blocks, number of computed tokens) of `seq_id`."""
        p = self._i32
        check(lib.tv_block_manager_seq_info(self._h, seq_id, p, p + 1, p + 2))
        return p[0], p[1], p[2]

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
        allocations), cached_blocks, evictable_blocks (now), evictions (cumulative), hit_rate."""
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
