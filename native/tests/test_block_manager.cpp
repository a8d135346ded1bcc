// The paged-KV block manager through its C ABI: each rule on its own, then a randomized run
// checked against the manager's own recount (tv_block_manager_check) and a shadow "KV cache" that
// records which token prefix every written slot was computed from.
#include <algorithm>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "test.h"
#include "tinyvllm.h"

namespace {

using Tokens = std::vector<int32_t>;

struct Bm {
    tv_block_manager *h = nullptr;
    std::map<int64_t, Tokens> toks;  // the caller owns token ids; the manager borrows them per op
    Bm(int nb, int bs, bool pc = true) {
        CHECK(tv_block_manager_create(nb, bs, pc, &h) == TV_OK) << tv_last_error();
    }
    ~Bm() { tv_block_manager_free(h); }
    int run(tv_block_op &op, std::vector<int32_t> *cow = nullptr) {
        int32_t pairs[2] = {-1, -1}, n_cow = -1, done = -1;
        const int rc = tv_block_manager_apply(h, &op, 1, nullptr, 0, pairs, 1, &n_cow, &done);
        CHECK(done == (rc == TV_OK ? 1 : 0)) << rc << " " << done;
        if (cow) cow->assign(pairs, pairs + 2 * std::max(n_cow, 0));
        return rc;
    }
    int32_t computed(int64_t id) {
        int32_t c = -1;
        tv_block_manager_seq_info(h, id, nullptr, nullptr, &c);
        return c;
    }
    const int32_t *tokens_of(int64_t id) {
        auto it = toks.find(id);
        return it == toks.end() ? nullptr : it->second.data();
    }
    int32_t slots(int64_t id) { return toks.count(id) ? (int32_t)toks[id].size() : 0; }
    int alloc(int64_t id, const Tokens &t, int32_t *cached = nullptr, int32_t kind = TV_BLOCK_ALLOCATE) {
        tv_block_op op{kind, (int32_t)t.size(), -1, -1, id, 0, t.data()};
        const int rc = run(op);
        if (cached) *cached = op.num_computed;
        if (rc == TV_OK) toks[id] = t;
        return rc;
    }
    int append(int64_t id, const Tokens &t, std::vector<int32_t> *cow = nullptr) {
        Tokens all = toks.count(id) ? toks[id] : Tokens{};
        all.insert(all.end(), t.begin(), t.end());
        tv_block_op op{TV_BLOCK_APPEND, (int32_t)all.size(), computed(id), -1, id, 0, all.data()};
        const int rc = run(op, cow);
        if (rc == TV_OK) toks[id] = all;
        return rc;
    }
    int mark(int64_t id, int32_t c) {
        tv_block_op op{TV_BLOCK_APPEND, slots(id), c, -1, id, 0, tokens_of(id)};
        return run(op);
    }
    int fork(int64_t parent, int64_t child) {
        tv_block_op op{TV_BLOCK_FORK, 0, 0, -1, child, parent, nullptr};
        const int rc = run(op);
        if (rc == TV_OK) toks[child] = toks[parent];
        return rc;
    }
    int truncate(int64_t id, int32_t n, int32_t c) {
        tv_block_op op{TV_BLOCK_TRUNCATE, n, c, -1, id, 0, tokens_of(id)};
        const int rc = run(op);
        if (rc == TV_OK) toks[id].resize((size_t)n);
        return rc;
    }
    int free(int64_t id) {
        tv_block_op op{TV_BLOCK_FREE, 0, computed(id), -1, id, 0, tokens_of(id)};
        const int rc = run(op);
        if (rc == TV_OK) toks.erase(id);
        return rc;
    }
    Tokens table(int64_t id) {
        Tokens out(1024);
        const int n = tv_block_manager_get_block_table(h, id, out.data(), (int32_t)out.size());
        out.resize(std::max(n, 0));
        return out;
    }
    int free_blocks() { return tv_block_manager_num_free_blocks(h); }
    tv_prefix_cache_stats stats() {
        tv_prefix_cache_stats s{};
        tv_block_manager_prefix_cache_stats(h, &s);
        return s;
    }
    std::vector<int32_t> refs() {
        std::vector<int32_t> r((size_t)tv_block_manager_num_blocks(h));
        tv_block_manager_block_info(h, r.data(), nullptr, (int32_t)r.size());
        return r;
    }
    bool ok() { return tv_block_manager_check(h) == TV_OK; }
};

Tokens seq_tokens(int n, int32_t start) {
    Tokens t((size_t)n);
    for (int i = 0; i < n; i++) t[(size_t)i] = start + i;
    return t;
}

}  // namespace

