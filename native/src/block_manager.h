// Paged-KV block manager: a pool of fixed-size blocks with reference counts, per-sequence block
// tables, copy-on-write for shared partial blocks, and a content-addressed prefix cache.
//
// Prefix cache. A full block whose KV is computed is keyed by its whole token prefix (every token
// of the sequence up to the end of that block). Internally the key is a trie node: (parent node,
// the block's block_size tokens), indexed by a chained 64-bit hash of (parent hash, tokens); a
// lookup compares the tokens and the parent node, so colliding hashes cost time, never wrong KV.
// A node outlives its block while a sequence or a child node refers to it, so a child stays
// findable after its parent block was evicted and recomputed. At most one block holds a key; a
// second block computed with the same content (a duplicate) is simply not cached.
//
// Free blocks. A block whose reference count drops to 0 goes to the free stack when it holds no
// key, or to the tail of the evictable LRU list when it does (it can still be hit and revived).
// A new block comes from the free stack first (lowest ids first at start), then from the LRU head
// (the key is dropped: an eviction). free_seq releases a table tail first, so a sequence's last
// blocks are evicted before its first ones (which more prompts share).
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

struct tv_block_op;

namespace tv {

struct PrefixCacheStats {
    int64_t queries = 0, query_tokens = 0, hit_tokens = 0, query_blocks = 0, hit_blocks = 0;
    int64_t cached_blocks = 0, evictable_blocks = 0, evictions = 0;
};

class BlockManager {
public:
    // The manager keeps no token ids of its own: the caller owns them and lends them to the calls
    // that need them (a prompt lookup, a mark that completes blocks, which become cache keys).
    struct Seq {
        std::vector<int32_t> table;   // logical -> physical; ceil(num_tokens / block_size) entries
        std::vector<int32_t> nodes;   // prefix-cache node of each full computed block (caching on)
        int32_t num_tokens = 0;       // tokens with a slot
        int32_t computed = 0;         // leading tokens whose KV is written
    };

    BlockManager(int32_t num_blocks, int32_t block_size, bool enable_prefix_caching);

    int32_t num_blocks() const { return (int32_t)blocks_.size(); }
    int32_t block_size() const { return block_size_; }
    // Blocks a new allocation can take: free ones plus evictable cached ones.
    int32_t num_free_blocks() const { return (int32_t)free_.size() + lru_size_; }
    int32_t num_seqs() const { return (int32_t)seqs_.size(); }
    bool has_seq(int64_t id) const { return seqs_.count(id) != 0; }

    // Creates sequence `id` holding slots for the n prompt tokens. Leading full blocks found in the
    // prefix cache are shared (never the whole prompt: the last token is always left to compute);
    // *num_cached gets their token count and the sequence starts with that many computed tokens.
    // Returns false, changing nothing, when the pool cannot hold it.
    bool allocate(int64_t id, const int32_t *tokens, int32_t n, int32_t *num_cached, bool use_cache = true);
    // Slots up to num_tokens tokens in all (never fewer than now). When new slots go into a partial
    // last block that is shared, that block is first copied: (src, dst) goes to cow[0..1] and
    // returns 1 copy. Returns -1, changing nothing, when the pool cannot hold them.
    int append_slots(int64_t id, int32_t num_tokens, int32_t *cow);
    // The first c tokens have their KV written (c never decreases). Blocks this completes are cached
    // under their tokens, read from tokens[] (the whole sequence; needed only when a block completes).
    void mark_computed(int64_t id, int32_t c, const int32_t *tokens);
    // Shrinks to num_tokens slots (>= computed, <= slots now), releasing the blocks past the last one
    // kept, tail first (rejected draft tokens of speculative decoding).
    void truncate(int64_t id, int32_t num_tokens);
    void fork(int64_t parent, int64_t child);
    void free_seq(int64_t id);
    const Seq &seq(int64_t id) const;
    // Runs ops in order (tinyvllm.h: tv_block_manager_apply); false when op *n_done found no free block.
    bool apply(tv_block_op *ops, int32_t n, int32_t *tables, int32_t max_blocks, int32_t *cow, int32_t cow_cap,
               int32_t *n_cow, int32_t *n_done);

    // Per block: reference count, and whether it holds a prefix-cache key (either may be null).
    void block_info(int32_t *refs, int32_t *cached, int32_t cap) const;
    PrefixCacheStats stats() const;
    // Test hook: keep only the low `bits` bits of block hashes (1..64) to force collisions.
    void set_hash_bits(int bits);
    // Recounts everything from scratch; throws std::logic_error on any inconsistency.
    void check_invariants() const;

private:
    struct Block {
        int32_t ref = 0;
        int32_t node = -1;              // prefix-cache node whose key this block holds
        int32_t prev = -1, next = -1;   // evictable LRU links
        bool in_lru = false;
    };
    struct Node {
        uint64_t hash = 0;
        int32_t parent = -1;
        int32_t block = -1;   // the block holding this key, -1 when none (evicted / never cached)
        int32_t refs = 0;     // sequences listing it + child nodes + 1 while a block holds it
    };

    Seq &seq_mut(int64_t id);
    bool needs_copy(const Seq &s, int32_t num_tokens) const;  // growing to num_tokens writes into a shared block
    uint64_t hash_of(uint64_t parent_hash, const int32_t *t) const;
    int32_t find_node(int32_t parent, const int32_t *t, uint64_t h) const;
    int32_t find_or_add_node(int32_t parent, const int32_t *t);
    void unref_node(int32_t n);
    // Leading full blocks of tokens[0..n) in the cache (at most (n - 1) / block_size).
    void lookup(const int32_t *tokens, int32_t n, std::vector<int32_t> &hit_nodes) const;
    int32_t take_block();
    void release_block(int32_t b);
    void lru_push(int32_t b);
    void lru_remove(int32_t b);

    int32_t block_size_;
    bool caching_;
    uint64_t hash_mask_ = ~0ull;
    std::vector<Block> blocks_;
    std::vector<int32_t> free_;             // stack: back() is handed out next
    int32_t lru_head_ = -1, lru_tail_ = -1, lru_size_ = 0;
    std::vector<Node> nodes_;
    std::vector<int32_t> node_tokens_;      // block_size tokens per node
    std::vector<int32_t> free_nodes_;
    std::unordered_multimap<uint64_t, int32_t> index_;  // hash -> node
    std::unordered_map<int64_t, Seq> seqs_;
    PrefixCacheStats stats_;
    int32_t cached_blocks_ = 0;
};

}  // namespace tv
