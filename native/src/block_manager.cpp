// The paged-KV block manager (see block_manager.h) and its C ABI (tv_block_manager_*).
#include "block_manager.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>

#include "c_api.h"
#include "common.h"

namespace tv {

namespace {

inline uint64_t mix64(uint64_t x) {  // splitmix64 finalizer
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

inline int32_t div_up(int64_t a, int32_t b) { return (int32_t)((a + b - 1) / b); }

[[noreturn]] void broken(const std::string &what) { throw std::logic_error("block manager invariant: " + what); }

}  // namespace

BlockManager::BlockManager(int32_t num_blocks, int32_t block_size, bool enable_prefix_caching)
    : block_size_(block_size), caching_(enable_prefix_caching) {
    if (num_blocks <= 0 || block_size <= 0)
        fail("tv_block_manager_create: num_blocks (%d) and block_size (%d) must be > 0", num_blocks, block_size);
    blocks_.resize((size_t)num_blocks);
    free_.reserve((size_t)num_blocks);
    for (int32_t b = num_blocks - 1; b >= 0; b--) free_.push_back(b);
}

BlockManager::Seq &BlockManager::seq_mut(int64_t id) {
    auto it = seqs_.find(id);
    if (it == seqs_.end()) fail("block manager: unknown sequence id %lld (never allocated, or already freed)", (long long)id);
    return it->second;
}

const BlockManager::Seq &BlockManager::seq(int64_t id) const { return const_cast<BlockManager *>(this)->seq_mut(id); }

// ---- prefix-cache nodes ------------------------------------------------------------------------

uint64_t BlockManager::hash_of(uint64_t parent_hash, const int32_t *t) const {
    uint64_t h = mix64(parent_hash ^ 0x9e3779b97f4a7c15ull);
    for (int32_t i = 0; i < block_size_; i++) h = mix64(h ^ (uint32_t)t[i]);
    return h & hash_mask_;
}

int32_t BlockManager::find_node(int32_t parent, const int32_t *t, uint64_t h) const {
    auto range = index_.equal_range(h);
    for (auto it = range.first; it != range.second; ++it) {
        const int32_t n = it->second;
        if (nodes_[n].parent == parent &&
            std::memcmp(&node_tokens_[(size_t)n * block_size_], t, sizeof(int32_t) * block_size_) == 0)
            return n;
    }
    return -1;
}

int32_t BlockManager::find_or_add_node(int32_t parent, const int32_t *t) {
    const uint64_t h = hash_of(parent < 0 ? 0 : nodes_[parent].hash, t);
    int32_t n = find_node(parent, t, h);
    if (n >= 0) return n;
    if (!free_nodes_.empty()) {
        n = free_nodes_.back();
        free_nodes_.pop_back();
    } else {  // grow everything first, so a bad_alloc leaves no half-made node behind
        node_tokens_.resize(node_tokens_.size() + (size_t)block_size_);
        free_nodes_.reserve(nodes_.size() + 1);
        nodes_.emplace_back();
        n = (int32_t)nodes_.size() - 1;
    }
    try {
        index_.emplace(h, n);
    } catch (...) {
        free_nodes_.push_back(n);  // capacity reserved: cannot throw
        throw;
    }
    nodes_[n] = Node{h, parent, -1, 0};
    std::memcpy(&node_tokens_[(size_t)n * block_size_], t, sizeof(int32_t) * block_size_);
    if (parent >= 0) nodes_[parent].refs++;
    return n;
}

void BlockManager::unref_node(int32_t n) {
    while (n >= 0 && --nodes_[n].refs == 0) {
        auto range = index_.equal_range(nodes_[n].hash);
        for (auto it = range.first; it != range.second; ++it)
            if (it->second == n) {
                index_.erase(it);
                break;
            }
        const int32_t parent = nodes_[n].parent;
        nodes_[n] = Node{};
        free_nodes_.push_back(n);
        n = parent;
    }
}

void BlockManager::lookup(const int32_t *tokens, int32_t n, std::vector<int32_t> &hit_nodes) const {
    hit_nodes.clear();
    if (!caching_) return;
    const int32_t max_blocks = (n - 1) / block_size_;
    int32_t parent = -1;
    uint64_t parent_hash = 0;
    for (int32_t j = 0; j < max_blocks; j++) {
        const int32_t *t = tokens + (size_t)j * block_size_;
        const uint64_t h = hash_of(parent_hash, t);
        const int32_t node = find_node(parent, t, h);
        if (node < 0 || nodes_[node].block < 0) break;
        hit_nodes.push_back(node);
        parent = node;
        parent_hash = h;
    }
}

// ---- blocks ------------------------------------------------------------------------------------

void BlockManager::lru_push(int32_t b) {
    Block &blk = blocks_[b];
    blk.prev = lru_tail_;
    blk.next = -1;
    blk.in_lru = true;
    if (lru_tail_ >= 0) blocks_[lru_tail_].next = b; else lru_head_ = b;
    lru_tail_ = b;
    lru_size_++;
}

void BlockManager::lru_remove(int32_t b) {
    Block &blk = blocks_[b];
    if (blk.prev >= 0) blocks_[blk.prev].next = blk.next; else lru_head_ = blk.next;
    if (blk.next >= 0) blocks_[blk.next].prev = blk.prev; else lru_tail_ = blk.prev;
    blk.prev = blk.next = -1;
    blk.in_lru = false;
    lru_size_--;
}

// Precondition (callers check num_free_blocks first): a free or evictable block exists.
int32_t BlockManager::take_block() {
    int32_t b;
    if (!free_.empty()) {
        b = free_.back();
        free_.pop_back();
    } else {
        b = lru_head_;
        if (b < 0) broken("take_block with no free block");
        lru_remove(b);
        const int32_t n = blocks_[b].node;
        nodes_[n].block = -1;
        blocks_[b].node = -1;
        cached_blocks_--;
        stats_.evictions++;
        unref_node(n);
    }
    blocks_[b].ref = 1;
    return b;
}

void BlockManager::release_block(int32_t b) {
    if (--blocks_[b].ref > 0) return;
    if (blocks_[b].node >= 0) lru_push(b); else free_.push_back(b);
}

// ---- operations --------------------------------------------------------------------------------

bool BlockManager::allocate(int64_t id, const int32_t *tokens, int32_t n, int32_t *num_cached, bool use_cache) {
    if (n < 1) fail("ALLOCATE: num_tokens must be >= 1 (got %d)", n);
    if (!tokens) fail("ALLOCATE: tokens is null");
    if (has_seq(id)) fail("ALLOCATE: sequence id %lld is already allocated", (long long)id);
    std::vector<int32_t> hits;
    if (use_cache) lookup(tokens, n, hits);
    int32_t revived = 0;  // evictable hits stop being available once shared
    for (int32_t node : hits) revived += blocks_[nodes_[node].block].ref == 0;
    const int32_t need = div_up(n, block_size_) - (int32_t)hits.size();
    if (need > num_free_blocks() - revived) return false;

    Seq s;  // built aside (allocations may throw), then committed without further throws
    s.table.reserve((size_t)div_up(n, block_size_));
    s.nodes = hits;
    auto slot = seqs_.emplace(id, Seq{}).first;
    // Revive the hits before taking new blocks, so an eviction can never take a block just hit.
    for (int32_t node : hits) {
        const int32_t b = nodes_[node].block;
        if (blocks_[b].ref == 0) lru_remove(b);
        blocks_[b].ref++;
        nodes_[node].refs++;
        s.table.push_back(b);
    }
    for (int32_t i = 0; i < need; i++) s.table.push_back(take_block());
    s.num_tokens = n;
    s.computed = (int32_t)hits.size() * block_size_;
    slot->second = std::move(s);
    *num_cached = (int32_t)hits.size() * block_size_;
    if (caching_ && use_cache) {
        stats_.queries++;
        stats_.query_tokens += n;
        stats_.hit_tokens += *num_cached;
        stats_.query_blocks += (n - 1) / block_size_;
        stats_.hit_blocks += (int64_t)hits.size();
    }
    return true;
}

bool BlockManager::needs_copy(const Seq &s, int32_t num_tokens) const {
    return num_tokens > s.num_tokens && s.num_tokens % block_size_ != 0 && blocks_[s.table.back()].ref > 1;
}

int BlockManager::append_slots(int64_t id, int32_t num_tokens, int32_t *cow) {
    Seq &s = seq_mut(id);
    if (num_tokens < s.num_tokens)
        fail("APPEND: sequence %lld: num_tokens %d is below its %d slots (slots are never given back)", (long long)id,
             num_tokens, s.num_tokens);
    const bool need_cow = needs_copy(s, num_tokens);
    const int32_t new_blocks = div_up(num_tokens, block_size_) - (int32_t)s.table.size();
    if (new_blocks + (need_cow ? 1 : 0) > num_free_blocks()) return -1;
    s.table.reserve(s.table.size() + (size_t)new_blocks);  // the only allocation; nothing changed yet
    if (need_cow) {
        const int32_t src = s.table.back(), dst = take_block();
        blocks_[src].ref--;  // still >= 1: it was shared
        s.table.back() = dst;
        cow[0] = src;
        cow[1] = dst;
    }
    for (int32_t i = 0; i < new_blocks; i++) s.table.push_back(take_block());
    s.num_tokens = num_tokens;
    return need_cow ? 1 : 0;
}

void BlockManager::mark_computed(int64_t id, int32_t c, const int32_t *tokens) {
    Seq &s = seq_mut(id);
    if (c < s.computed || c > s.num_tokens)
        fail("sequence %lld: num_computed %d outside [%d, %d] (it never decreases and cannot pass the slot count)",
             (long long)id, c, s.computed, s.num_tokens);
    if (caching_ && (int64_t)(s.nodes.size() + 1) * block_size_ <= c) {
        if (!tokens) fail("sequence %lld: marking %d computed completes a block, and tokens is null", (long long)id, c);
        s.nodes.reserve((size_t)(c / block_size_));
        for (int32_t j = (int32_t)s.nodes.size(); (int64_t)(j + 1) * block_size_ <= c; j++) {
            const int32_t node = find_or_add_node(j ? s.nodes[j - 1] : -1, tokens + (size_t)j * block_size_);
            nodes_[node].refs++;
            s.nodes.push_back(node);
            const int32_t b = s.table[j];
            if (nodes_[node].block < 0 && blocks_[b].node < 0) {  // first block with this content: cache it
                nodes_[node].block = b;
                nodes_[node].refs++;
                blocks_[b].node = node;
                cached_blocks_++;
            }
        }
    }
    s.computed = c;
}

void BlockManager::truncate(int64_t id, int32_t num_tokens) {
    Seq &s = seq_mut(id);
    if (num_tokens < s.computed || num_tokens > s.num_tokens)
        fail("TRUNCATE: sequence %lld: num_tokens %d outside [%d computed, %d slots]", (long long)id, num_tokens,
             s.computed, s.num_tokens);
    const size_t keep = (size_t)div_up(num_tokens, block_size_);
    // a kept block is never cached past `computed`, and every dropped one lies wholly past it
    for (size_t i = s.table.size(); i-- > keep;) release_block(s.table[i]);
    s.table.resize(keep);
    s.num_tokens = num_tokens;
}

void BlockManager::fork(int64_t parent, int64_t child) {
    const Seq &p = seq(parent);
    if (has_seq(child)) fail("FORK: child id %lld is already allocated", (long long)child);
    const Seq &c = seqs_.emplace(child, p).first->second;
    for (int32_t b : c.table) blocks_[b].ref++;
    for (int32_t n : c.nodes) nodes_[n].refs++;
}

void BlockManager::free_seq(int64_t id) {
    Seq &s = seq_mut(id);
    for (size_t i = s.table.size(); i-- > 0;) release_block(s.table[i]);  // tail first: evicted first
    for (int32_t n : s.nodes) unref_node(n);
    seqs_.erase(id);
}

bool BlockManager::apply(tv_block_op *ops, int32_t n, int32_t *tables, int32_t max_blocks, int32_t *cow,
                         int32_t cow_cap, int32_t *n_cow, int32_t *n_done) {
    if (!n_done || !n_cow) fail("tv_block_manager_apply: n_done or n_cow is null");
    *n_done = *n_cow = 0;
    if (n < 0 || (n > 0 && !ops)) fail("tv_block_manager_apply: ops is null or n_ops (%d) < 0", n);
    if (cow_cap < 0 || (cow_cap > 0 && !cow)) fail("tv_block_manager_apply: cow_pairs is null or cow_cap (%d) < 0", cow_cap);
    if (max_blocks < 0) fail("tv_block_manager_apply: max_blocks (%d) < 0", max_blocks);
    for (int32_t i = 0; i < n; *n_done = ++i) {
        tv_block_op &op = ops[i];
        const bool writes_table = op.kind == TV_BLOCK_ALLOCATE || op.kind == TV_BLOCK_ALLOCATE_UNCACHED ||
                                  op.kind == TV_BLOCK_APPEND;
        if (writes_table && op.table_row >= 0 && !tables) fail("op %d: table_row %d and tables is null", i, op.table_row);
        switch (op.kind) {
        case TV_BLOCK_ALLOCATE:
        case TV_BLOCK_ALLOCATE_UNCACHED:
            if (!allocate(op.seq_id, op.tokens, op.num_tokens, &op.num_computed, op.kind == TV_BLOCK_ALLOCATE))
                return false;
            break;
        case TV_BLOCK_APPEND: {
            mark_computed(op.seq_id, op.num_computed, op.tokens);
            if (*n_cow >= cow_cap && needs_copy(seq(op.seq_id), op.num_tokens))
                fail("op %d: sequence %lld needs a copy-on-write pair and cow_pairs is full (%d pairs)", i,
                     (long long)op.seq_id, cow_cap);
            const int copies = append_slots(op.seq_id, op.num_tokens, cow + 2 * (size_t)*n_cow);
            if (copies < 0) return false;
            *n_cow += copies;
            break;
        }
        case TV_BLOCK_TRUNCATE:
            mark_computed(op.seq_id, op.num_computed, op.tokens);
            truncate(op.seq_id, op.num_tokens);
            break;
        case TV_BLOCK_FORK:
            fork(op.parent_id, op.seq_id);
            break;
        case TV_BLOCK_FREE:
            mark_computed(op.seq_id, op.num_computed, op.tokens);
            free_seq(op.seq_id);
            break;
        default:
            fail("op %d: unknown kind %d", i, op.kind);
        }
        if (writes_table && op.table_row >= 0) {
            const Seq &s = seq(op.seq_id);
            const int32_t len = (int32_t)s.table.size();
            if (len > max_blocks) fail("op %d: sequence %lld has %d blocks, max_blocks is %d", i, (long long)op.seq_id, len, max_blocks);
            int32_t *row = tables + (size_t)op.table_row * (size_t)max_blocks;
            std::memcpy(row, s.table.data(), sizeof(int32_t) * (size_t)len);
            std::fill(row + len, row + max_blocks, 0);
        }
    }
    return true;
}

// ---- inspection --------------------------------------------------------------------------------

void BlockManager::block_info(int32_t *refs, int32_t *cached, int32_t cap) const {
    if (cap < num_blocks() && (refs || cached))
        fail("tv_block_manager_block_info: cap %d < num_blocks %d", cap, num_blocks());
    for (int32_t b = 0; b < num_blocks(); b++) {
        if (refs) refs[b] = blocks_[b].ref;
        if (cached) cached[b] = blocks_[b].node >= 0;
    }
}

PrefixCacheStats BlockManager::stats() const {
    PrefixCacheStats s = stats_;
    s.cached_blocks = cached_blocks_;
    s.evictable_blocks = lru_size_;
    return s;
}

void BlockManager::set_hash_bits(int bits) {
    if (bits < 1 || bits > 64) fail("tv_block_manager_set_hash_bits: bits must be in [1, 64] (got %d)", bits);
    if (!index_.empty()) fail("tv_block_manager_set_hash_bits: the prefix cache must be empty");
    hash_mask_ = bits == 64 ? ~0ull : (1ull << bits) - 1;
}

void BlockManager::check_invariants() const {
    const int32_t nb = num_blocks();
    std::vector<int32_t> refs((size_t)nb, 0);
    std::vector<int32_t> node_refs(nodes_.size(), 0);
    for (const auto &[id, s] : seqs_) {
        if ((int64_t)s.table.size() != div_up((int64_t)s.num_tokens, block_size_)) broken("table size");
        if (s.computed < 0 || s.computed > s.num_tokens) broken("computed count");
        if ((int32_t)s.nodes.size() != (caching_ ? s.computed / block_size_ : 0)) broken("node list size");
        for (size_t j = 0; j < s.table.size(); j++) {
            const int32_t b = s.table[j];
            if (b < 0 || b >= nb) broken("table entry out of range");
            for (size_t k = 0; k < j; k++)
                if (s.table[k] == b) broken("block twice in one table");
            refs[(size_t)b]++;
        }
        for (size_t j = 0; j < s.nodes.size(); j++) {
            const int32_t n = s.nodes[j];
            if (n < 0 || (size_t)n >= nodes_.size()) broken("node id out of range");
            if (nodes_[n].parent != (j ? s.nodes[j - 1] : -1)) broken("sequence node chain");
            node_refs[(size_t)n]++;
        }
    }
    std::vector<char> is_free((size_t)nb, 0);
    for (int32_t b : free_) {
        if (b < 0 || b >= nb || is_free[(size_t)b]) broken("free stack entry");
        is_free[(size_t)b] = 1;
    }
    int32_t lru_count = 0, cached = 0;
    for (int32_t b = lru_head_, prev = -1; b >= 0; prev = b, b = blocks_[b].next) {
        if (blocks_[b].prev != prev || !blocks_[b].in_lru || ++lru_count > nb) broken("LRU links");
        if (b == lru_tail_ && blocks_[b].next != -1) broken("LRU tail");
    }
    if (lru_count != lru_size_) broken("LRU size");
    for (int32_t b = 0; b < nb; b++) {
        const Block &blk = blocks_[b];
        if (blk.ref != refs[(size_t)b]) broken("ref count of block " + std::to_string(b));
        if (is_free[(size_t)b] && (blk.ref || blk.node >= 0 || blk.in_lru)) broken("free block in use or cached");
        if (blk.in_lru && (blk.ref || blk.node < 0)) broken("evictable block in use or uncached");
        if (!blk.ref && !is_free[(size_t)b] && !blk.in_lru) broken("leaked block " + std::to_string(b));
        if (blk.node >= 0) {
            cached++;
            if ((size_t)blk.node >= nodes_.size() || nodes_[blk.node].block != b) broken("block <-> node link");
        }
    }
    if (cached != cached_blocks_) broken("cached block count");
    std::vector<char> node_free(nodes_.size(), 0);
    for (int32_t n : free_nodes_) node_free[(size_t)n] = 1;
    size_t live = 0;
    for (size_t n = 0; n < nodes_.size(); n++) {
        if (node_free[n]) continue;
        live++;
        const Node &nd = nodes_[n];
        if (nd.parent >= 0) node_refs[(size_t)nd.parent]++;
        if (nd.block >= 0) {
            node_refs[n]++;
            if (blocks_[nd.block].node != (int32_t)n) broken("node <-> block link");
        }
        if (find_node(nd.parent, &node_tokens_[n * block_size_], nd.hash) != (int32_t)n) broken("node not indexed");
        if (nd.hash != hash_of(nd.parent >= 0 ? nodes_[nd.parent].hash : 0, &node_tokens_[n * block_size_]))
            broken("node hash");
    }
    for (size_t n = 0; n < nodes_.size(); n++)
        if (!node_free[n] && nodes_[n].refs != node_refs[n]) broken("node ref count " + std::to_string(n));
    if (live != index_.size()) broken("index size");
}

}  // namespace tv

// ---- C ABI -------------------------------------------------------------------------------------

struct tv_block_manager {
    tv_block_manager(int32_t n, int32_t bs, bool pc) : m(n, bs, pc) {}
    tv::BlockManager m;
};

namespace {

template <class H>  // tv_block_manager, const or not
auto &mgr(H *bm, const char *f) {
    if (!bm) tv::fail("%s: block manager is null", f);
    return bm->m;
}

}  // namespace

extern "C" {

int tv_block_manager_create(int32_t num_blocks, int32_t block_size, int32_t enable_prefix_caching,
                            tv_block_manager **out) {
    return tv::guard([&] {
        if (!out) tv::fail("tv_block_manager_create: out is null");
        *out = nullptr;
        *out = new tv_block_manager(num_blocks, block_size, enable_prefix_caching != 0);
    });
}

void tv_block_manager_free(tv_block_manager *bm) { delete bm; }

int tv_block_manager_num_blocks(const tv_block_manager *bm) {
    return tv::guard([&] { return mgr(bm, "tv_block_manager_num_blocks").num_blocks(); });
}

int tv_block_manager_block_size(const tv_block_manager *bm) {
    return tv::guard([&] { return mgr(bm, "tv_block_manager_block_size").block_size(); });
}

int tv_block_manager_num_free_blocks(const tv_block_manager *bm) {
    return tv::guard([&] { return mgr(bm, "tv_block_manager_num_free_blocks").num_free_blocks(); });
}

int tv_block_manager_num_seqs(const tv_block_manager *bm) {
    return tv::guard([&] { return mgr(bm, "tv_block_manager_num_seqs").num_seqs(); });
}

int tv_block_manager_has_seq(const tv_block_manager *bm, int64_t seq_id) {
    return tv::guard([&] { return (int)mgr(bm, "tv_block_manager_has_seq").has_seq(seq_id); });
}

int tv_block_manager_apply(tv_block_manager *bm, tv_block_op *ops, int32_t n_ops, int32_t *tables, int32_t max_blocks,
                           int32_t *cow_pairs, int32_t cow_cap, int32_t *n_cow, int32_t *n_done) {
    return tv::guard([&] {
        return mgr(bm, "tv_block_manager_apply").apply(ops, n_ops, tables, max_blocks, cow_pairs, cow_cap, n_cow, n_done)
                   ? (int)TV_OK : (int)TV_NO_FREE_BLOCKS;
    });
}

int tv_block_manager_seq_info(const tv_block_manager *bm, int64_t seq_id, int32_t *num_tokens, int32_t *num_blocks,
                              int32_t *num_computed_tokens) {
    return tv::guard([&] {
        const tv::BlockManager::Seq &s = mgr(bm, "tv_block_manager_seq_info").seq(seq_id);
        if (num_tokens) *num_tokens = s.num_tokens;
        if (num_blocks) *num_blocks = (int32_t)s.table.size();
        if (num_computed_tokens) *num_computed_tokens = s.computed;
    });
}

int tv_block_manager_get_block_table(const tv_block_manager *bm, int64_t seq_id, int32_t *out, int32_t cap) {
    return tv::guard([&] {
        const char *f = "tv_block_manager_get_block_table";
        const tv::BlockManager::Seq &s = mgr(bm, f).seq(seq_id);
        const int32_t n = (int32_t)s.table.size();
        if (cap < n) tv::fail("%s: sequence %lld has %d blocks, cap is %d", f, (long long)seq_id, n, cap);
        if (n > 0 && !out) tv::fail("%s: out is null", f);
        if (n > 0) std::memcpy(out, s.table.data(), sizeof(int32_t) * (size_t)n);
        return n;
    });
}

int tv_block_manager_block_info(const tv_block_manager *bm, int32_t *ref_counts, int32_t *cached, int32_t cap) {
    return tv::guard([&] { mgr(bm, "tv_block_manager_block_info").block_info(ref_counts, cached, cap); });
}

int tv_block_manager_prefix_cache_stats(const tv_block_manager *bm, tv_prefix_cache_stats *out) {
    return tv::guard([&] {
        const tv::PrefixCacheStats s = mgr(bm, "tv_block_manager_prefix_cache_stats").stats();
        if (!out) tv::fail("tv_block_manager_prefix_cache_stats: out is null");
        *out = tv_prefix_cache_stats{s.queries, s.query_tokens, s.hit_tokens, s.query_blocks,
                                     s.hit_blocks, s.cached_blocks, s.evictable_blocks, s.evictions};
    });
}

int tv_block_manager_set_hash_bits(tv_block_manager *bm, int32_t bits) {
    return tv::guard([&] { mgr(bm, "tv_block_manager_set_hash_bits").set_hash_bits(bits); });
}

int tv_block_manager_check(const tv_block_manager *bm) {
    return tv::guard([&] { mgr(bm, "tv_block_manager_check").check_invariants(); });
}

}  // extern "C"
