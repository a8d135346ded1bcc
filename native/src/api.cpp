// The C ABI of models, KV caches and the standalone kernels: argument checks, then the internal
// call, each body inside guard() (c_api.h). The block manager's exports are in block_manager.cpp.
#include <map>
#include <memory>
#include <mutex>

#include "attention.h"
#include "batch.h"
#include "c_api.h"
#include "common.h"
#include "kernels.h"
#include "kv_cache.h"
#include "matmul.h"
#include "model.h"
#include "quant.h"

struct tv_model {
    explicit tv_model(const tv_model_params &p) : m(p) {}
    tv::Model m;
};

struct tv_kv_cache {
    template <class... A>
    explicit tv_kv_cache(A... a) : c(a...) {}
    tv::KvCache c;
};

namespace tv {

namespace {

// Pools for the standalone kernels, one per thread count, kept for the process lifetime.
ThreadPool &shared_pool(int n_threads) {
    static std::mutex mu;
    static std::map<int, std::unique_ptr<ThreadPool>> pools;
    const int n = n_threads > 0 ? n_threads : ThreadPool::default_threads();
    std::lock_guard<std::mutex> lk(mu);
    auto &p = pools[n];
    if (!p) p = std::make_unique<ThreadPool>(n);
    return *p;
}

void check_cache_args(const char *f, int n_blocks, int block_size, int kv_dtype) {
    if (n_blocks <= 0 || block_size <= 0) fail("%s: n_blocks (%d) and block_size (%d) must be > 0", f, n_blocks, block_size);
    if (kv_dtype != TV_F16 && kv_dtype != TV_F32) fail("%s: kv_dtype must be TV_F16 (1) or TV_F32 (0), got %d", f, kv_dtype);
}

void new_cache(const char *f, tv_kv_cache **out, int n_layer, int n_head_kv, int head_dim, int n_blocks, int block_size,
               int kv_dtype) {
    if (!out) fail("%s: out must not be null", f);
    *out = nullptr;
    if (n_layer <= 0 || n_head_kv <= 0 || head_dim <= 0) fail("%s: n_layer, n_head_kv and head_dim must be > 0", f);
    check_cache_args(f, n_blocks, block_size, kv_dtype);
    *out = new tv_kv_cache(n_layer, n_head_kv, head_dim, n_blocks, block_size, kv_dtype);
}

// The token layout of a standalone paged attention call (tokens and logits are not read).
AttentionBatch check_paged(const char *f, const KvCache &c, int layer, const tv_batch *b) {
    if (layer < 0 || layer >= c.n_layer) fail("%s: layer %d out of range [0, %d)", f, layer, c.n_layer);
    static thread_local std::vector<int32_t> last_pos;
    return check_batch(f, c, b, 0, nullptr, last_pos);
}

void run_attention(const char *f, const KvCache &c, int layer, const AttentionBatch &ab, int n_head, const float *q,
                   float *out, int n_threads) {
    if (n_head <= 0 || n_head % c.n_head_kv != 0) fail("%s: n_head (%d) must be a positive multiple of n_head_kv (%d)", f, n_head, c.n_head_kv);
    if (!q || !out) fail("%s: q and out must not be null", f);
    static thread_local std::vector<float> scratch;
    attention(c, layer, ab, q, out, n_head, shared_pool(n_threads), scratch);
}

}  // namespace
}  // namespace tv

using namespace tv;

