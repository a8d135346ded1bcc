#include "kv_cache.h"

#include <cstdlib>
#include <cstring>
#include <new>

#include "common.h"
#include "fp16.h"
#include "tinyvllm.h"

namespace tv {

KvCache::KvCache(int n_layer_, int n_head_kv_, int head_dim_, int n_blocks_, int block_size_, int dtype_)
    : n_layer(n_layer_), n_head_kv(n_head_kv_), head_dim(head_dim_), n_blocks(n_blocks_),
      block_size(block_size_), dtype(dtype_), elt_bytes(dtype_ == TV_F16 ? 2 : 4) {
    const char *what = "tv_kv_cache_create";
    size_t per_token = checked_mul(token_elems(), elt_bytes, what);
    layer_bytes_ = checked_mul(checked_mul((size_t)n_blocks, (size_t)block_size, what), per_token, what);
    const size_t total = checked_mul(layer_bytes_, (size_t)n_layer, what);
    // calloc: pages stay untouched (and free) until a block is first written.
    k_ = static_cast<uint8_t *>(std::calloc(total, 1));
    v_ = static_cast<uint8_t *>(std::calloc(total, 1));
    if (!k_ || !v_) {
        std::free(k_);
        std::free(v_);
        throw std::bad_alloc();
    }
}

KvCache::~KvCache() {
    std::free(k_);
    std::free(v_);
}

void KvCache::write(int layer, int block, int slot, const float *k, const float *v) {
    const size_t n = token_elems(), off = offset(layer, block, slot), kb = offset(layer, block, 0);
    // K element i = (kv head, d) of this slot goes to row i of the block's transposed keys
    if (dtype == TV_F32) {
        float *kd = reinterpret_cast<float *>(k_ + kb);
        for (size_t i = 0; i < n; i++) kd[i * block_size + slot] = k[i];
        std::memcpy(v_ + off, v, n * 4);
    } else {
        uint16_t *kd = reinterpret_cast<uint16_t *>(k_ + kb), *vd = reinterpret_cast<uint16_t *>(v_ + off);
        for (size_t i = 0; i < n; i++) {
            kd[i * block_size + slot] = fp32_to_fp16(k[i]);
            vd[i] = fp32_to_fp16(v[i]);
        }
    }
}

void KvCache::copy_block(int src, int dst) {
    if (src == dst) return;
    const size_t block_bytes = (size_t)block_size * token_elems() * elt_bytes;
    for (int l = 0; l < n_layer; l++) {
        std::memcpy(k_block(l, dst, 0), k_block(l, src, 0), block_bytes);
        std::memcpy(v_at(l, dst, 0), v_at(l, src, 0), block_bytes);
    }
}

}  // namespace tv