TEST(block_manager_basics) {
    Bm m(8, 4, false);
    CHECK(tv_block_manager_num_blocks(m.h) == 8);
    CHECK(tv_block_manager_block_size(m.h) == 4);
    CHECK(m.free_blocks() == 8);
    int32_t cached = -1;
    CHECK(m.alloc(7, seq_tokens(9, 0), &cached) == TV_OK);
    CHECK(cached == 0);
    CHECK((m.table(7) == Tokens{0, 1, 2})) << "low ids first";
    CHECK(m.free_blocks() == 5);
    int32_t nt = 0, nb = 0, nc = -1;
    CHECK(tv_block_manager_seq_info(m.h, 7, &nt, &nb, &nc) == TV_OK);
    CHECK(nt == 9 && nb == 3 && nc == 0);
    CHECK(m.append(7, seq_tokens(3, 9)) == TV_OK);  // 12 tokens: still 3 blocks
    CHECK(m.table(7).size() == 3);
    CHECK(m.append(7, seq_tokens(1, 12)) == TV_OK);  // 13: a 4th block
    CHECK((m.table(7) == Tokens{0, 1, 2, 3}));
    CHECK(tv_block_manager_has_seq(m.h, 7) == 1 && tv_block_manager_has_seq(m.h, 8) == 0);
    CHECK(tv_block_manager_num_seqs(m.h) == 1);
    CHECK(m.free(7) == TV_OK);
    CHECK(m.free_blocks() == 8);
    CHECK(tv_block_manager_num_seqs(m.h) == 0);
    CHECK(m.ok()) << tv_last_error();
}

TEST(block_manager_validation) {
    Bm m(4, 4);
    tv_block_manager *bad = nullptr;
    CHECK(tv_block_manager_create(0, 4, 1, &bad) == TV_ERR_INVALID && bad == nullptr);
    CHECK(tv_block_manager_create(4, 0, 1, &bad) == TV_ERR_INVALID);
    CHECK(tv_block_manager_create(4, 4, 1, nullptr) == TV_ERR_INVALID);
    CHECK(tv_block_manager_num_free_blocks(nullptr) == TV_ERR_INVALID);
    CHECK(std::strstr(tv_last_error(), "null") != nullptr) << tv_last_error();
    Tokens t = seq_tokens(6, 0);
    int32_t c;
    CHECK(m.alloc(1, Tokens{}) == TV_ERR_INVALID);  // empty prompt
    tv_block_op op{TV_BLOCK_ALLOCATE, -3, 0, -1, 1, 0, t.data()};
    CHECK(m.run(op) == TV_ERR_INVALID);
    op = {TV_BLOCK_ALLOCATE, 6, 0, -1, 1, 0, nullptr};
    CHECK(m.run(op) == TV_ERR_INVALID);
    op = {TV_BLOCK_ALLOCATE, 6, 0, 0, 1, 0, t.data()};  // a table row, and tables is null
    CHECK(m.run(op) == TV_ERR_INVALID);
    op = {7, 6, 0, -1, 1, 0, t.data()};
    CHECK(m.run(op) == TV_ERR_INVALID && std::strstr(tv_last_error(), "unknown kind") != nullptr) << tv_last_error();
    int32_t pairs[2], n, done;
    op = {TV_BLOCK_ALLOCATE, 6, 0, -1, 1, 0, t.data()};
    CHECK(tv_block_manager_apply(m.h, &op, 1, nullptr, 0, pairs, 1, &n, nullptr) == TV_ERR_INVALID);
    CHECK(tv_block_manager_apply(m.h, &op, 1, nullptr, 0, pairs, 1, nullptr, &done) == TV_ERR_INVALID);
    CHECK(tv_block_manager_apply(m.h, nullptr, 1, nullptr, 0, pairs, 1, &n, &done) == TV_ERR_INVALID);
    CHECK(tv_block_manager_apply(m.h, &op, 1, nullptr, 0, nullptr, 1, &n, &done) == TV_ERR_INVALID);
    CHECK(tv_block_manager_apply(nullptr, &op, 1, nullptr, 0, pairs, 1, &n, &done) == TV_ERR_INVALID);
    CHECK(tv_block_manager_num_seqs(m.h) == 0) << "nothing ran";
    CHECK(m.alloc(1, t, &c) == TV_OK && c == 0);
    CHECK(tv_last_error()[0] == '\0') << "success clears the last error";
    CHECK(m.alloc(1, t) == TV_ERR_INVALID) << "id in use";
    CHECK(std::strstr(tv_last_error(), "already") != nullptr) << tv_last_error();
    op = {TV_BLOCK_APPEND, 5, 0, -1, 1, 0, t.data()};  // fewer slots than it has
    CHECK(m.run(op) == TV_ERR_INVALID);
    op = {TV_BLOCK_APPEND, 7, 0, -1, 99, 0, t.data()};  // unknown sequence
    CHECK(m.run(op) == TV_ERR_INVALID);
    CHECK(m.mark(1, 7) == TV_ERR_INVALID);  // more than its slots
    op = {TV_BLOCK_APPEND, 6, 5, -1, 1, 0, nullptr};  // completes block 0, and no tokens to key it by
    CHECK(m.run(op) == TV_ERR_INVALID && std::strstr(tv_last_error(), "tokens is null") != nullptr) << tv_last_error();
    op = {TV_BLOCK_APPEND, 6, 3, -1, 1, 0, nullptr};  // completes nothing: tokens not needed
    CHECK(m.run(op) == TV_OK) << tv_last_error();
    CHECK(m.mark(1, 5) == TV_OK);
    CHECK(m.mark(1, 4) == TV_ERR_INVALID);  // decreasing
    CHECK(m.mark(99, 0) == TV_ERR_INVALID);
    // a list stops at its first invalid op, after running the ones before it
    tv_block_op two[2] = {{TV_BLOCK_FORK, 0, 0, -1, 2, 1, nullptr}, {TV_BLOCK_FORK, 0, 0, -1, 2, 1, nullptr}};
    CHECK(tv_block_manager_apply(m.h, two, 2, nullptr, 0, pairs, 1, &n, &done) == TV_ERR_INVALID && done == 1);
    CHECK(tv_block_manager_has_seq(m.h, 2) == 1);
    m.toks[2] = m.toks[1];
    CHECK(m.free(2) == TV_OK);
    Tokens out(1);
    CHECK(tv_block_manager_get_block_table(m.h, 1, out.data(), 1) == TV_ERR_INVALID);  // has 2 blocks
    CHECK(tv_block_manager_get_block_table(m.h, 1, nullptr, 8) == TV_ERR_INVALID);
    CHECK(tv_block_manager_get_block_table(m.h, 42, out.data(), 1) == TV_ERR_INVALID);
    CHECK(tv_block_manager_block_info(m.h, out.data(), nullptr, 1) == TV_ERR_INVALID);
    CHECK(m.fork(1, 1) == TV_ERR_INVALID);
    CHECK(m.fork(5, 6) == TV_ERR_INVALID);
    m.toks.erase(6);
    CHECK(tv_block_manager_prefix_cache_stats(m.h, nullptr) == TV_ERR_INVALID);
    CHECK(tv_block_manager_set_hash_bits(m.h, 0) == TV_ERR_INVALID);
    CHECK(tv_block_manager_set_hash_bits(m.h, 65) == TV_ERR_INVALID);
    CHECK(tv_block_manager_set_hash_bits(m.h, 8) == TV_ERR_INVALID) << "a block is cached";
    CHECK(tv_block_manager_seq_info(m.h, 3, nullptr, nullptr, nullptr) == TV_ERR_INVALID);
    // a CoW needs room for one pair
    CHECK(m.fork(1, 2) == TV_OK);
    Tokens t2 = t;
    t2.push_back(9);
    op = {TV_BLOCK_APPEND, 7, 5, -1, 2, 0, t2.data()};
    CHECK(tv_block_manager_apply(m.h, &op, 1, nullptr, 0, nullptr, 0, &n, &done) == TV_ERR_INVALID);
    CHECK(std::strstr(tv_last_error(), "copy-on-write") != nullptr) << tv_last_error();
    CHECK(m.free(1) == TV_OK);
    CHECK(m.free(1) == TV_ERR_INVALID) << "double free";
    CHECK(std::strstr(tv_last_error(), "unknown sequence id 1") != nullptr) << tv_last_error();
    CHECK(m.free(2) == TV_OK);
    CHECK(m.free_blocks() == 4);
    CHECK(m.ok()) << tv_last_error();
}

