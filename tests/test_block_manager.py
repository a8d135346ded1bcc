"""The native block manager (tinyvllm.engine.block_manager) against a pure-Python model of its rules.

The model below is written from the rules, not from the C++: prefix-cache keys are whole token
prefixes (tuples), the evictable list is an OrderedDict, nothing is hashed. A randomized run of
10^6 operations in all (over five pool shapes, two of them with block hashes truncated to a few
bits so that every lookup meets colliding hashes) compares, after every operation, each result,
the free-block count and the touched sequence's table, and every few operations the whole state
(all tables, token and computed counts, reference counts, which blocks are cached, cache stats,
the manager's own recount). A shadow KV cache records which token prefix each block's slots were
computed from, so a wrong prefix hit or a write into a shared block is caught even where the
model and the manager would agree.

PYTEST_DONT_REWRITE: pytest's assertion rewriting would make the 10^6-op run ~4x slower; the
asserts carry their own messages.
"""
import os
import random
import time
from collections import OrderedDict

import numpy as np
import pytest

from tinyvllm._native import NativeError
from tinyvllm.engine import block_manager
from tinyvllm.engine.block_manager import ALLOCATE, APPEND, FORK, FREE, OP_DTYPE, TRUNCATE


def _i32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int32).reshape(-1)


class BlockManager(block_manager.BlockManager):
    """The native manager driven one op at a time, as the reference model is (the scheduler sends a
    step's ops in one list). `token_ids` are always the whole sequence's tokens."""

    def _one(self, kind, seq_id, tokens=None, num_tokens=0, num_computed=0, parent_id=0):
        op = np.zeros(1, OP_DTYPE)
        op[0] = (kind, num_tokens, num_computed, -1, seq_id, parent_id, 0 if tokens is None else tokens.ctypes.data)
        done, cow = self.apply(op)
        return (op[0]["num_computed"], cow) if done else None

    def allocate(self, seq_id: int, token_ids) -> int | None:
        """Slots for a new sequence's prompt. Returns how many leading prompt tokens are already in the
        cache (they count as computed), or None when the pool cannot hold the prompt now."""
        t = _i32(token_ids)
        r = self._one(ALLOCATE, seq_id, t, num_tokens=len(t))
        return None if r is None else int(r[0])

    def append(self, seq_id: int, token_ids, num_computed: int) -> list[tuple[int, int]] | None:
        """Mark the first `num_computed` tokens computed, then slots for all of `token_ids`. Returns the
        copy-on-write pairs ([] or one) or None when the pool cannot hold them now."""
        t = _i32(token_ids)
        r = self._one(APPEND, seq_id, t, num_tokens=len(t), num_computed=num_computed)
        return None if r is None else r[1]

    def truncate(self, seq_id: int, token_ids, num_computed: int) -> None:
        t = _i32(token_ids)
        self._one(TRUNCATE, seq_id, t, num_tokens=len(t), num_computed=num_computed)

    def fork(self, parent_id: int, child_id: int) -> None:
        self._one(FORK, child_id, parent_id=parent_id)

    def free(self, seq_id: int, token_ids=None, num_computed: int | None = None) -> None:
        """Drop the sequence, after marking `num_computed` (default: as marked so far)."""
        t = None if token_ids is None else _i32(token_ids)
        self._one(FREE, seq_id, t, num_computed=self.num_computed_tokens(seq_id) if num_computed is None else num_computed)

    def num_tokens(self, seq_id: int) -> int:
        return self.seq_info(seq_id)[0]

    def num_computed_tokens(self, seq_id: int) -> int:
        return self.seq_info(seq_id)[2]


# ---- the reference model -------------------------------------------------------------------------
class Seq:
    __slots__ = ("tokens", "table", "computed")

    def __init__(self, tokens, table, computed):
        self.tokens, self.table, self.computed = tokens, table, computed


