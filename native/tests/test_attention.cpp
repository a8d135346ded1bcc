// RoPE (both layouts) and paged attention (sliding window included) through a shuffled block
// table vs double references.
#include <algorithm>
#include <numeric>

#include "attention.h"
#include "fp16.h"
#include "helpers.h"
#include "kernels.h"
#include "kv_cache.h"
#include "ops.h"

using namespace tvtest;

TEST(rope_both_layouts) {
    const int n_heads = 3, hd = 8, half = hd / 2;
    std::vector<float> inv(half);
    for (int i = 0; i < half; i++) inv[i] = (float)std::pow(10000.0, -2.0 * i / hd);
    for (int interleaved = 0; interleaved < 2; interleaved++)
        for (int pos : {0, 1, 7, 1000, 8191}) {
            std::vector<float> x = random_vec(n_heads * hd), y = x, c(half), s(half);
            tv::rope_angles(pos, inv.data(), half, c.data(), s.data());
            tv::rope_apply(y.data(), n_heads, hd, interleaved != 0, c.data(), s.data());
            for (int h = 0; h < n_heads; h++)
                for (int i = 0; i < half; i++) {
                    const int a = h * hd + (interleaved ? 2 * i : i), b = h * hd + (interleaved ? 2 * i + 1 : i + half);
                    const double ang = (double)pos * inv[i];
                    const double ra = x[a] * std::cos(ang) - x[b] * std::sin(ang);
                    const double rb = x[a] * std::sin(ang) + x[b] * std::cos(ang);
                    CHECK_NEAR(y[a], ra, 1e-6) << "interleaved=" << interleaved << " pos=" << pos;
                    CHECK_NEAR(y[b], rb, 1e-6) << "interleaved=" << interleaved << " pos=" << pos;
                }
        }
}

TEST(rmsnorm_and_swiglu) {
    std::vector<float> x = random_vec(40, -3, 3), w = random_vec(40), y(40);
    tv::rmsnorm(x.data(), w.data(), y.data(), 40, 1e-5f);
    double ss = 0;
    for (float v : x) ss += (double)v * v;
    for (int i = 0; i < 40; i++) CHECK_NEAR(y[i], x[i] * w[i] / std::sqrt(ss / 40 + 1e-5), 1e-6);
    std::vector<float> g = random_vec(10, -5, 5), u = random_vec(10), g0 = g;
    tv::swiglu(g.data(), u.data(), 10);
    for (int i = 0; i < 10; i++) CHECK_NEAR(g[i], g0[i] / (1 + std::exp(-(double)g0[i])) * u[i], 1e-6);
}