TEST(block_manager_out_of_blocks_changes_nothing) {
    Bm m(3, 4);
    CHECK(m.alloc(1, seq_tokens(8, 0)) == TV_OK);
    int32_t c = -1;
    CHECK(m.alloc(2, seq_tokens(5, 100), &c) == TV_NO_FREE_BLOCKS);
    CHECK(c == -1 && tv_block_manager_has_seq(m.h, 2) == 0);
    CHECK(tv_last_error()[0] == '\0') << "not an error";
    std::vector<int32_t> cow;
    CHECK(m.append(1, seq_tokens(5, 8), &cow) == TV_NO_FREE_BLOCKS);
    CHECK(cow.empty());
    int32_t nt = 0;
    tv_block_manager_seq_info(m.h, 1, &nt, nullptr, nullptr);
    CHECK(nt == 8 && m.table(1).size() == 2 && m.free_blocks() == 1);
    CHECK(m.append(1, seq_tokens(4, 8)) == TV_OK);
    CHECK(m.free_blocks() == 0);
    CHECK(m.ok()) << tv_last_error();
}

TEST(block_manager_apply_batch) {
    // One list per engine step: tables land in their rows (zero padded), copy-on-write pairs
    // accumulate, and a list that runs out of blocks stops at that op, which changed nothing.
    Bm m(6, 4);
    const Tokens a = seq_tokens(6, 0), b = seq_tokens(3, 50);
    CHECK(m.alloc(1, a) == TV_OK && m.fork(1, 2) == TV_OK && m.alloc(3, b) == TV_OK);  // blocks {0,1} shared, {2}
    Tokens a1 = a, a2 = a, b1 = b;
    a1.push_back(7);
    a2.push_back(8);
    b1.push_back(9);
    tv_block_op ops[4] = {{TV_BLOCK_APPEND, 7, 6, 0, 1, 0, a1.data()},   // writes into shared block 1: copy
                          {TV_BLOCK_APPEND, 7, 6, 2, 2, 0, a2.data()},   // block 1 is its own now: no copy
                          {TV_BLOCK_APPEND, 4, 3, 1, 3, 0, b1.data()},
                          {TV_BLOCK_ALLOCATE, 9, 0, 3, 4, 0, nullptr}};
    std::vector<int32_t> tables(4 * 5, -7);
    int32_t pairs[8], n_cow = -1, done = -1;
    CHECK(tv_block_manager_apply(m.h, ops, 3, tables.data(), 5, pairs, 4, &n_cow, &done) == TV_OK) << tv_last_error();
    CHECK(done == 3 && n_cow == 1 && pairs[0] == 1 && pairs[1] == 3) << pairs[0] << " " << pairs[1];
    CHECK((Tokens(tables.begin(), tables.begin() + 15) == Tokens{0, 3, 0, 0, 0, 2, 0, 0, 0, 0, 0, 1, 0, 0, 0}));
    CHECK(tables[15] == -7) << "row 3 untouched";
    CHECK(m.stats().cached_blocks == 1) << "block 0 (a's first 4 tokens) marked computed";
    // 2 free blocks (4, 5) left; seq 4 wants 3 of them (the cache hits block 0: 9 tokens = 3 blocks, 1 hit)
    const Tokens p9 = seq_tokens(9, 0);
    ops[3].tokens = p9.data();
    ops[3].num_computed = -1;
    CHECK(tv_block_manager_apply(m.h, ops + 3, 1, tables.data(), 5, pairs, 4, &n_cow, &done) == TV_OK) << tv_last_error();
    CHECK(ops[3].num_computed == 4 && done == 1 && n_cow == 0);
    CHECK((Tokens(tables.begin() + 15, tables.end()) == Tokens{0, 4, 5, 0, 0})) << tables[16] << " " << tables[17];
    tv_block_op more[2] = {{TV_BLOCK_FREE, 0, 3, -1, 3, 0, b1.data()}, {TV_BLOCK_ALLOCATE, 13, -1, 0, 5, 0, nullptr}};
    const Tokens p13 = seq_tokens(13, 100);
    more[1].tokens = p13.data();
    const int free_before = m.free_blocks();
    CHECK(tv_block_manager_apply(m.h, more, 2, tables.data(), 5, pairs, 4, &n_cow, &done) == TV_NO_FREE_BLOCKS);
    CHECK(done == 1 && more[1].num_computed == -1 && tv_block_manager_has_seq(m.h, 5) == 0);
    CHECK(m.free_blocks() == free_before + 1) << "the free ran, the allocation changed nothing";
    CHECK(tv_last_error()[0] == '\0') << "running out is not an error";
    m.toks.erase(3);
    m.toks[4] = p9;
    m.toks[1] = a1;
    m.toks[2] = a2;
    CHECK(m.ok()) << tv_last_error();
}