class Model:
    """Rules: blocks come from the free stack (lowest ids first at start), then by evicting the
    least recently freed cached block. A block is cached under the token prefix ending with it once
    that block is full and computed, unless that prefix is cached already. A prompt shares the
    cached blocks of its longest cached prefix of full blocks, leaving its last token uncached.
    Appending into a shared partial last block first copies it. Freeing drops references from
    the last block to the first; an unreferenced block goes to the evictable list if cached, else
    back on the free stack."""

    def __init__(self, num_blocks, block_size, caching):
        self.bs, self.caching = block_size, caching
        self.free = list(range(num_blocks - 1, -1, -1))
        self.lru = OrderedDict()
        self.ref = [0] * num_blocks
        self.cache, self.key = {}, {}   # prefix -> block, block -> prefix
        self.seqs = {}
        self.stats = dict(queries=0, query_tokens=0, hit_tokens=0, query_blocks=0, hit_blocks=0, evictions=0)

    def available(self):
        return len(self.free) + len(self.lru)

    def hits(self, tokens):
        out = []
        if self.caching:
            for j in range((len(tokens) - 1) // self.bs):
                b = self.cache.get(tuple(tokens[:(j + 1) * self.bs]))
                if b is None:
                    break
                out.append(b)
        return out

    def can_allocate(self, tokens):
        h = self.hits(tokens)
        need = -(-len(tokens) // self.bs) - len(h)
        return need <= self.available() - sum(self.ref[b] == 0 for b in h)

    def take(self):
        if self.free:
            b = self.free.pop()
        else:
            b, _ = self.lru.popitem(last=False)
            del self.cache[self.key.pop(b)]
            self.stats["evictions"] += 1
        self.ref[b] = 1
        return b

    def allocate(self, sid, tokens):
        assert sid not in self.seqs
        if not self.can_allocate(tokens):
            return None
        h = self.hits(tokens)
        for b in h:
            self.lru.pop(b, None)
            self.ref[b] += 1
        table = h + [self.take() for _ in range(-(-len(tokens) // self.bs) - len(h))]
        self.seqs[sid] = Seq(list(tokens), table, len(h) * self.bs)
        if self.caching:
            s = self.stats
            s["queries"] += 1
            s["query_tokens"] += len(tokens)
            s["hit_tokens"] += len(h) * self.bs
            s["query_blocks"] += (len(tokens) - 1) // self.bs
            s["hit_blocks"] += len(h)
        return len(h) * self.bs

    def _cow_needed(self, s, n):
        return n > 0 and len(s.tokens) % self.bs != 0 and self.ref[s.table[-1]] > 1

    def can_append(self, sid, n):
        s = self.seqs[sid]
        return -(-(len(s.tokens) + n) // self.bs) - len(s.table) + self._cow_needed(s, n) <= self.available()

    def append(self, sid, tokens):
        s = self.seqs[sid]
        if not self.can_append(sid, len(tokens)):
            return None
        pairs = []
        if self._cow_needed(s, len(tokens)):
            src, dst = s.table[-1], self.take()
            self.ref[src] -= 1
            s.table[-1] = dst
            pairs = [(src, dst)]
        s.table += [self.take() for _ in range(-(-(len(s.tokens) + len(tokens)) // self.bs) - len(s.table))]
        s.tokens += tokens
        return pairs

    def mark_computed(self, sid, c):
        s = self.seqs[sid]
        assert s.computed <= c <= len(s.tokens)
        if self.caching:
            for j in range(s.computed // self.bs, c // self.bs):
                key, b = tuple(s.tokens[:(j + 1) * self.bs]), s.table[j]
                if key not in self.cache and b not in self.key:
                    self.cache[key], self.key[b] = b, key
        s.computed = c

    def truncate(self, sid, n):
        s = self.seqs[sid]
        assert s.computed <= n <= len(s.tokens)
        keep = -(-n // self.bs)
        for b in reversed(s.table[keep:]):
            self._release(b)
        s.table, s.tokens = s.table[:keep], s.tokens[:n]

    def fork(self, parent, child):
        p = self.seqs[parent]
        self.seqs[child] = Seq(list(p.tokens), list(p.table), p.computed)
        for b in p.table:
            self.ref[b] += 1

    def free_seq(self, sid):
        for b in reversed(self.seqs.pop(sid).table):
            self._release(b)

    def _release(self, b):
        self.ref[b] -= 1
        if self.ref[b] == 0:
            if b in self.key:
                self.lru[b] = None
            else:
                self.free.append(b)


# ---- unit checks of the wrapper ----------------------------------------------------------------
def test_wrapper_basics():
    bm = BlockManager(8, 4)
    assert (bm.num_blocks, bm.block_size, bm.num_free_blocks, bm.num_seqs) == (8, 4, 8, 0)
    p1 = [1, 2, 3, 4, 5, 6]
    assert bm.allocate(1, p1) == 0
    assert list(bm.block_table(1)) == [0, 1] and bm.block_table(1).dtype == np.int32
    assert 1 in bm and 2 not in bm
    assert bm.append(1, p1, 6) == []  # marks all six computed, no new slots
    assert bm.allocate(2, np.array([1, 2, 3, 4, 9], dtype=np.int64)) == 4
    assert list(bm.block_table(2)) == [0, 2]
    assert list(bm.ref_counts()[:3]) == [2, 1, 1] and list(bm.cached_mask()[:2]) == [True, False]
    bm.fork(1, 3)
    assert bm.append(3, p1 + [7], 6) == [(1, 3)]
    assert bm.seq_info(3) == (7, 2, 6) and bm.num_tokens(1) == 6 and bm.num_computed_tokens(2) == 4
    st = bm.prefix_cache_stats
    assert st["hit_tokens"] == 4 and st["query_tokens"] == 11 and st["cached_blocks"] == 1
    assert st["hit_rate"] == pytest.approx(4 / 11)
    free = bm.num_free_blocks
    assert bm.allocate(4, list(range(100))) is None and 4 not in bm
    assert bm.append(1, list(range(100)), 6) is None and bm.seq_info(1) == (6, 2, 6)
    assert bm.num_free_blocks == free
    for call in (lambda: bm.free(99), lambda: bm.allocate(1, [1]), lambda: bm.allocate(5, []),
                 lambda: bm.append(42, [1], 0), lambda: bm.append(1, p1, 2), lambda: bm.append(1, p1[:5], 6),
                 lambda: bm.append(1, p1, 7), lambda: bm.fork(1, 2), lambda: bm.block_table(77),
                 lambda: bm.set_hash_bits(70)):
        with pytest.raises(NativeError):
            call()
    for sid in (1, 2, 3):
        bm.free(sid)
    with pytest.raises(NativeError, match="unknown sequence id 3"):
        bm.free(3)
    assert bm.num_free_blocks == 8 and bm.num_seqs == 0
    bm.check()
    with pytest.raises(NativeError):
        BlockManager(0, 4)


def test_apply_runs_a_step_in_one_call():
    """One op list: tables land in their rows, copy-on-write pairs are gathered in op order, and
    the list stops at the first op that finds no room, with everything before it applied."""
    bm = BlockManager(6, 2)
    a, b = np.array([1, 2, 3], np.int32), np.array([1, 2, 3, 4, 5], np.int32)
    ops = np.zeros(4, OP_DTYPE)
    ops[0] = (ALLOCATE, 3, 0, 0, 10, 0, a.ctypes.data)
    ops[1] = (FORK, 0, 0, -1, 11, 10, 0)
    ops[2] = (APPEND, 4, 3, 1, 11, 0, b.ctypes.data)   # child writes into the shared block: one copy
    ops[3] = (ALLOCATE, 5, 0, 2, 12, 0, b.ctypes.data)
    tables = np.full((3, 4), -1, np.int32)
    done, cow = bm.apply(ops, tables)
    assert done == 4 and cow == [(1, 2)]
    assert tables.tolist() == [[0, 1, 0, 0], [0, 2, 0, 0], [0, 3, 4, 0]]
    assert ops[3]["num_computed"] == 2  # prefix [1, 2] was computed by sequence 10's mark
    big = np.arange(20, dtype=np.int32)
    ops2 = np.zeros(3, OP_DTYPE)
    ops2[0] = (FREE, 0, 3, -1, 10, 0, a.ctypes.data)
    ops2[1] = (ALLOCATE, 20, 0, -1, 13, 0, big.ctypes.data)  # needs 10 blocks: stops here
    ops2[2] = (FREE, 0, 4, -1, 11, 0, b.ctypes.data)
    assert bm.apply(ops2)[0] == 1
    assert 10 not in bm and 13 not in bm and 11 in bm
    bm.check()


def test_prefix_caching_disabled():
    bm = BlockManager(4, 2, enable_prefix_caching=False)
    bm.allocate(1, [1, 2, 3])
    bm.free(1, [1, 2, 3], 3)
    assert bm.allocate(2, [1, 2, 3]) == 0
    assert bm.prefix_cache_stats["cached_blocks"] == 0 and not bm.cached_mask().any()


# ---- the randomized comparison -----------------------------------------------------------------
class Run:
    MAX_SEQS = 40

    def __init__(self, num_blocks, block_size, caching, hash_bits, seed, full_every):
        self.r = random.Random(seed)
        self.bs, self.nb, self.full_every = block_size, num_blocks, full_every
        self.bm = BlockManager(num_blocks, block_size, caching)
        if hash_bits != 64:
            self.bm.set_hash_bits(hash_bits)
        self.m = Model(num_blocks, block_size, caching)
        self.prefixes = [[self.r.randrange(4) for _ in range(self.r.randint(1, 4 * block_size))] for _ in range(6)]
        self.kv = [None] * num_blocks   # shadow KV: the token prefix each block's written slots hold
        self.next_id = 0
        self.counts = dict(alloc=0, hit=0, no_space=0, cow=0, fork=0, free=0, invalid=0, compute=0, append=0, truncate=0)

    def pick(self):
        return self.r.choice(list(self.m.seqs))

    def prompt(self):
        return self.r.choice(self.prefixes) + [self.r.randrange(4) for _ in range(self.r.randint(0, 2 * self.bs))]

    def table(self, sid):
        t = self.bm.block_table(sid).tolist()
        assert t == self.m.seqs[sid].table, (sid, t, self.m.seqs[sid].table)
        return t

    # one random operation, checked against the model
    def step(self):
        r, m, bm = self.r, self.m, self.bm
        x = r.random()
        if not m.seqs or x < 0.25:
            p = self.prompt()
            sid, self.next_id = self.next_id, self.next_id + 1
            got, want = bm.allocate(sid, p), m.allocate(sid, p)
            assert got == want, (got, want)
            if got is None:
                self.counts["no_space"] += 1
                assert sid not in bm
                if m.seqs:  # preempt someone, as the scheduler would
                    self.free(self.pick())
            else:
                self.counts["alloc"] += 1
                self.counts["hit"] += got > 0
                t = self.table(sid)
                for j in range(got // self.bs):
                    assert self.kv[t[j]] == p[:(j + 1) * self.bs], "prefix hit on KV of another prefix"
        elif x < 0.50:
            sid = self.pick()
            s = m.seqs[sid]
            c = r.randint(s.computed, len(s.tokens)) if r.random() < 0.5 else len(s.tokens)
            self.compute(sid, s, c)
            assert bm.append(sid, s.tokens, c) == []  # marks only: no new slots
            m.mark_computed(sid, c)
            self.counts["compute"] += 1
        elif x < 0.70:
            sid = self.pick()
            s = m.seqs[sid]
            if len(s.tokens) > 10 * self.bs:
                self.free(sid)
                return
            add = [r.randrange(4) for _ in range(1 if r.random() < 0.6 else r.randint(1, 2 * self.bs))]
            before, free = list(s.table), bm.num_free_blocks
            got, want = bm.append(sid, s.tokens + add, s.computed), m.append(sid, add)
            assert got == want, (got, want)
            if got is None:
                self.counts["no_space"] += 1
                assert bm.num_free_blocks == free, "a refused append took blocks"
            else:
                self.counts["append"] += 1
                for src, dst in got:
                    self.counts["cow"] += 1
                    assert src == before[-1]
                    self.kv[dst] = self.kv[src]
            self.table(sid)
        elif x < 0.74:  # speculative decoding: the slots of rejected draft tokens go back
            sid = self.pick()
            s = m.seqs[sid]
            n = r.randint(s.computed, len(s.tokens))
            bm.truncate(sid, s.tokens[:n], s.computed)
            m.truncate(sid, n)
            self.table(sid)
            self.counts["truncate"] += 1
        elif x < 0.78:
            sid = self.pick()
            if len(m.seqs) >= self.MAX_SEQS or m.seqs[sid].computed < len(m.seqs[sid].tokens):
                return
            child, self.next_id = self.next_id, self.next_id + 1
            bm.fork(sid, child)
            m.fork(sid, child)
            self.table(child)
            self.counts["fork"] += 1
        elif x < 0.90:
            self.free(self.pick())
            self.counts["free"] += 1
        elif x < 0.95:  # lookups change nothing
            self.table(self.pick())
        else:  # invalid use: an error, and nothing changes
            sid = self.pick()
            s = m.seqs[sid]
            bad = r.choice([lambda: bm.free(self.next_id + 3), lambda: bm.allocate(sid, [1]),
                            lambda: bm.append(sid, s.tokens, s.computed - 1), lambda: bm.fork(sid, sid),
                            lambda: bm.append(sid, s.tokens, len(s.tokens) + 1), lambda: bm.append(-5, [1], 0),
                            lambda: bm.append(sid, s.tokens[:-1], s.computed - 1), lambda: bm.allocate(self.next_id + 9, []),
                            lambda: bm.truncate(sid, s.tokens + [1], s.computed),
                            lambda: bm.truncate(sid, s.tokens[:s.computed - 1], s.computed - 1)])
            with pytest.raises(NativeError):
                bad()
            self.counts["invalid"] += 1
        assert bm.num_free_blocks == m.available()

    def free(self, sid):
        """FREE marks a final computed count first (a finished sequence's last blocks get cached)."""
        s = self.m.seqs[sid]
        c = self.r.randint(s.computed, len(s.tokens)) if self.r.random() < 0.3 else s.computed
        if c > s.computed:
            self.compute(sid, s, c)
        self.bm.free(sid, s.tokens, c)
        self.m.mark_computed(sid, c)
        self.m.free_seq(sid)

    def compute(self, sid, s, c):
        """Shadow forward of tokens [computed, c): writes only into unshared blocks, reads only KV
        computed from this sequence's own prefix."""
        bs, t = self.bs, s.table
        p = s.computed
        while p < c:
            b, end = t[p // bs], min(c, (p // bs + 1) * bs)
            assert self.m.ref[b] == 1, f"writing into block {b} shared by {self.m.ref[b]} sequences"
            if p % bs:
                assert self.kv[b] == s.tokens[:p], "block holds KV of another prefix"
            self.kv[b] = s.tokens[:end]
            p = end
        for i in range(-(-c // bs)):
            end = min((i + 1) * bs, c)
            assert self.kv[t[i]][:end] == s.tokens[:end], "attention would read KV of another prefix"

    def full_check(self):
        bm, m = self.bm, self.m
        bm.check()
        assert bm.num_seqs == len(m.seqs)
        for sid, s in m.seqs.items():
            assert bm.seq_info(sid) == (len(s.tokens), len(s.table), s.computed)
            self.table(sid)
        assert bm.ref_counts().tolist() == m.ref
        assert bm.cached_mask().tolist() == [b in m.key for b in range(self.nb)]
        st = bm.prefix_cache_stats
        assert {k: st[k] for k in m.stats} == m.stats
        assert st["cached_blocks"] == len(m.key) and st["evictable_blocks"] == len(m.lru)

    def run(self, n_ops):
        for i in range(n_ops):
            self.step()
            if i % self.full_every == 0:
                self.full_check()
        self.full_check()
        for sid in list(self.m.seqs):
            self.free(sid)
        self.full_check()
        assert self.bm.num_free_blocks == self.nb and self.bm.num_seqs == 0, "leaked blocks"
        assert not self.bm.ref_counts().any()
        return self.counts


# (num_blocks, block_size, prefix caching, hash bits, ops): 10^6 ops in all. TINYVLLM_BM_OPS
# scales them (e.g. 0.1 for a quick run under ASan).
CONFIGS = [
    (32, 4, True, 64, 350_000),
    (32, 4, True, 2, 250_000),    # every lookup walks colliding hashes
    (16, 1, True, 3, 100_000),    # one token per block
    (24, 3, False, 64, 150_000),
    (64, 16, True, 64, 150_000),
]


@pytest.mark.parametrize("num_blocks,block_size,caching,hash_bits,n_ops", CONFIGS)
def test_randomized_against_model(num_blocks, block_size, caching, hash_bits, n_ops):
    n = max(1000, int(n_ops * float(os.environ.get("TINYVLLM_BM_OPS", "1"))))
    t0 = time.perf_counter()
    counts = Run(num_blocks, block_size, caching, hash_bits, seed=num_blocks * 1000 + block_size + hash_bits,
                 full_every=10).run(n)
    dt = time.perf_counter() - t0
    print(f"\n{n} ops in {dt:.1f} s ({dt / n * 1e6:.1f} us/op): {counts}")
    # the run went through every path
    assert counts["no_space"] and counts["fork"] and counts["invalid"] and counts["free"] and counts["truncate"]
    assert counts["cow"] or block_size == 1
    assert counts["hit"] if caching else not counts["hit"]


def test_truncate_gives_back_rejected_draft_slots():
    """Speculative decoding's rollback: slots for 1 + k tokens, then only the accepted ones stay.
    Whole blocks of rejected slots go back to the pool; rejected tokens are never cached."""
    bm = BlockManager(8, 4)
    prompt = list(range(10, 16))
    bm.allocate(1, prompt)
    drafts = prompt + [50, 51, 52, 53, 54]        # 11 slots: 3 blocks
    assert bm.append(1, drafts, 5) == [] and bm.seq_info(1) == (11, 3, 5)
    kept = prompt + [50, 99]                      # draft 50 accepted, 51 rejected: 99 sampled instead
    bm.truncate(1, kept, 7)
    assert bm.seq_info(1) == (8, 2, 7) and bm.num_free_blocks == 6
    bm.free(1, kept, 7)
    # block 1 would be keyed by 14 15 50 51 had the rejected draft been cached
    assert bm.allocate(2, drafts) == 4
    assert bm.prefix_cache_stats["cached_blocks"] == 1
    with pytest.raises(NativeError):
        bm.truncate(2, drafts[:3], 4)             # below the computed count
    bm.check()
