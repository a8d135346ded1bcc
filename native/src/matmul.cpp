// Matmul driver. Work is split over chunks of output rows (weight rows); inside a chunk every
// activation row is run against the chunk's weights, so each weight byte comes from DRAM once per
// matmul however large m is (the chunk stays in L1/L2 while the m rows go by).
#include "matmul.h"

#include <algorithm>

#include "kernels.h"
#include "tinyvllm.h"

namespace tv {

const ActBlock *quantize_acts(const float *x, int64_t m, int64_t k, std::vector<ActBlock> &buf) {
    const size_t nb = (size_t)(k / QK);
    if (buf.size() < (size_t)m * nb) buf.resize((size_t)m * nb);
    for (int64_t i = 0; i < m; i++) quantize_row_act(x + i * k, buf.data() + i * nb, k);
    return buf.data();
}

void matmul(const Weight &w, const float *x, const ActBlock *xq, int64_t m, float *y, ThreadPool &pool) {
    const int64_t n = w.rows, k = w.cols, nb = k / QK;
    if (m <= 0 || n <= 0) return;
    const Kernels &K = kernels();
    // ~8 chunks per thread for balance, at most 64 rows so a chunk of weights stays cache resident.
    const int64_t chunk = std::clamp<int64_t>(n / ((int64_t)pool.size() * 8), 1, 64);
    const int64_t n_chunks = (n + chunk - 1) / chunk;
    auto run_float = [&](auto &&dot) {
        pool.run(n_chunks, [&](int64_t c, int) {
            const int64_t r0 = c * chunk, r1 = std::min(n, r0 + chunk);
            for (int64_t i = 0; i < m; i++)
                for (int64_t r = r0; r < r1; r++) y[i * n + r] = dot(w.row(r), x + i * k);
        });
    };
    // Quantized: each weight row meets up to MAX_NX activation rows per pass (unpacked once).
    auto run_quant = [&](auto rows_fn) {
        pool.run(n_chunks, [&](int64_t c, int) {
            const int64_t r0 = c * chunk, r1 = std::min(n, r0 + chunk);
            for (int64_t i = 0; i < m; i += MAX_NX) {
                const int nx = (int)std::min<int64_t>(MAX_NX, m - i);
                for (int64_t r = r0; r < r1; r++) rows_fn(w.row(r), xq + i * nb, nb, nx, y + i * n + r, n);
            }
        });
    };
    switch (w.dtype) {
        case TV_F32:
            run_float([&](const uint8_t *wr, const float *xr) { return K.dot_f32(reinterpret_cast<const float *>(wr), xr, k); });
            break;
        case TV_F16:
            run_float([&](const uint8_t *wr, const float *xr) { return K.dot_f16(reinterpret_cast<const uint16_t *>(wr), xr, k); });
            break;
        case TV_Q4_0: run_quant(K.rows_q4_0); break;
        case TV_Q4_1: run_quant(K.rows_q4_1); break;
        case TV_Q8_0: run_quant(K.rows_q8_0); break;
        default: break;  // unreachable: dtypes are validated at the API
    }
}

void matmul(const Weight &w, const float *x, int64_t m, float *y, ThreadPool &pool, std::vector<ActBlock> &buf) {
    const ActBlock *xq = dtype_quantized(w.dtype) ? quantize_acts(x, m, w.cols, buf) : nullptr;
    matmul(w, x, xq, m, y, pool);
}

}  // namespace tv