TEST(block_manager_prefix_hit_only_after_compute) {
    Bm m(16, 4);
    const Tokens p = seq_tokens(14, 0);  // 3 full blocks + 2
    int32_t c = -1;
    CHECK(m.alloc(1, p, &c) == TV_OK && c == 0);
    CHECK(m.alloc(2, p, &c) == TV_OK && c == 0) << "nothing computed yet: nothing cached";
    CHECK(m.mark(1, 9) == TV_OK);  // blocks 0, 1 full and computed
    CHECK(m.stats().cached_blocks == 2);
    CHECK(m.alloc(3, p, &c) == TV_OK && c == 8);
    const Tokens t1 = m.table(1), t3 = m.table(3);
    CHECK(t3[0] == t1[0] && t3[1] == t1[1] && t3[2] != t1[2]);
    CHECK(m.refs()[(size_t)t1[0]] == 2);
    int32_t nc = 0;
    tv_block_manager_seq_info(m.h, 3, nullptr, nullptr, &nc);
    CHECK(nc == 8) << "cached tokens count as computed";
    CHECK(m.mark(1, 14) == TV_OK);
    Tokens other = p;
    other[5] = 999;  // differs in block 1
    CHECK(m.alloc(4, other, &c) == TV_OK && c == 4);
    const tv_prefix_cache_stats s = m.stats();
    CHECK(s.queries == 4 && s.query_tokens == 4 * 14 && s.hit_tokens == 12);
    CHECK(s.query_blocks == 12 && s.hit_blocks == 3);
    CHECK(s.cached_blocks == 3 && s.evictable_blocks == 0);
    CHECK(m.ok()) << tv_last_error();
}

TEST(block_manager_never_caches_whole_prompt) {
    Bm m(8, 4);
    const Tokens p = seq_tokens(8, 0);  // exactly 2 blocks
    CHECK(m.alloc(1, p) == TV_OK);
    CHECK(m.mark(1, 8) == TV_OK);
    CHECK(m.stats().cached_blocks == 2);
    int32_t c = -1;
    CHECK(m.alloc(2, p, &c) == TV_OK && c == 4) << c;  // the last token must be computed
    Tokens longer = seq_tokens(9, 0);
    CHECK(m.alloc(3, longer, &c) == TV_OK && c == 8) << c;
    Tokens one = seq_tokens(1, 0);
    CHECK(m.alloc(4, one, &c) == TV_OK && c == 0);
    CHECK(m.ok()) << tv_last_error();
}