extern "C" {

const char *tv_version(void) { return "0.1.0"; }

size_t tv_row_bytes(int32_t dtype, int64_t cols) { return row_bytes(dtype, cols); }

const char *tv_kernel_path(void) { return kernels().name; }

int tv_select_kernel_path(const char *name) {
    return guard([&] {
        if (!name || !select_kernels(name))
            fail("tv_select_kernel_path: '%s' is not a kernel path this build and CPU can run", name ? name : "(null)");
    });
}

int tv_model_create(const tv_model_params *params, tv_model **out) {
    return guard([&] {
        if (!params || !out) fail("tv_model_create: params and out must not be null");
        *out = nullptr;
        *out = new tv_model(*params);
    });
}

int tv_model_set_tensor(tv_model *model, const char *name, const tv_tensor *tensor) {
    return guard([&] {
        if (!model || !name || !tensor) fail("tv_model_set_tensor: model, name and tensor must not be null");
        model->m.set_tensor(name, *tensor);
    });
}

int tv_model_finalize(tv_model *model) {
    return guard([&] {
        if (!model) fail("tv_model_finalize: model is null");
        model->m.finalize();
    });
}

void tv_model_free(tv_model *model) { delete model; }

int tv_kv_cache_create(const tv_model *model, int32_t n_blocks, int32_t block_size, int32_t kv_dtype,
                       tv_kv_cache **out) {
    return guard([&] {
        if (!model) fail("tv_kv_cache_create: model is null");
        const tv_model_params &p = model->m.params();
        new_cache("tv_kv_cache_create", out, p.n_layer, p.n_head_kv, p.head_dim, n_blocks, block_size, kv_dtype);
    });
}

size_t tv_kv_cache_bytes(const tv_kv_cache *cache) { return cache ? cache->c.bytes() : 0; }

int tv_kv_cache_copy_block(tv_kv_cache *cache, int32_t src, int32_t dst) {
    return guard([&] {
        const char *f = "tv_kv_cache_copy_block";
        if (!cache) fail("%s: cache is null", f);
        const int n = cache->c.n_blocks;
        if (src < 0 || src >= n || dst < 0 || dst >= n) fail("%s: src %d / dst %d out of range [0, %d)", f, src, dst, n);
        cache->c.copy_block(src, dst);
    });
}

void tv_kv_cache_free(tv_kv_cache *cache) { delete cache; }

int tv_kv_cache_create_raw(int32_t n_layer, int32_t n_head_kv, int32_t head_dim, int32_t n_blocks, int32_t block_size,
                           int32_t kv_dtype, tv_kv_cache **out) {
    return guard([&] { new_cache("tv_kv_cache_create_raw", out, n_layer, n_head_kv, head_dim, n_blocks, block_size, kv_dtype); });
}

int tv_kv_cache_write(tv_kv_cache *cache, int32_t layer, const tv_batch *batch, const float *k, const float *v) {
    return guard([&] {
        const char *f = "tv_kv_cache_write";
        if (!cache || !k || !v) fail("%s: cache, k and v must not be null", f);
        KvCache &c = cache->c;
        const AttentionBatch ab = check_paged(f, c, layer, batch);
        const size_t row = c.token_elems();
        for (int t = 0; t < ab.n_tokens; t++) {
            const int pos = ab.positions[t];
            c.write(layer, ab.block_tables[(size_t)ab.seq_ids[t] * ab.max_blocks + pos / c.block_size], pos % c.block_size,
                    k + t * row, v + t * row);
        }
    });
}

int tv_attention_paged(const tv_kv_cache *cache, int32_t layer, const tv_batch *batch, int32_t n_head, const float *q,
                       float *out, int32_t n_threads) {
    return guard([&] {
        const char *f = "tv_attention_paged";
        if (!cache) fail("%s: cache is null", f);
        run_attention(f, cache->c, layer, check_paged(f, cache->c, layer, batch), n_head, q, out, n_threads);
    });
}

int tv_attention(int32_t n_q, int32_t n_kv, int32_t n_head, int32_t n_head_kv, int32_t head_dim, const float *q,
                 const float *k, const float *v, int32_t kv_dtype, float *out, int32_t n_threads) {
    return guard([&] {
        const char *f = "tv_attention";
        if (n_kv <= 0 || n_q <= 0 || n_q > n_kv) fail("%s: need 1 <= n_q <= n_kv (got n_q %d, n_kv %d)", f, n_q, n_kv);
        if (n_head_kv <= 0 || head_dim <= 0) fail("%s: n_head_kv and head_dim must be > 0", f);
        if (!k || !v) fail("%s: k and v must not be null", f);
        constexpr int BS = 16;
        const int n_blocks = (n_kv + BS - 1) / BS;
        check_cache_args(f, n_blocks, BS, kv_dtype);
        KvCache c(1, n_head_kv, head_dim, n_blocks, BS, kv_dtype);
        std::vector<int32_t> table((size_t)n_blocks), pos((size_t)n_q), seq((size_t)n_q, 0);
        for (int i = 0; i < n_blocks; i++) table[(size_t)i] = i;
        for (int i = 0; i < n_q; i++) pos[(size_t)i] = n_kv - n_q + i;
        const size_t row = c.token_elems();
        for (int t = 0; t < n_kv; t++) c.write(0, t / BS, t % BS, k + t * row, v + t * row);
        const AttentionBatch ab{n_q, pos.data(), seq.data(), table.data(), n_blocks};
        run_attention(f, c, 0, ab, n_head, q, out, n_threads);
    });
}

int tv_model_forward(tv_model *model, tv_kv_cache *cache, const tv_batch *batch, float *logits) {
    return guard([&] {
        if (!model || !cache || !batch) fail("tv_model_forward: model, cache and batch must not be null");
        model->m.forward(cache->c, *batch, logits);
    });
}

int tv_matmul(const tv_tensor *w, const float *x, int64_t m, float *y, int32_t n_threads) {
    return guard([&] {
        const char *f = "tv_matmul";
        const Weight W = check_weight(f, w);
        if (m < 0) fail("%s: m must be >= 0 (got %lld)", f, (long long)m);
        if (m == 0) return;
        if (!x || !y) fail("%s: x and y must not be null", f);
        checked_mul(checked_mul((size_t)m, (size_t)W.rows, f), sizeof(float), f);
        static thread_local std::vector<ActBlock> buf;  // reused across calls on this thread
        matmul(W, x, m, y, shared_pool(n_threads), buf);
    });
}

int tv_dequantize_rows(const tv_tensor *w, int64_t row0, int64_t rows, float *out) {
    return guard([&] {
        const char *f = "tv_dequantize_rows";
        const Weight W = check_weight(f, w);
        if (row0 < 0 || rows < 0 || row0 > W.rows || rows > W.rows - row0)
            fail("%s: rows [%lld, %lld) out of range [0, %lld)", f, (long long)row0, (long long)(row0 + rows), (long long)W.rows);
        if (rows > 0 && !out) fail("%s: out is null", f);
        for (int64_t r = 0; r < rows; r++) dequantize_row(W.dtype, W.row(row0 + r), out + r * W.cols, W.cols);
    });
}

}  // extern "C"

