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

// Rows [r0, r1) of y = x W^T for one weight: y[i * ldy + r] for activation row i, weight row r.
void run_rows(const Kernels &K, const QuantGemm *G, const void *prep, const Weight &w, const float *x,
              const ActBlock *xq, int64_t m, float *y, int64_t ldy, int64_t r0, int64_t r1) {
    const int64_t n = ldy, k = w.cols, nb = k / QK;
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

// Decode-sized matmuls (m <= MAX_DUP_M) run as ThreadPool::run_dup jobs: a task may be computed
// twice (by the caller when the worker holding it was descheduled), so a task computes into its
// thread's pool scratch and is copied out once. Each output element is still computed by the same
// code from the same inputs, whoever runs it. Held by value: a late worker may read this after
// matmul returned (it reads weights, x / xq and prep: see ThreadPool::run_dup for their lifetime).
constexpr int MAXW = 4;
constexpr int64_t MAX_DUP_M = 64;  // larger (prefill) tasks are long and their copy-out is not free

struct MatmulJob {
    const Kernels *K;
    const QuantGemm *G;
    const void *prep;
    const float *x;
    const ActBlock *xq;
    int64_t m;
    Weight w[MAXW];
    float *y[MAXW];
    int64_t chunk[MAXW], first[MAXW + 1];

    void rows_of(int64_t t, int &j, int64_t &r0, int64_t &r1) const {
        j = 0;
        while (t >= first[j + 1]) j++;
        r0 = (t - first[j]) * chunk[j];
        r1 = std::min(w[j].rows, r0 + chunk[j]);
    }
    void compute(int64_t t, int, float *buf) const {
        int j;
        int64_t r0, r1;
        rows_of(t, j, r0, r1);
        Weight part = w[j];  // rows [r0, r1) as a weight of their own: buf[i * (r1 - r0) + r - r0]
        part.data += (size_t)r0 * part.row_bytes;
        part.rows = r1 - r0;
        run_rows(*K, G, prep, part, x, xq, m, buf, r1 - r0, 0, r1 - r0);
    }
    void commit(int64_t t, int, const float *buf) const {
        int j;
        int64_t r0, r1;
        rows_of(t, j, r0, r1);
        for (int64_t i = 0; i < m; i++)
            std::copy(buf + i * (r1 - r0), buf + (i + 1) * (r1 - r0), y[j] + i * w[j].rows + r0);
    }
};

}  // namespace

void matmul_multi(const Weight *const *ws, float *const *ys, int count, const float *x, const ActBlock *xq, int64_t m,
                  ThreadPool &pool) {
    if (m <= 0 || count <= 0) return;
    const Kernels &K = kernels();
    const int64_t k = ws[0]->cols;
    bool quant = false;
    int64_t chunk[MAXW], first[MAXW + 1];  // chunk rows of weight j; its chunks are tasks [first[j], first[j+1])
    const bool dup = m <= MAX_DUP_M && pool.size() > 1;
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
        // 5.4 ms instead of 6.6 with 8 per thread, medians of 4 runs) -- with the shared counter of
        // run(); run_dup below hands out contiguous ranges instead. Results do not depend on chunks.
        chunk[j] = std::clamp<int64_t>(n / ((int64_t)pool.size() * (m <= MAX_NX ? 2 : 8)), 1, m <= MAX_NX ? n : 512);
        // run_dup (decode): each thread runs a contiguous range of tasks (its weight stream runs on
        // from task to task), so tasks can be small: ~DUP_ITEM_BYTES of weights, what the caller
        // re-runs for a worker the OS descheduled; a task's m x rows outputs fit the pool scratch.
        if (dup && m <= MAX_NX) chunk[j] = std::max<int64_t>(1, DUP_ITEM_BYTES / (int64_t)ws[j]->row_bytes);
        const int64_t g = K.gemm ? K.gemm->rows_per_group : 1;
        chunk[j] = (chunk[j] + g - 1) / g * g;
        if (dup) chunk[j] = std::max<int64_t>(g, std::min(chunk[j], DUP_ITEM_FLOATS / m / g * g));
        first[j + 1] = first[j] + (n + chunk[j] - 1) / chunk[j];
    }
    count = std::min(count, MAXW);
    const QuantGemm *G = quant ? K.gemm : nullptr;
    const void *prep = G ? G->prepare(xq, m, k / QK, pool) : nullptr;
    if (dup) {
        MatmulJob job{&K, G, prep, x, xq, m, {}, {}, {}, {}};
        for (int j = 0; j < count; j++) {
            job.w[j] = *ws[j];
            job.y[j] = ys[j];
            job.chunk[j] = chunk[j];
        }
        std::copy(first, first + count + 1, job.first);
        pool.run_dup(first[count], (size_t)(m * *std::max_element(chunk, chunk + count)), job);
        return;
    }
    pool.run(first[count], [&](int64_t t, int) {
        int j = 0;
        while (t >= first[j + 1]) j++;
        const int64_t r0 = (t - first[j]) * chunk[j], r1 = std::min(ws[j]->rows, r0 + chunk[j]);
        run_rows(K, G, prep, *ws[j], x, xq, m, ys[j], ws[j]->rows, r0, r1);
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
