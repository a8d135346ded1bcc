#include "kv_cache.h"

#include <cstdlib>
#include <cstring>
#include <new>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common.h"
#include "fp16.h"
#include "tinyvllm.h"

namespace tv {

namespace {

// fp32 -> fp16 for n values, round to nearest even: F16C where the CPU has it (the same bits as
// fp32_to_fp16, which a 512-token prefill spent 2% in), else the portable conversion.
void to_fp16_portable(const float *x, uint16_t *out, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = fp32_to_fp16(x[i]);
}
#if defined(__x86_64__)
__attribute__((target("avx,f16c"))) void to_fp16_f16c(const float *x, uint16_t *out, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i *>(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    to_fp16_portable(x + i, out + i, n - i);
}
#endif
void to_fp16(const float *x, uint16_t *out, size_t n) {
#if defined(__x86_64__)
    static const bool f16c = (__builtin_cpu_init(), __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx"));
    if (f16c) return to_fp16_f16c(x, out, n);
#endif
    to_fp16_portable(x, out, n);
}

}  // namespace

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
        to_fp16(v, vd, n);
        constexpr size_t CHUNK = 256;
        uint16_t tmp[CHUNK];  // K goes to a strided column: convert contiguously, then scatter
        for (size_t i0 = 0; i0 < n; i0 += CHUNK) {
            const size_t c = n - i0 < CHUNK ? n - i0 : CHUNK;
            to_fp16(k + i0, tmp, c);
            for (size_t i = 0; i < c; i++) kd[(i0 + i) * block_size + slot] = tmp[i];
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