TEST(block_manager_copy_on_write) {
    Bm m(8, 4);
    CHECK(m.alloc(1, seq_tokens(6, 0)) == TV_OK);  // blocks 0, 1 (1 is half full)
    CHECK(m.mark(1, 6) == TV_OK);
    CHECK(m.fork(1, 2) == TV_OK);
    CHECK(m.table(2) == m.table(1));
    CHECK((m.refs() == std::vector<int32_t>{2, 2, 0, 0, 0, 0, 0, 0}));
    std::vector<int32_t> cow;
    CHECK(m.append(2, {50}, &cow) == TV_OK);
    CHECK((cow == std::vector<int32_t>{1, 2})) << "copy block 1 into a new block 2";
    CHECK((m.table(2) == Tokens{0, 2}));
    CHECK((m.table(1) == Tokens{0, 1}));
    CHECK(m.append(1, {60}, &cow) == TV_OK);
    CHECK(cow.empty()) << "block 1 is the parent's alone now";
    // full last block shared: new tokens go to a new block, no copy
    CHECK(m.append(1, {61, 62}, &cow) == TV_OK && cow.empty());  // 9 tokens: block 1 full, new block 3
    CHECK(m.mark(1, 8) == TV_OK);
    CHECK(m.fork(1, 3) == TV_OK);
    CHECK(m.append(3, {70}, &cow) == TV_OK);
    CHECK(cow.size() == 2 && cow[0] == 3) << "block 3 (1 token) is shared";
    // no room for the copy: nothing happens
    Bm s(2, 4);
    CHECK(s.alloc(1, seq_tokens(2, 0)) == TV_OK);
    CHECK(s.fork(1, 2) == TV_OK);
    CHECK(s.alloc(3, seq_tokens(1, 9)) == TV_OK);
    CHECK(s.append(2, {5}, &cow) == TV_NO_FREE_BLOCKS && cow.empty());
    CHECK((s.refs() == std::vector<int32_t>{2, 1}));
    CHECK(m.ok() && s.ok()) << tv_last_error();
}

TEST(block_manager_eviction_lru_order) {
    Bm m(6, 2);
    // A: blocks 0,1,2 (3 full blocks + nothing), B: 3,4 ; all computed and cached
    CHECK(m.alloc(1, seq_tokens(6, 0)) == TV_OK);
    CHECK(m.alloc(2, seq_tokens(4, 100)) == TV_OK);
    CHECK(m.mark(1, 6) == TV_OK);
    CHECK(m.mark(2, 4) == TV_OK);
    CHECK(m.stats().cached_blocks == 5);
    CHECK(m.free(1) == TV_OK);  // LRU: 2, 1, 0
    CHECK(m.free(2) == TV_OK);  // LRU: 2, 1, 0, 4, 3
    CHECK(m.free_blocks() == 6);
    CHECK(m.stats().evictable_blocks == 5);
    // uncached free blocks go first, then the LRU head (the tail of the first freed sequence)
    CHECK(m.alloc(3, seq_tokens(1, 500)) == TV_OK);
    CHECK((m.table(3) == Tokens{5}));
    CHECK(m.stats().evictions == 0);
    CHECK(m.alloc(4, seq_tokens(4, 600)) == TV_OK);
    CHECK((m.table(4) == Tokens{2, 1}));
    CHECK(m.stats().evictions == 2 && m.stats().cached_blocks == 3);
    // block 0 (A's first) is still cached: hit, revived out of the LRU list
    int32_t c = -1;
    CHECK(m.alloc(5, seq_tokens(3, 0), &c) == TV_OK && c == 2);
    CHECK((m.table(5) == Tokens{0, 4})) << "hit 0, then new block evicted from the LRU head (4)";
    CHECK(m.stats().evictions == 3);
    // B's first block (3) remains
    CHECK(m.alloc(6, seq_tokens(3, 100)) == TV_NO_FREE_BLOCKS) << "hit revives 3: no block left";
    CHECK(m.ok()) << tv_last_error();
}

TEST(block_manager_hit_on_evictable_counts_against_free) {
    Bm m(3, 2);
    CHECK(m.alloc(1, seq_tokens(5, 0)) == TV_OK);
    CHECK(m.mark(1, 5) == TV_OK);
    CHECK(m.free(1) == TV_OK);
    CHECK(m.free_blocks() == 3);
    // 5 tokens: hits blocks 0, 1 (evictable) and needs 1 more: fits exactly
    Tokens p = seq_tokens(7, 0);  // hits 0, 1 (2 blocks... (7-1)/2 = 3 lookups, block 2 is not cached: partial)
    CHECK(m.alloc(9, p) == TV_NO_FREE_BLOCKS) << "4 blocks needed, 3 exist";
    int32_t c;
    CHECK(m.alloc(2, seq_tokens(5, 0), &c) == TV_OK && c == 4);
    CHECK(m.free_blocks() == 0);
    CHECK(m.ok()) << tv_last_error();
}

