// Matmul driver. Work is split over chunks of output rows (weight rows); inside a chunk every
// activation row is run against the chunk's weights, so each weight byte comes from DRAM once per
// matmul however large m is (the chunk stays in L1/L2 while the m rows go by). Every output
// element is computed by one thread in a fixed order: results do not depend on the thread count.
#include "matmul.h"

#include <algorithm>

#include "common.h"
#include "kernels.h"

namespace tv {

Weight check_weight(const char *what, const tv_tensor *t) {
    if (!t) fail("%s: tensor is null", what);
    if (!dtype_known(t->dtype))
        fail("%s: unsupported dtype %d (supported: %s)", what, t->dtype, dtype_names_supported());
    if (t->rows <= 0 || t->cols <= 0)
        fail("%s: rows and cols must be > 0 (got %lld x %lld)", what, (long long)t->rows, (long long)t->cols);
    const size_t rb = row_bytes(t->dtype, t->cols);
    if (rb == 0) fail("%s: %lld columns is not a whole number of %s blocks", what, (long long)t->cols, dtype_name(t->dtype));
    const size_t expect = checked_mul(rb, (size_t)t->rows, what);
    if (t->nbytes != expect)
        fail("%s: nbytes %zu, expected %zu for %s %lld x %lld", what, t->nbytes, expect, dtype_name(t->dtype),
             (long long)t->rows, (long long)t->cols);
    if (!t->data) fail("%s: tensor data is null", what);
    return Weight{t->dtype, t->rows, t->cols, static_cast<const uint8_t *>(t->data), rb};
}

const ActBlock *quantize_acts(const float *x, int64_t m, int64_t k, std::vector<ActBlock> &buf) {
    const size_t nb = (size_t)(k / QK);
    if (buf.size() < (size_t)m * nb) buf.resize((size_t)m * nb);
    for (int64_t i = 0; i < m; i++) kernels().quantize_act(x + i * k, buf.data() + i * nb, k);
    return buf.data();
}

namespace {

// Rows [r0, r1) of y = x W^T for one weight.
void run_rows(const Kernels &K, const QuantGemm *G, const void *prep, const Weight &w, const float *x,
              const ActBlock *xq, int64_t m, float *y, int64_t r0, int64_t r1) {
    const int64_t n = w.rows, k = w.cols, nb = k / QK;
    switch (w.dtype) {
        case TV_F32:
            for (int64_t i = 0; i < m; i++)
                for (int64_t r = r0; r < r1; r++)
                    y[i * n + r] = K.dot_f32(reinterpret_cast<const float *>(w.row(r)), x + i * k, k);
            return;
        case TV_F16:
            for (int64_t i = 0; i < m; i++)
                for (int64_t r = r0; r < r1; r++)
                    y[i * n + r] = K.dot_f16(reinterpret_cast<const uint16_t *>(w.row(r)), x + i * k, k);
            return;
        default: break;
    }
    if (G && G->run(w.dtype, w.data, w.row_bytes, r0, r1, prep, m, nb, y, n)) return;
    const RowsFn rows_fn = K.rows[w.dtype];
    // each weight row meets up to MAX_NX activation rows per pass (unpacked once)
    for (int64_t i = 0; i < m; i += MAX_NX) {
        const int nx = (int)std::min<int64_t>(MAX_NX, m - i);
        for (int64_t r = r0; r < r1; r++) rows_fn(w.row(r), xq + i * nb, nb, nx, y + i * n + r, n);
    }
}

}  // namespace

void matmul_multi(const Weight *const *ws, float *const *ys, int count, const float *x, const ActBlock *xq, int64_t m,
                  ThreadPool &pool) {
    if (m <= 0 || count <= 0) return;
    const Kernels &K = kernels();
    const int64_t k = ws[0]->cols;
    bool quant = false;
    constexpr int MAXW = 4;
    int64_t chunk[MAXW], first[MAXW + 1];  // chunk rows of weight j; its chunks are tasks [first[j], first[j+1])
    first[0] = 0;
    for (int j = 0; j < count && j < MAXW; j++) {
        const int64_t n = ws[j]->rows;
        quant |= dtype_quantized(ws[j]->dtype);
        // m > 4: ~8 chunks per thread for balance (tasks are handed out dynamically), at most 512 rows
        // (the panel path unpacks 8 weight rows at a time and prefetches the next 8 within a task: a
        // task's start waits for its first rows, and 64-row chunks of the 49,152-row output matrix
        // at m = 32 cost 30% more than 512-row ones, single-thread CPU time). m <= 4 (decode):
        // each weight row is read once anyway, and a task start costs a DRAM ramp-up (the prefetch
        // runs ahead only within a task), so 2 long chunks per thread (a reference-model decode step:
        // 5.4 ms instead of 6.6 with 8 per thread, medians of 4 runs). Results do not depend on chunks.
        chunk[j] = std::clamp<int64_t>(n / ((int64_t)pool.size() * (m <= MAX_NX ? 2 : 8)), 1, m <= MAX_NX ? n : 512);
        if (K.gemm) chunk[j] = (chunk[j] + K.gemm->rows_per_group - 1) / K.gemm->rows_per_group * K.gemm->rows_per_group;
        first[j + 1] = first[j] + (n + chunk[j] - 1) / chunk[j];
    }
    count = std::min(count, MAXW);
    const QuantGemm *G = quant ? K.gemm : nullptr;
    const void *prep = G ? G->prepare(xq, m, k / QK, pool) : nullptr;
    pool.run(first[count], [&](int64_t t, int) {
        int j = 0;
        while (t >= first[j + 1]) j++;
        const int64_t r0 = (t - first[j]) * chunk[j], r1 = std::min(ws[j]->rows, r0 + chunk[j]);
        run_rows(K, G, prep, *ws[j], x, xq, m, ys[j], r0, r1);
    });
}

void matmul(const Weight &w, const float *x, const ActBlock *xq, int64_t m, float *y, ThreadPool &pool) {
    if (w.rows <= 0) return;
    const Weight *ws[1] = {&w};
    float *ys[1] = {y};
    matmul_multi(ws, ys, 1, x, xq, m, pool);
}

void matmul(const Weight &w, const float *x, int64_t m, float *y, ThreadPool &pool, std::vector<ActBlock> &buf) {
    const ActBlock *xq = dtype_quantized(w.dtype) ? quantize_acts(x, m, w.cols, buf) : nullptr;
    matmul(w, x, xq, m, y, pool);
}

}  // namespace tv
