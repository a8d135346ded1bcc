// Paged KV cache: K and V each laid out [layer][block][slot][kv_head][head_dim] in fp16 or fp32,
// so one layer is contiguous and one (block, slot) holds a token's K (or V) for all kv heads.
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
    // K or V of one token (all kv heads) at (layer, block, slot).
    uint8_t *k_at(int layer, int block, int slot) const { return k_ + offset(layer, block, slot); }
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