TEST(block_manager_hash_collisions_are_harmless) {
    for (int bits : {1, 2, 64}) {
        Bm m(32, 2);
        CHECK(tv_block_manager_set_hash_bits(m.h, bits) == TV_OK);
        // same second block, different first block: the second must never be shared
        CHECK(m.alloc(1, {1, 2, 3, 4, 5}) == TV_OK);
        CHECK(m.mark(1, 5) == TV_OK);
        int32_t c = -1;
        CHECK(m.alloc(2, {9, 9, 3, 4, 5}, &c) == TV_OK && c == 0) << bits;
        CHECK(m.mark(2, 5) == TV_OK);
        CHECK(m.alloc(3, {9, 9, 3, 4, 6}, &c) == TV_OK && c == 4) << bits;
        CHECK(m.table(3)[1] == m.table(2)[1] && m.table(3)[1] != m.table(1)[1]) << bits;
        CHECK(m.alloc(4, {1, 2, 3, 4, 7}, &c) == TV_OK && c == 4) << bits;
        CHECK(m.table(4)[1] == m.table(1)[1]) << bits;
        CHECK(m.alloc(5, {1, 2, 4, 3, 7}, &c) == TV_OK && c == 2) << bits;
        CHECK(m.alloc(6, {2, 1, 3, 4, 7}, &c) == TV_OK && c == 0) << bits;
        CHECK(m.stats().cached_blocks == 4) << bits;
        CHECK(m.ok()) << tv_last_error();
    }
}

TEST(block_manager_child_survives_parent_eviction) {
    // A cached block stays findable after its parent's block was evicted, once the parent's
    // content is computed (and cached) again: keys are contents, not block ids.
    Bm m(8, 2);
    CHECK(m.alloc(1, {1, 2, 9}) == TV_OK);         // blocks 0, 1
    CHECK(m.alloc(2, {1, 2, 3, 4, 5}) == TV_OK);   // blocks 2, 3, 4: block 2 duplicates block 0
    CHECK(m.mark(1, 3) == TV_OK);  // caches 0 = [1 2]
    CHECK(m.mark(2, 5) == TV_OK);  // caches 3 = [1 2][3 4]; 2 is a duplicate
    CHECK(m.stats().cached_blocks == 2);
    CHECK(m.free(1) == TV_OK);          // 0 evictable, 1 free
    CHECK(m.alloc(3, seq_tokens(10, 50)) == TV_OK);              // 5 blocks: 1, 5, 6, 7 and evicts 0
    CHECK((m.table(3) == Tokens{1, 5, 6, 7, 0}));
    CHECK(m.stats().evictions == 1 && m.stats().cached_blocks == 1);
    CHECK(m.free(3) == TV_OK);
    int32_t c = -1;
    CHECK(m.alloc(4, {1, 2, 3, 4, 5}, &c) == TV_OK && c == 0) << "[1 2] is gone, so nothing after it matches";
    CHECK((m.table(4) == Tokens{1, 5, 6}));
    CHECK(m.mark(4, 5) == TV_OK);  // caches 1 = [1 2] again
    CHECK(m.alloc(5, {1, 2, 3, 4, 5}, &c) == TV_OK && c == 4);
    CHECK((m.table(5) == Tokens{1, 3, 7})) << "block 3 found again under the recomputed parent";
    CHECK(m.ok()) << tv_last_error();
}

TEST(block_manager_duplicates_not_cached_twice) {
    Bm m(8, 2);
    const Tokens p = {1, 2, 3, 4, 5};
    CHECK(m.alloc(1, p) == TV_OK);
    CHECK(m.alloc(2, p) == TV_OK);  // computed concurrently: same content in different blocks
    CHECK(m.mark(1, 5) == TV_OK);
    CHECK(m.mark(2, 5) == TV_OK);
    CHECK(m.stats().cached_blocks == 2);
    CHECK(m.free(1) == TV_OK);
    CHECK(m.free(2) == TV_OK);
    CHECK(m.free_blocks() == 8);
    CHECK(m.stats().evictable_blocks == 2);
    int32_t c = -1;
    CHECK(m.alloc(3, p, &c) == TV_OK && c == 4);
    CHECK((m.table(3) == Tokens{0, 1, 3})) << "seq 1's blocks 0 and 1 (seq 2's were not cached), then the free stack";
    CHECK(m.ok()) << tv_last_error();
}

TEST(block_manager_allocate_uncached_skips_the_cache) {
    Bm m(16, 4);
    const Tokens p = seq_tokens(14, 0);
    int32_t c = -1;
    CHECK(m.alloc(1, p) == TV_OK);
    CHECK(m.mark(1, 14) == TV_OK);
    CHECK(m.stats().cached_blocks == 3);
    CHECK(m.alloc(2, p, &c, TV_BLOCK_ALLOCATE_UNCACHED) == TV_OK && c == 0) << c;
    const Tokens t1 = m.table(1), t2 = m.table(2);
    CHECK(t2.size() == 4 && std::find_first_of(t1.begin(), t1.end(), t2.begin(), t2.end()) == t1.end())
        << "nothing shared";
    CHECK(m.stats().queries == 1) << "an uncached allocation is no cache query";
    CHECK(m.mark(2, 14) == TV_OK);
    CHECK(m.stats().cached_blocks == 3) << "same content: not cached twice";
    CHECK(m.alloc(3, p, &c) == TV_OK && c == 12) << "plain ALLOCATE still hits";
    CHECK(m.ok()) << tv_last_error();
}

