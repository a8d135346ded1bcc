// Tiled (flash-style) paged attention. Each sequence's tokens in the batch are cut into query
// tiles of up to QT tokens; one task is (query tile, kv head) and covers the GQA group's heads of
// every token in the tile, so each KV block is read from the cache once per tile instead of once per (token, head). Every block then goes through
// kernels().attn_block: scores, one online-softmax update per block (running max m, sum l,
// rescaled fp32 accumulator); causal masking only trims the blocks a query only partly sees (the
// diagonal). A decode token is a tile of one: its group's heads still share the key/value read.
// Per query the arithmetic does not depend on what else is in its tile (attn_block.h), so
// attention stays batch-invariant (prefill == decode == recompute, bit for bit).
// Sliding window: a query at p sees keys [p - window + 1, p]. attn_block only takes a count of
// leading keys per row, so the one block where a row's window starts mid-block runs as a call of
// its own on that block's tail (key and value pointers shifted by the start slot). Which calls a
// query goes through depends only on its position, so batch invariance holds here too.
#include "attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "common.h"
#include "kernels.h"
#include "quant.h"
#include "tinyvllm.h"

namespace tv {

namespace {
constexpr int QT = 16;  // query tokens per tile

struct Tile {
    int32_t first, count;  // range in `order`
    int64_t cost;          // ~ tokens x context, to hand out the expensive tiles first
};
}  // namespace

void attention(const KvCache &cache, int layer, const AttentionBatch &b, const float *q, float *out, int n_head,
               ThreadPool &pool, std::vector<float> &scratch, ActBlock *out_q) {
    const int hd = cache.head_dim, bs = cache.block_size, n_kv = cache.n_head_kv, group = n_head / n_kv;
    if (out_q && hd % QK != 0) fail("attention: out_q needs head_dim (%d) a multiple of %d", hd, QK);
    const int T = b.n_tokens, R = QT * group;
    const float scale = b.scale > 0.0f ? b.scale : 1.0f / std::sqrt((float)hd);
    const int window = b.window;
    const Kernels &K = kernels();
    const bool f16 = cache.dtype == TV_F16;
    const size_t head_bytes = (size_t)hd * cache.elt_bytes, ld = cache.token_elems() * cache.elt_bytes;

    // Token indices grouped by sequence (stable: batch order, where positions increase), then tiles.
    thread_local std::vector<int32_t> order, count;
    thread_local std::vector<Tile> tiles;
    int n_seqs = 0;
    for (int t = 0; t < T; t++) n_seqs = std::max(n_seqs, b.seq_ids[t] + 1);
    count.assign((size_t)n_seqs + 1, 0);
    for (int t = 0; t < T; t++) count[(size_t)b.seq_ids[t] + 1]++;
    for (int s = 0; s < n_seqs; s++) count[(size_t)s + 1] += count[(size_t)s];
    order.resize((size_t)T);
    tiles.clear();
    for (int s = 0; s < n_seqs; s++)
        for (int32_t i = count[(size_t)s]; i < count[(size_t)s + 1]; i += QT) {
            const int32_t n = std::min<int32_t>(QT, count[(size_t)s + 1] - i);
            tiles.push_back(Tile{i, n, 0});
        }
    {
        std::vector<int32_t> &fill = count;  // reuse as per-sequence write cursors
        for (int t = 0; t < T; t++) order[(size_t)fill[(size_t)b.seq_ids[t]]++] = t;
    }
    for (Tile &tl : tiles) tl.cost = (int64_t)tl.count * (b.positions[order[(size_t)(tl.first + tl.count - 1)]] + 1);
    std::stable_sort(tiles.begin(), tiles.end(), [](const Tile &x, const Tile &y) { return x.cost > y.cost; });

    // Per-thread work space: q rows, acc, m, l (R each), the kernel's work (2 * bs * hd + bs).
    const size_t per_thread = (size_t)R * hd * 2 + 2 * (size_t)R + 2 * (size_t)bs * hd + hd + bs + 16;
    if (scratch.size() < per_thread * pool.size()) scratch.resize(per_thread * pool.size());

    // (thread_local names inside the lambda would mean the worker's own copies: take pointers)
    const Tile *tile_list = tiles.data();
    const int32_t *order_p = order.data();
    // Fewer (tile, kv head) tasks than threads: split each GQA group into single heads so no thread
    // idles. Rows are independent inside attn_block, so this changes no result, only how often a
    // K/V block is read (sharing it across the group is worth more than balancing 3 tasks on 2).
    const int parts = (int64_t)tiles.size() * n_kv < (int64_t)pool.size() ? group : 1, hpp = group / parts;
    pool.run((int64_t)tiles.size() * n_kv * parts, [&](int64_t task, int tid) {
        const Tile &tl = tile_list[task / (n_kv * parts)];
        const int kvh = (int)(task / parts % n_kv), g0 = (int)(task % parts) * hpp, nt = tl.count, rows = nt * hpp;
        float *qb = scratch.data() + per_thread * tid, *acc = qb + (size_t)R * hd, *m = acc + (size_t)R * hd,
              *l = m + R, *work = l + R;
        thread_local std::vector<int> nvalid, nedge;
        nvalid.resize((size_t)R);
        nedge.resize((size_t)R);
        const int32_t *tok = order_p + tl.first;
        const int32_t *table = b.block_tables + (size_t)b.seq_ids[tok[0]] * b.max_blocks;
        for (int i = 0; i < nt; i++)
            std::memcpy(qb + (size_t)i * hpp * hd, q + ((size_t)tok[i] * n_head + (size_t)kvh * group + g0) * hd,
                        sizeof(float) * hpp * hd);
        std::fill(acc, acc + (size_t)rows * hd, 0.0f);
        std::fill(m, m + rows, -std::numeric_limits<float>::infinity());
        std::fill(l, l + rows, 0.0f);
        const int n_ctx = b.positions[tok[nt - 1]] + 1;  // the tile's last token sees the most
        // first key any row of the tile sees (positions increase within the tile)
        const int first = window > 0 ? std::max(0, b.positions[tok[0]] - window + 1) : 0;
        for (int p0 = first / bs * bs; p0 < n_ctx; p0 += bs) {
            const int block = table[p0 / bs];
            const uint8_t *kb = cache.k_block(layer, block, kvh), *vb = cache.v_at(layer, block, 0) + kvh * head_bytes;
            for (int i = 0; i < nt; i++) {
                const int pos = b.positions[tok[i]];
                const int lo = window > 0 ? std::max(0, pos - window + 1) - p0 : 0;  // first visible slot
                const int vis = std::clamp(pos + 1 - p0, 0, bs);
                if (lo > 0 && lo < vis) {  // the window starts inside this block: its tail, alone
                    for (int g = 0; g < hpp; g++) nvalid[(size_t)i * hpp + g] = 0, nedge[(size_t)g] = vis - lo;
                    const size_t r = (size_t)i * hpp;
                    K.attn_block(qb + r * hd, hpp, hd, nedge.data(), kb + (size_t)lo * cache.elt_bytes,
                                 vb + (size_t)lo * ld, ld, f16, bs, scale, m + r, l + r, acc + r * hd, work);
                } else {
                    for (int g = 0; g < hpp; g++) nvalid[(size_t)i * hpp + g] = lo > 0 ? 0 : vis;
                }
            }
            K.attn_block(qb, rows, hd, nvalid.data(), kb, vb, ld, f16, bs, scale, m, l, acc, work);
        }
        for (int i = 0; i < nt; i++)
            for (int g = 0; g < hpp; g++) {
                const int r = i * hpp + g;
                float *o = out + ((size_t)tok[i] * n_head + (size_t)kvh * group + g0 + g) * hd;
                const float inv = 1.0f / l[r];  // l >= 1: the max position contributes exp(0)
                for (int e = 0; e < hd; e++) o[e] = acc[(size_t)r * hd + e] * inv;
                if (out_q) K.quantize_act(o, out_q + (o - out) / QK, hd);
            }
    });
}

}  // namespace tv
