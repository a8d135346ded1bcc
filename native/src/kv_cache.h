// Paged KV cache in fp16 or fp32. V is laid out [layer][block][slot][kv_head][head_dim]; K is
// transposed inside each block, [layer][block][kv_head][head_dim][slot], so attention reads a
// block's keys of one kv head as head_dim rows of block_size (lanes over keys, no gathers).
// A block is contiguous in both, so copying a block is one memcpy each.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tv {

class KvCache {
   public:
    KvCache(int n_layer, int n_head_kv, int head_dim, int n_blocks, int block_size, int dtype);
    ~KvCache();
    KvCache(const KvCache &) = delete;
    KvCache &operator=(const KvCache &) = delete;

    int n_layer, n_head_kv, head_dim, n_blocks, block_size, dtype;
    size_t elt_bytes;  // 2 (fp16) or 4 (fp32)

    size_t bytes() const { return 2 * layer_bytes_ * (size_t)n_layer; }
    size_t token_elems() const { return (size_t)n_head_kv * head_dim; }
    // The keys of one kv head in a block: head_dim rows of block_size elements (row d = element d
    // of every slot's key).
    uint8_t *k_block(int layer, int block, int kv_head) const {
        return k_ + offset(layer, block, 0) + (size_t)kv_head * head_dim * block_size * elt_bytes;
    }
    // V of one token (all kv heads) at (layer, block, slot).
    uint8_t *v_at(int layer, int block, int slot) const { return v_ + offset(layer, block, slot); }
    // Store one token's K and V (n_head_kv * head_dim floats each), converting to the cache dtype.
    void write(int layer, int block, int slot, const float *k, const float *v);
    void copy_block(int src, int dst);

   private:
    size_t offset(int layer, int block, int slot) const {
        return (size_t)layer * layer_bytes_ + ((size_t)block * block_size + slot) * token_elems() * elt_bytes;
    }
    size_t layer_bytes_;
    uint8_t *k_ = nullptr, *v_ = nullptr;
};

}  // namespace tv