namespace {

// Double-precision causal GQA attention for every batch row, read from the unpaged K/V copies,
// compared with what the kernel wrote to `out`. window > 0: keys p with pos - p >= window are out.
void check_against_naive(const std::vector<float> &q, const std::vector<float> &out,
                         const std::vector<std::vector<float>> &K, const std::vector<std::vector<float>> &V,
                         const std::vector<int32_t> &pos, const std::vector<int32_t> &seq, int n_head, int n_kv,
                         int hd, const char *path, int kv_dtype, int window = 0, float scale_f = 0.0f) {
    const double scale = scale_f > 0.0f ? (double)scale_f : 1.0 / std::sqrt((double)hd);
    for (size_t t = 0; t < pos.size(); t++)
        for (int h = 0; h < n_head; h++) {
            const int s = seq[t], kvh = h / (n_head / n_kv), lo = window > 0 ? std::max(0, pos[t] - window + 1) : 0;
            std::vector<double> sc(pos[t] + 1, -1e300), o(hd, 0.0);
            double mx = -1e300, sum = 0;
            for (int p = lo; p <= pos[t]; p++) {
                double d = 0;
                for (int i = 0; i < hd; i++)
                    d += (double)q[(t * n_head + h) * hd + i] * K[s][((size_t)p * n_kv + kvh) * hd + i];
                sc[p] = d * scale;
                mx = std::max(mx, sc[p]);
            }
            for (auto &v : sc) sum += (v = std::exp(v - mx));
            for (int p = lo; p <= pos[t]; p++)
                for (int i = 0; i < hd; i++) o[i] += sc[p] * V[s][((size_t)p * n_kv + kvh) * hd + i];
            for (int i = 0; i < hd; i++)
                CHECK_NEAR(out[(t * n_head + h) * hd + i], o[i] / sum, 2e-6)
                    << path << " kv=" << kv_dtype << " window=" << window << " t=" << t << " pos=" << pos[t] << " h=" << h;
        }
}

void attention_case(int kv_dtype, const char *path) {
    const int n_head = 6, n_kv = 2, hd = 16, bs = 4, n_blocks = 40, max_blocks = 5;
    const std::vector<int> lens = {1, 5, 13, 9, 20};  // sequence lengths after this step
    const std::vector<int> new_toks = {1, 3, 13, 1, 2};  // how many of the last positions are in the batch
    const int n_seqs = (int)lens.size();
    tv::KvCache cache(1, n_kv, hd, n_blocks, bs, kv_dtype);
    // shuffled, non-contiguous physical blocks
    std::vector<int> perm(n_blocks);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng());
    std::vector<int32_t> tables((size_t)n_seqs * max_blocks, -1);
    for (int s = 0, next = 0; s < n_seqs; s++)
        for (int i = 0; i < (lens[s] + bs - 1) / bs; i++) tables[(size_t)s * max_blocks + i] = perm[next++];
    // K/V for every position (rounded to the cache's precision for the reference)
    std::vector<std::vector<float>> K(n_seqs), V(n_seqs);
    auto round = [&](float v) { return kv_dtype == TV_F16 ? tv::fp16_to_fp32(tv::fp32_to_fp16(v)) : v; };
    for (int s = 0; s < n_seqs; s++) {
        K[s] = random_vec((size_t)lens[s] * n_kv * hd, -2, 2);
        V[s] = random_vec((size_t)lens[s] * n_kv * hd);
        for (int p = 0; p < lens[s]; p++)
            cache.write(0, tables[(size_t)s * max_blocks + p / bs], p % bs, &K[s][(size_t)p * n_kv * hd],
                        &V[s][(size_t)p * n_kv * hd]);
        for (auto &v : K[s]) v = round(v);
        for (auto &v : V[s]) v = round(v);
    }
    // the batch: interleave sequences, increasing positions within each
    std::vector<int32_t> pos, seq;
    for (int step = 0; step < 13; step++)
        for (int s = n_seqs - 1; s >= 0; s--)
            if (step < new_toks[s]) seq.push_back(s), pos.push_back(lens[s] - new_toks[s] + step);
    const int T = (int)pos.size();
    std::vector<float> q = random_vec((size_t)T * n_head * hd, -2, 2), out((size_t)T * n_head * hd);
    tv::ThreadPool pool(2);
    std::vector<float> scratch;
    CHECK(tv::select_kernels(path));
    tv::attention(cache, 0, tv::AttentionBatch{T, pos.data(), seq.data(), tables.data(), max_blocks}, q.data(),
                  out.data(), n_head, pool, scratch);
    check_against_naive(q, out, K, V, pos, seq, n_head, n_kv, hd, path, kv_dtype);
}

}  // namespace

TEST(attention_paged_gqa) {
    const char *restore = tv_kernel_path();
    for (const char *path : tv::available_kernels()) {
        attention_case(TV_F32, path);
        attention_case(TV_F16, path);
    }
    tv::select_kernels(restore);
}

namespace {

// One long sequence (2048 positions, head_dim 64 as in the reference model, so the vector paths'
// specialized block kernels run) in a shuffled paged cache; the batch is a prefill chunk spread
// over the context (several query tiles, diagonal and off-diagonal blocks) plus a decode token of
// a second sequence. Only the batch's rows are checked against the double reference.
void attention_long_case(int kv_dtype, const char *path, int window = 0, float scale = 0.0f) {
    const int n_head = 6, n_kv = 2, hd = 64, bs = 16, N = 2048, max_blocks = N / bs, n_blocks = 2 * max_blocks;
    tv::KvCache cache(1, n_kv, hd, n_blocks, bs, kv_dtype);
    std::vector<int> perm(n_blocks);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng());
    std::vector<int32_t> tables((size_t)2 * max_blocks);
    for (int i = 0; i < 2 * max_blocks; i++) tables[i] = perm[i];
    auto round = [&](float v) { return kv_dtype == TV_F16 ? tv::fp16_to_fp32(tv::fp32_to_fp16(v)) : v; };
    std::vector<std::vector<float>> K(2), V(2);
    for (int s = 0; s < 2; s++) {
        K[s] = random_vec((size_t)N * n_kv * hd, -2, 2);
        V[s] = random_vec((size_t)N * n_kv * hd);
        for (int p = 0; p < N; p++)
            cache.write(0, tables[(size_t)s * max_blocks + p / bs], p % bs, &K[s][(size_t)p * n_kv * hd],
                        &V[s][(size_t)p * n_kv * hd]);
        for (auto &v : K[s]) v = round(v);
        for (auto &v : V[s]) v = round(v);
    }
    std::vector<int32_t> pos, seq;
    for (int p : {0, 1, 15, 16, 17, 40}) pos.push_back(p), seq.push_back(0);
    for (int p = 1000; p < 1019; p++) pos.push_back(p), seq.push_back(0);
    pos.push_back(1531), seq.push_back(1);  // decode token of sequence 1 in the middle of the batch
    for (int p = 2030; p < N; p++) pos.push_back(p), seq.push_back(0);
    const int T = (int)pos.size();
    std::vector<float> q = random_vec((size_t)T * n_head * hd, -2, 2), out((size_t)T * n_head * hd);
    tv::ThreadPool pool(2);
    std::vector<float> scratch;
    CHECK(tv::select_kernels(path));
    tv::attention(cache, 0, tv::AttentionBatch{T, pos.data(), seq.data(), tables.data(), max_blocks, window, scale},
                  q.data(), out.data(), n_head, pool, scratch);
    // each row alone (a decode step) gives the same bits: batch-invariant
    for (int t : {0, 7, 25, 28, T - 1}) {
        std::vector<float> one((size_t)n_head * hd);
        tv::attention(cache, 0, tv::AttentionBatch{1, &pos[t], &seq[t], tables.data(), max_blocks, window, scale},
                      q.data() + (size_t)t * n_head * hd, one.data(), n_head, pool, scratch);
        for (int i = 0; i < n_head * hd; i++)
            CHECK(one[i] == out[(size_t)t * n_head * hd + i]) << path << " row " << t << " alone differs";
    }
    check_against_naive(q, out, K, V, pos, seq, n_head, n_kv, hd, path, kv_dtype, window, scale);
}

}  // namespace

