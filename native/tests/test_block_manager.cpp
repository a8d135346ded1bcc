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
    Bm(int nb, int bs, bool pc = true) {
        CHECK(tv_block_manager_create(nb, bs, pc, &h) == TV_OK) << tv_last_error();
    }
    ~Bm() { tv_block_manager_free(h); }
    int alloc(int64_t id, const Tokens &t, int32_t *cached = nullptr) {
        int32_t c = -1;
        const int rc = tv_block_manager_allocate(h, id, t.data(), (int32_t)t.size(), &c);
        if (cached) *cached = c;
        return rc;
    }
    int append(int64_t id, const Tokens &t, std::vector<int32_t> *cow = nullptr) {
        int32_t pairs[2] = {-1, -1}, n = -1;
        const int rc = tv_block_manager_append_slots(h, id, t.data(), (int32_t)t.size(), pairs, 1, &n);
        if (cow) cow->assign(pairs, pairs + 2 * std::max(n, 0));
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
    CHECK(tv_block_manager_free_seq(m.h, 7) == TV_OK);
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
    CHECK(tv_block_manager_allocate(m.h, 1, t.data(), 0, &c) == TV_ERR_INVALID);   // empty prompt
    CHECK(tv_block_manager_allocate(m.h, 1, t.data(), -3, &c) == TV_ERR_INVALID);
    CHECK(tv_block_manager_allocate(m.h, 1, nullptr, 6, &c) == TV_ERR_INVALID);
    CHECK(tv_block_manager_allocate(m.h, 1, t.data(), 6, nullptr) == TV_ERR_INVALID);
    CHECK(tv_block_manager_can_allocate(m.h, t.data(), 0) == TV_ERR_INVALID);
    CHECK(m.alloc(1, t) == TV_OK);
    CHECK(tv_last_error()[0] == '\0') << "success clears the last error";
    CHECK(m.alloc(1, t) == TV_ERR_INVALID) << "id in use";
    CHECK(std::strstr(tv_last_error(), "already") != nullptr) << tv_last_error();
    int32_t pairs[2], n;
    CHECK(tv_block_manager_append_slots(m.h, 1, t.data(), -1, pairs, 1, &n) == TV_ERR_INVALID);
    CHECK(tv_block_manager_append_slots(m.h, 1, nullptr, 2, pairs, 1, &n) == TV_ERR_INVALID);
    CHECK(tv_block_manager_append_slots(m.h, 1, t.data(), 1, pairs, 1, nullptr) == TV_ERR_INVALID);
    CHECK(tv_block_manager_append_slots(m.h, 1, t.data(), 1, nullptr, 1, &n) == TV_ERR_INVALID);
    CHECK(tv_block_manager_append_slots(m.h, 99, t.data(), 1, pairs, 1, &n) == TV_ERR_INVALID);
    CHECK(tv_block_manager_can_append_slots(m.h, 1, -1) == TV_ERR_INVALID);
    CHECK(tv_block_manager_can_append_slots(m.h, 99, 1) == TV_ERR_INVALID);
    CHECK(tv_block_manager_mark_computed(m.h, 1, 7) == TV_ERR_INVALID);  // more than its tokens
    CHECK(tv_block_manager_mark_computed(m.h, 1, 5) == TV_OK);
    CHECK(tv_block_manager_mark_computed(m.h, 1, 4) == TV_ERR_INVALID);  // decreasing
    CHECK(tv_block_manager_mark_computed(m.h, 99, 0) == TV_ERR_INVALID);
    Tokens out(1);
    CHECK(tv_block_manager_get_block_table(m.h, 1, out.data(), 1) == TV_ERR_INVALID);  // has 2 blocks
    CHECK(tv_block_manager_get_block_table(m.h, 1, nullptr, 8) == TV_ERR_INVALID);
    CHECK(tv_block_manager_get_block_table(m.h, 42, out.data(), 1) == TV_ERR_INVALID);
    CHECK(tv_block_manager_block_info(m.h, out.data(), nullptr, 1) == TV_ERR_INVALID);
    CHECK(tv_block_manager_fork(m.h, 1, 1) == TV_ERR_INVALID);
    CHECK(tv_block_manager_fork(m.h, 5, 6) == TV_ERR_INVALID);
    CHECK(tv_block_manager_prefix_cache_stats(m.h, nullptr) == TV_ERR_INVALID);
    CHECK(tv_block_manager_set_hash_bits(m.h, 0) == TV_ERR_INVALID);
    CHECK(tv_block_manager_set_hash_bits(m.h, 65) == TV_ERR_INVALID);
    CHECK(tv_block_manager_set_hash_bits(m.h, 8) == TV_ERR_INVALID) << "a block is cached";
    CHECK(tv_block_manager_seq_info(m.h, 3, nullptr, nullptr, nullptr) == TV_ERR_INVALID);
    // a CoW needs room for one pair
    CHECK(tv_block_manager_fork(m.h, 1, 2) == TV_OK);
    CHECK(tv_block_manager_append_slots(m.h, 2, t.data(), 1, nullptr, 0, &n) == TV_ERR_INVALID);
    CHECK(std::strstr(tv_last_error(), "cow") != nullptr) << tv_last_error();
    CHECK(tv_block_manager_free_seq(m.h, 1) == TV_OK);
    CHECK(tv_block_manager_free_seq(m.h, 1) == TV_ERR_INVALID) << "double free";
    CHECK(std::strstr(tv_last_error(), "unknown sequence id 1") != nullptr) << tv_last_error();
    CHECK(tv_block_manager_free_seq(m.h, 2) == TV_OK);
    CHECK(m.free_blocks() == 4);
    CHECK(m.ok()) << tv_last_error();
}

