// One task per (token, head). Within a task the context is walked block by block: scores of a
// block first, then one online-softmax update (running max m, running sum l, rescaled fp32
// accumulator), so there is one rescale per block instead of one per position.
#include "attention.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels.h"
#include "tinyvllm.h"

namespace tv {

void attention(const KvCache &cache, int layer, const AttentionBatch &b, const float *q, float *out, int n_head,
               ThreadPool &pool, std::vector<float> &scratch) {
    const int hd = cache.head_dim, bs = cache.block_size, group = n_head / cache.n_head_kv;
    const float scale = 1.0f / std::sqrt((float)hd);
    const size_t per_thread = (size_t)bs + hd;
    if (scratch.size() < per_thread * pool.size()) scratch.resize(per_thread * pool.size());
    const Kernels &K = kernels();
    const bool f16 = cache.dtype == TV_F16;
    const size_t head_bytes = (size_t)hd * cache.elt_bytes;

    pool.run((int64_t)b.n_tokens * n_head, [&](int64_t task, int tid) {
        const int t = (int)(task / n_head), h = (int)(task % n_head), kvh = h / group;
        const float *qh = q + ((size_t)t * n_head + h) * hd;
        float *scores = scratch.data() + per_thread * tid, *acc = scores + bs;
        const int32_t *table = b.block_tables + (size_t)b.seq_ids[t] * b.max_blocks;
        const int n_ctx = b.positions[t] + 1;
        float m = -std::numeric_limits<float>::infinity(), l = 0.0f;
        std::fill(acc, acc + hd, 0.0f);
        for (int p0 = 0; p0 < n_ctx; p0 += bs) {
            const int block = table[p0 / bs], n = std::min(bs, n_ctx - p0);
            float bmax = -std::numeric_limits<float>::infinity();
            for (int s = 0; s < n; s++) {
                const uint8_t *k = cache.k_at(layer, block, s) + kvh * head_bytes;
                const float d = f16 ? K.dot_f16(reinterpret_cast<const uint16_t *>(k), qh, hd)
                                    : K.dot_f32(reinterpret_cast<const float *>(k), qh, hd);
                scores[s] = d * scale;
                bmax = std::max(bmax, scores[s]);
            }
            if (bmax > m) {  // new running max: rescale what was accumulated so far
                const float r = std::exp(m - bmax);  // exp(-inf) = 0 on the first block
                l *= r;
                for (int i = 0; i < hd; i++) acc[i] *= r;
                m = bmax;
            }
            for (int s = 0; s < n; s++) {
                const float p = std::exp(scores[s] - m);
                l += p;
                const uint8_t *v = cache.v_at(layer, block, s) + kvh * head_bytes;
                if (f16) K.axpy_f16(p, reinterpret_cast<const uint16_t *>(v), acc, hd);
                else K.axpy_f32(p, reinterpret_cast<const float *>(v), acc, hd);
            }
        }
        float *o = out + ((size_t)t * n_head + h) * hd;
        const float inv = 1.0f / l;  // l >= 1: the max position contributes exp(0)
        for (int i = 0; i < hd; i++) o[i] = acc[i] * inv;
    });
}

}  // namespace tv