TEST(attention_long_context_2048) {
    const char *restore = tv_kernel_path();
    for (const char *path : tv::available_kernels()) {
        attention_long_case(TV_F32, path);
        attention_long_case(TV_F16, path);
    }
    tv::select_kernels(restore);
}

TEST(attention_c_abi_contiguous_and_paged) {
    // tv_attention (contiguous K/V, copied into blocks of 16) vs the double reference, and
    // tv_kv_cache_write + tv_attention_paged on shuffled blocks of 16: the same kernel, the same bits.
    const int n_head = 6, n_kv = 2, hd = 16, N = 45, nq = 7, row = n_kv * hd;
    std::vector<std::vector<float>> K{random_vec((size_t)N * row, -2, 2)}, V{random_vec((size_t)N * row)};
    std::vector<float> q = random_vec((size_t)nq * n_head * hd, -2, 2), out(q.size()), paged(q.size());
    std::vector<int32_t> pos(nq), seq(nq, 0), table = {5, 0, 3};
    std::iota(pos.begin(), pos.end(), N - nq);
    CHECK(tv_attention(nq, N, n_head, n_kv, hd, q.data(), K[0].data(), V[0].data(), TV_F32, out.data(), 2) == TV_OK)
        << tv_last_error();
    check_against_naive(q, out, K, V, pos, seq, n_head, n_kv, hd, tv_kernel_path(), TV_F32);

    tv_kv_cache *cache = nullptr;
    CHECK(tv_kv_cache_create_raw(1, n_kv, hd, 6, 16, TV_F32, &cache) == TV_OK);
    std::vector<int32_t> all(N), zeros(N, 0);
    std::iota(all.begin(), all.end(), 0);
    tv_batch wb{N, nullptr, all.data(), zeros.data(), 1, 3, table.data(), 0, nullptr};
    CHECK(tv_kv_cache_write(cache, 0, &wb, K[0].data(), V[0].data()) == TV_OK) << tv_last_error();
    tv_batch qb{nq, nullptr, pos.data(), seq.data(), 1, 3, table.data(), 0, nullptr};
    CHECK(tv_attention_paged(cache, 0, &qb, n_head, q.data(), paged.data(), 1) == TV_OK) << tv_last_error();
    CHECK(paged == out);
    table[1] = 6;  // out of range
    CHECK(tv_attention_paged(cache, 0, &qb, n_head, q.data(), paged.data(), 1) == TV_ERR_INVALID);
    CHECK(std::string(tv_last_error()).find("block_tables") != std::string::npos) << tv_last_error();
    CHECK(tv_attention(N + 1, N, n_head, n_kv, hd, q.data(), K[0].data(), V[0].data(), TV_F32, out.data(), 1) ==
          TV_ERR_INVALID);
    tv_kv_cache_free(cache);
}

// Sliding window (Gemma 3's local layers): windows shorter than, equal to, not a multiple of and
// longer than a block, so rows start mid-block (the separate tail call), on a block edge, or not
// at all; with a configured score scale. hd 64: the vector paths' specialized kernels.
TEST(attention_sliding_window) {
    const char *restore = tv_kernel_path();
    for (const char *path : tv::available_kernels())
        for (int window : {1, 7, 16, 37, 512}) {
            attention_long_case(TV_F32, path, window, window == 37 ? 0.2f : 0.0f);
            attention_long_case(TV_F16, path, window);
        }
    tv::select_kernels(restore);
}