// Speculative decoding: slots for 1 + k tokens, then the rejected drafts' slots go back. Whole
// rejected blocks return to the pool, and the rejected tokens never become prefix-cache keys.
TEST(block_manager_truncate_rolls_back_rejected_drafts) {
    Bm m(8, 4);
    CHECK(m.alloc(1, seq_tokens(6, 0)) == TV_OK);                // blocks 0, 1
    CHECK(m.mark(1, 5) == TV_OK);                                 // prefill ran all but the last token
    CHECK(m.append(1, seq_tokens(5, 100)) == TV_OK);             // 11 slots: 5 draft tokens, blocks 0-2
    CHECK(m.table(1).size() == 3 && m.free_blocks() == 5);
    CHECK(m.truncate(1, 7, 6) == TV_OK) << tv_last_error();     // draft 100 rejected: a token of its own at 6
    CHECK((m.table(1) == Tokens{0, 1})) << "the block of rejected slots is back";
    CHECK(m.free_blocks() == 6 && m.stats().cached_blocks == 1) << "only block 0 (tokens 0-3) is cached";
    int32_t nt = 0, nb = 0, nc = 0;
    CHECK(tv_block_manager_seq_info(m.h, 1, &nt, &nb, &nc) == TV_OK && nt == 7 && nb == 2 && nc == 6);
    // the sampled token replaces the rejected draft at position 6; the sequence grows again
    m.toks[1][6] = 200;
    CHECK(m.append(1, seq_tokens(2, 201)) == TV_OK);             // tokens 0..5, 100, 200, 201, 202
    CHECK(m.free(1) == TV_OK);
    Tokens probe = seq_tokens(6, 0);
    probe.insert(probe.end(), {100, 101, 102});                   // the rejected drafts' prefix
    int32_t cached = -1;
    CHECK(m.alloc(2, probe, &cached) == TV_OK && cached == 4) << cached << ": rejected tokens were never cached";
    // out of range: below computed, or more than the slots
    CHECK(m.mark(2, 6) == TV_OK);
    CHECK(m.truncate(2, 5, 6) == TV_ERR_INVALID);
    CHECK(m.truncate(2, 10, 6) == TV_ERR_INVALID);
    CHECK(m.truncate(2, 6, 6) == TV_OK && m.table(2).size() == 2);
    // a truncation inside the last block keeps it; a fork's shared blocks are only unreferenced
    CHECK(m.fork(2, 3) == TV_OK && m.append(3, seq_tokens(3, 300)) == TV_OK);  // copy of the shared block 2
    CHECK(m.truncate(3, 7, 6) == TV_OK && m.table(3).size() == 2);
    CHECK(m.free(3) == TV_OK && m.free(2) == TV_OK);
    CHECK(m.free_blocks() == 8);
    CHECK(m.ok()) << tv_last_error();
}

TEST(block_manager_prefix_caching_off) {
    Bm m(4, 2, false);
    CHECK(m.alloc(1, {1, 2, 3}) == TV_OK);
    CHECK(m.mark(1, 3) == TV_OK);
    CHECK(m.free(1) == TV_OK);
    int32_t c = -1;
    CHECK(m.alloc(2, {1, 2, 3}, &c) == TV_OK && c == 0);
    const tv_prefix_cache_stats s = m.stats();
    CHECK(s.queries == 0 && s.cached_blocks == 0 && s.evictable_blocks == 0);
    CHECK(m.ok()) << tv_last_error();
}