TEST(block_manager_out_of_blocks_changes_nothing) {
    Bm m(3, 4);
    CHECK(m.alloc(1, seq_tokens(8, 0)) == TV_OK);
    CHECK(tv_block_manager_can_allocate(m.h, seq_tokens(5, 100).data(), 5) == 0);
    int32_t c = -1;
    CHECK(m.alloc(2, seq_tokens(5, 100), &c) == TV_NO_FREE_BLOCKS);
    CHECK(c == 0 && tv_block_manager_has_seq(m.h, 2) == 0);
    CHECK(tv_last_error()[0] == '\0') << "not an error";
    CHECK(tv_block_manager_can_append_slots(m.h, 1, 4) == 1);
    CHECK(tv_block_manager_can_append_slots(m.h, 1, 5) == 0);
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

TEST(block_manager_prefix_hit_only_after_compute) {
    Bm m(16, 4);
    const Tokens p = seq_tokens(14, 0);  // 3 full blocks + 2
    int32_t c = -1;
    CHECK(m.alloc(1, p, &c) == TV_OK && c == 0);
    CHECK(m.alloc(2, p, &c) == TV_OK && c == 0) << "nothing computed yet: nothing cached";
    CHECK(tv_block_manager_mark_computed(m.h, 1, 9) == TV_OK);  // blocks 0, 1 full and computed
    CHECK(m.stats().cached_blocks == 2);
    CHECK(m.alloc(3, p, &c) == TV_OK && c == 8);
    const Tokens t1 = m.table(1), t3 = m.table(3);
    CHECK(t3[0] == t1[0] && t3[1] == t1[1] && t3[2] != t1[2]);
    CHECK(m.refs()[(size_t)t1[0]] == 2);
    int32_t nc = 0;
    tv_block_manager_seq_info(m.h, 3, nullptr, nullptr, &nc);
    CHECK(nc == 8) << "cached tokens count as computed";
    CHECK(tv_block_manager_mark_computed(m.h, 1, 14) == TV_OK);
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
    CHECK(tv_block_manager_mark_computed(m.h, 1, 8) == TV_OK);
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
    CHECK(tv_block_manager_mark_computed(m.h, 1, 6) == TV_OK);
    CHECK(tv_block_manager_fork(m.h, 1, 2) == TV_OK);
    CHECK(m.table(2) == m.table(1));
    CHECK((m.refs() == std::vector<int32_t>{2, 2, 0, 0, 0, 0, 0, 0}));
    CHECK(tv_block_manager_can_append_slots(m.h, 2, 1) == 1);
    std::vector<int32_t> cow;
    CHECK(m.append(2, {50}, &cow) == TV_OK);
    CHECK((cow == std::vector<int32_t>{1, 2})) << "copy block 1 into a new block 2";
    CHECK((m.table(2) == Tokens{0, 2}));
    CHECK((m.table(1) == Tokens{0, 1}));
    CHECK(m.append(1, {60}, &cow) == TV_OK);
    CHECK(cow.empty()) << "block 1 is the parent's alone now";
    // full last block shared: new tokens go to a new block, no copy
    CHECK(m.append(1, {61, 62}, &cow) == TV_OK && cow.empty());  // 9 tokens: block 1 full, new block 3
    CHECK(tv_block_manager_mark_computed(m.h, 1, 8) == TV_OK);
    CHECK(tv_block_manager_fork(m.h, 1, 3) == TV_OK);
    CHECK(m.append(3, {70}, &cow) == TV_OK);
    CHECK(cow.size() == 2 && cow[0] == 3) << "block 3 (1 token) is shared";
    // no room for the copy: nothing happens
    Bm s(2, 4);
    CHECK(s.alloc(1, seq_tokens(2, 0)) == TV_OK);
    CHECK(tv_block_manager_fork(s.h, 1, 2) == TV_OK);
    CHECK(s.alloc(3, seq_tokens(1, 9)) == TV_OK);
    CHECK(tv_block_manager_can_append_slots(s.h, 2, 1) == 0);
    CHECK(s.append(2, {5}, &cow) == TV_NO_FREE_BLOCKS && cow.empty());
    CHECK((s.refs() == std::vector<int32_t>{2, 1}));
    CHECK(m.ok() && s.ok()) << tv_last_error();
}

TEST(block_manager_eviction_lru_order) {
    Bm m(6, 2);
    // A: blocks 0,1,2 (3 full blocks + nothing), B: 3,4 ; all computed and cached
    CHECK(m.alloc(1, seq_tokens(6, 0)) == TV_OK);
    CHECK(m.alloc(2, seq_tokens(4, 100)) == TV_OK);
    CHECK(tv_block_manager_mark_computed(m.h, 1, 6) == TV_OK);
    CHECK(tv_block_manager_mark_computed(m.h, 2, 4) == TV_OK);
    CHECK(m.stats().cached_blocks == 5);
    CHECK(tv_block_manager_free_seq(m.h, 1) == TV_OK);  // LRU: 2, 1, 0
    CHECK(tv_block_manager_free_seq(m.h, 2) == TV_OK);  // LRU: 2, 1, 0, 4, 3
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
    CHECK(tv_block_manager_can_allocate(m.h, seq_tokens(3, 100).data(), 3) == 0) << "hit revives 3: no block left";
    CHECK(m.ok()) << tv_last_error();
}

TEST(block_manager_hit_on_evictable_counts_against_free) {
    Bm m(3, 2);
    CHECK(m.alloc(1, seq_tokens(5, 0)) == TV_OK);
    CHECK(tv_block_manager_mark_computed(m.h, 1, 5) == TV_OK);
    CHECK(tv_block_manager_free_seq(m.h, 1) == TV_OK);
    CHECK(m.free_blocks() == 3);
    // 5 tokens: hits blocks 0, 1 (evictable) and needs 1 more: fits exactly
    CHECK(tv_block_manager_can_allocate(m.h, seq_tokens(5, 0).data(), 5) == 1);
    Tokens p = seq_tokens(7, 0);  // hits 0, 1 (2 blocks... (7-1)/2 = 3 lookups, block 2 is not cached: partial)
    CHECK(tv_block_manager_can_allocate(m.h, p.data(), 7) == 0) << "4 blocks needed, 3 exist";
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
        CHECK(tv_block_manager_mark_computed(m.h, 1, 5) == TV_OK);
        int32_t c = -1;
        CHECK(m.alloc(2, {9, 9, 3, 4, 5}, &c) == TV_OK && c == 0) << bits;
        CHECK(tv_block_manager_mark_computed(m.h, 2, 5) == TV_OK);
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
    CHECK(tv_block_manager_mark_computed(m.h, 1, 3) == TV_OK);  // caches 0 = [1 2]
    CHECK(tv_block_manager_mark_computed(m.h, 2, 5) == TV_OK);  // caches 3 = [1 2][3 4]; 2 is a duplicate
    CHECK(m.stats().cached_blocks == 2);
    CHECK(tv_block_manager_free_seq(m.h, 1) == TV_OK);          // 0 evictable, 1 free
    CHECK(m.alloc(3, seq_tokens(10, 50)) == TV_OK);              // 5 blocks: 1, 5, 6, 7 and evicts 0
    CHECK((m.table(3) == Tokens{1, 5, 6, 7, 0}));
    CHECK(m.stats().evictions == 1 && m.stats().cached_blocks == 1);
    CHECK(tv_block_manager_free_seq(m.h, 3) == TV_OK);
    int32_t c = -1;
    CHECK(m.alloc(4, {1, 2, 3, 4, 5}, &c) == TV_OK && c == 0) << "[1 2] is gone, so nothing after it matches";
    CHECK((m.table(4) == Tokens{1, 5, 6}));
    CHECK(tv_block_manager_mark_computed(m.h, 4, 5) == TV_OK);  // caches 1 = [1 2] again
    CHECK(m.alloc(5, {1, 2, 3, 4, 5}, &c) == TV_OK && c == 4);
    CHECK((m.table(5) == Tokens{1, 3, 7})) << "block 3 found again under the recomputed parent";
    CHECK(m.ok()) << tv_last_error();
}

TEST(block_manager_duplicates_not_cached_twice) {
    Bm m(8, 2);
    const Tokens p = {1, 2, 3, 4, 5};
    CHECK(m.alloc(1, p) == TV_OK);
    CHECK(m.alloc(2, p) == TV_OK);  // computed concurrently: same content in different blocks
    CHECK(tv_block_manager_mark_computed(m.h, 1, 5) == TV_OK);
    CHECK(tv_block_manager_mark_computed(m.h, 2, 5) == TV_OK);
    CHECK(m.stats().cached_blocks == 2);
    CHECK(tv_block_manager_free_seq(m.h, 1) == TV_OK);
    CHECK(tv_block_manager_free_seq(m.h, 2) == TV_OK);
    CHECK(m.free_blocks() == 8);
    CHECK(m.stats().evictable_blocks == 2);
    int32_t c = -1;
    CHECK(m.alloc(3, p, &c) == TV_OK && c == 4);
    CHECK((m.table(3) == Tokens{0, 1, 3})) << "seq 1's blocks 0 and 1 (seq 2's were not cached), then the free stack";
    CHECK(m.ok()) << tv_last_error();
}

TEST(block_manager_prefix_caching_off) {
    Bm m(4, 2, false);
    CHECK(m.alloc(1, {1, 2, 3}) == TV_OK);
    CHECK(tv_block_manager_mark_computed(m.h, 1, 3) == TV_OK);
    CHECK(tv_block_manager_free_seq(m.h, 1) == TV_OK);
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
            const int can = tv_block_manager_can_allocate(m.h, p.data(), (int32_t)p.size());
            int32_t cached = -1;
            const int rc = m.alloc(next_id, p, &cached);
            CHECK((rc == TV_OK) == (can == 1)) << rc << " " << can;
            n_no_space += rc == TV_NO_FREE_BLOCKS;
            if (rc == TV_OK) {
                CHECK(cached % bs == 0 && cached < (int)p.size() && (caching || cached == 0));
                const Tokens t = m.table(next_id);
                for (int j = 0; j < cached / bs; j++)
                    CHECK(kv[(size_t)t[(size_t)j]] == Tokens(p.begin(), p.begin() + (j + 1) * bs)) << "hit on wrong KV";
                seqs[next_id++] = S{p, cached};
            } else if (!seqs.empty()) {
                const int64_t victim = pick();  // "preempt" one
                CHECK(tv_block_manager_free_seq(m.h, victim) == TV_OK);
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
            CHECK(tv_block_manager_mark_computed(m.h, id, c) == TV_OK) << tv_last_error();
            s.computed = c;
        } else if (kind <= 6) {  // append (decode or a few tokens)
            const int64_t id = pick();
            S &s = seqs[id];
            if ((int)s.tokens.size() > 8 * bs) {
                CHECK(tv_block_manager_free_seq(m.h, id) == TV_OK);
                seqs.erase(id);
                continue;
            }
            Tokens add((size_t)rnd(1, bs + 1));
            for (auto &t : add) t = rnd(0, 3);
            const Tokens before = m.table(id);
            const int can = tv_block_manager_can_append_slots(m.h, id, (int32_t)add.size());
            std::vector<int32_t> cow;
            const int rc = m.append(id, add, &cow);
            CHECK((rc == TV_OK) == (can == 1));
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
                CHECK(tv_block_manager_fork(m.h, id, next_id) == TV_OK);
                CHECK(m.table(id) == m.table(next_id));
                seqs[next_id++] = seqs[id];
            }
        } else if (kind == 8) {  // free
            const int64_t id = pick();
            CHECK(tv_block_manager_free_seq(m.h, id) == TV_OK);
            seqs.erase(id);
        } else {  // invalid calls change nothing
            CHECK(tv_block_manager_free_seq(m.h, next_id + 5) == TV_ERR_INVALID);
            CHECK(tv_block_manager_mark_computed(m.h, pick(), -1) == TV_ERR_INVALID);
        }
        CHECK(tv_block_manager_check(m.h) == TV_OK) << "op " << op << ": " << tv_last_error();
        CHECK(tv_block_manager_num_seqs(m.h) == (int)seqs.size());
    }
    const tv_prefix_cache_stats st = m.stats();  // the run exercised every path
    CHECK((n_cow > 0 || bs == 1) && n_no_space > 0) << n_cow << " " << n_no_space;  // bs 1: no partial blocks
    CHECK(!caching || (st.hit_blocks > 0 && st.evictions > 0)) << st.hit_blocks << " " << st.evictions;
    for (auto &kv_ : seqs) CHECK(tv_block_manager_free_seq(m.h, kv_.first) == TV_OK);
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