namespace {

// Randomized run: every op through the C ABI, then the manager's own recount, and a shadow of the
// KV cache: per block, the token prefix the KV in its slots was computed from.
void random_run(int n_ops, int num_blocks, int bs, bool caching, int bits, uint64_t seed) {
    std::mt19937_64 rng(seed);
    auto rnd = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
    Bm m(num_blocks, bs, caching);
    CHECK(tv_block_manager_set_hash_bits(m.h, bits) == TV_OK);
    std::vector<Tokens> prefixes;
    for (int i = 0; i < 4; i++) {
        Tokens p((size_t)rnd(1, 4 * bs));
        for (auto &t : p) t = rnd(0, 3);
        prefixes.push_back(p);
    }
    struct S {
        Tokens tokens;
        int computed;
    };
    std::map<int64_t, S> seqs;
    std::vector<Tokens> kv((size_t)num_blocks);  // prefix the block's written slots depend on
    int64_t next_id = 0, n_cow = 0, n_no_space = 0;
    int failures_before = tvtest::g_failures;
    auto pick = [&]() {
        auto it = seqs.begin();
        std::advance(it, rnd(0, (int)seqs.size() - 1));
        return it->first;
    };
    for (int op = 0; op < n_ops && tvtest::g_failures == failures_before; op++) {
        const int kind = rnd(0, 9);
        if (seqs.empty() || kind <= 2) {  // allocate
            Tokens p = prefixes[(size_t)rnd(0, 3)];
            const int extra = rnd(0, 2 * bs);
            for (int i = 0; i < extra; i++) p.push_back(rnd(0, 3));
            const int free_before = m.free_blocks();
            int32_t cached = -1;
            const int rc = m.alloc(next_id, p, &cached);
            CHECK(rc == TV_OK || (rc == TV_NO_FREE_BLOCKS && m.free_blocks() == free_before)) << rc << tv_last_error();
            n_no_space += rc == TV_NO_FREE_BLOCKS;
            if (rc == TV_OK) {
                CHECK(cached % bs == 0 && cached < (int)p.size() && (caching || cached == 0));
                const Tokens t = m.table(next_id);
                for (int j = 0; j < cached / bs; j++)
                    CHECK(kv[(size_t)t[(size_t)j]] == Tokens(p.begin(), p.begin() + (j + 1) * bs)) << "hit on wrong KV";
                seqs[next_id++] = S{p, cached};
            } else if (!seqs.empty()) {
                const int64_t victim = pick();  // "preempt" one
                CHECK(m.free(victim) == TV_OK);
                seqs.erase(victim);
            }
        } else if (kind <= 4) {  // compute some of the uncomputed tokens ("run the forward")
            const int64_t id = pick();
            S &s = seqs[id];
            const int c = rnd(s.computed, (int)s.tokens.size());
            const Tokens t = m.table(id);
            const std::vector<int32_t> refs = m.refs();
            for (int p = s.computed; p < c; p++) {
                const int32_t b = t[(size_t)(p / bs)];
                CHECK(refs[(size_t)b] == 1) << "writing into a shared block " << b;
                Tokens &k = kv[(size_t)b];
                if (p % bs == 0) k.assign(s.tokens.begin(), s.tokens.begin() + p);
                CHECK(k == Tokens(s.tokens.begin(), s.tokens.begin() + p)) << "block holds another prefix";
                k.push_back(s.tokens[(size_t)p]);
            }
            for (int p = 0; p < c; p += bs) {  // what attention reads
                const Tokens &k = kv[(size_t)t[(size_t)(p / bs)]];
                const size_t end = (size_t)std::min(p + bs, c);
                CHECK(k.size() >= end && std::equal(s.tokens.begin(), s.tokens.begin() + end, k.begin())) << "reads wrong KV";
            }
            CHECK(m.mark(id, c) == TV_OK) << tv_last_error();
            s.computed = c;
        } else if (kind <= 6) {  // append (decode or a few tokens)
            const int64_t id = pick();
            S &s = seqs[id];
            if ((int)s.tokens.size() > 8 * bs) {
                CHECK(m.free(id) == TV_OK);
                seqs.erase(id);
                continue;
            }
            Tokens add((size_t)rnd(1, bs + 1));
            for (auto &t : add) t = rnd(0, 3);
            const Tokens before = m.table(id);
            const int free_before = m.free_blocks();
            std::vector<int32_t> cow;
            const int rc = m.append(id, add, &cow);
            CHECK(rc == TV_OK || (rc == TV_NO_FREE_BLOCKS && m.free_blocks() == free_before)) << rc << tv_last_error();
            if (rc == TV_OK) {
                const Tokens after = m.table(id);
                if (!cow.empty()) {
                    CHECK(s.tokens.size() % bs != 0 && cow[0] == before.back() && cow[1] == after[before.size() - 1]);
                    kv[(size_t)cow[1]] = kv[(size_t)cow[0]];
                    n_cow++;
                } else {
                    CHECK(std::equal(before.begin(), before.end(), after.begin()));
                }
                s.tokens.insert(s.tokens.end(), add.begin(), add.end());
            } else {
                CHECK(m.table(id) == before && cow.empty());
            }
        } else if (kind == 7) {  // fork a fully computed sequence
            const int64_t id = pick();
            if (seqs[id].computed == (int)seqs[id].tokens.size()) {
                CHECK(m.fork(id, next_id) == TV_OK);
                CHECK(m.table(id) == m.table(next_id));
                seqs[next_id++] = seqs[id];
            }
        } else if (kind == 8) {  // free
            const int64_t id = pick();
            CHECK(m.free(id) == TV_OK);
            seqs.erase(id);
        } else {  // invalid calls change nothing
            CHECK(m.free(next_id + 5) == TV_ERR_INVALID);
            CHECK(m.mark(pick(), -1) == TV_ERR_INVALID);
        }
        CHECK(tv_block_manager_check(m.h) == TV_OK) << "op " << op << ": " << tv_last_error();
        CHECK(tv_block_manager_num_seqs(m.h) == (int)seqs.size());
    }
    const tv_prefix_cache_stats st = m.stats();  // the run exercised every path
    CHECK((n_cow > 0 || bs == 1) && n_no_space > 0) << n_cow << " " << n_no_space;  // bs 1: no partial blocks
    CHECK(!caching || (st.hit_blocks > 0 && st.evictions > 0)) << st.hit_blocks << " " << st.evictions;
    for (auto &kv_ : seqs) CHECK(m.free(kv_.first) == TV_OK);
    CHECK(m.free_blocks() == num_blocks) << "leak";
    const std::vector<int32_t> refs = m.refs();
    CHECK(std::count(refs.begin(), refs.end(), 0) == num_blocks);
    CHECK(m.ok()) << tv_last_error();
}

}  // namespace

TEST(block_manager_randomized) {
    // 10^5 ops in all (the CI runs this under ASan too)
    random_run(30000, 24, 4, true, 64, 1);
    random_run(30000, 24, 4, true, 2, 2);   // constant collisions
    random_run(20000, 16, 1, true, 1, 3);   // block_size 1
    random_run(20000, 24, 3, false, 64, 4);
}
