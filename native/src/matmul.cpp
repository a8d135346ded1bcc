// Matmul driver. Work is split over chunks of output rows (weight rows); inside a chunk every
// activation row is run against the chunk's weights, so each weight byte comes from DRAM once per
// matmul however large m is (the chunk stays in L1/L2 while the m rows go by).
#include "matmul.h"

#include <algorithm>

#include "kernels.h"
#include "tinyvllm.h"

namespace tv {

const BlockQ8x *quantize_acts(const float *x, int64_t m, int64_t k, std::vector<BlockQ8x> &buf) {
    const size_t nb = (size_t)(k / QK);
    if (buf.size() < (size_t)m * nb) buf.resize((size_t)m * nb);
    for (int64_t i = 0; i < m; i++) quantize_row_q8x(x + i * k, buf.data() + i * nb, k);
    return buf.data();
}

void matmul(const Weight &w, const float *x, const BlockQ8x *xq, int64_t m, float *y, ThreadPool &pool) {
    const int64_t n = w.rows, k = w.cols, nb = k / QK;
    if (m <= 0 || n <= 0) return;
    const Kernels &K = kernels();
    // ~8 chunks per thread for balance, at most 64 rows so a chunk of weights stays cache resident.
    const int64_t chunk = std::clamp<int64_t>(n / ((int64_t)pool.size() * 8), 1, 64);
    const int64_t n_chunks = (n + chunk - 1) / chunk;
    auto run = [&](auto &&dot) {
        pool.run(n_chunks, [&](int64_t c, int) {
            const int64_t r0 = c * chunk, r1 = std::min(n, r0 + chunk);
            for (int64_t i = 0; i < m; i++)
                for (int64_t r = r0; r < r1; r++) y[i * n + r] = dot(w.row(r), i);
        });
    };
    switch (w.dtype) {
        case TV_F32:
            run([&](const uint8_t *wr, int64_t i) { return K.dot_f32(reinterpret_cast<const float *>(wr), x + i * k, k); });
            break;
        case TV_F16:
            run([&](const uint8_t *wr, int64_t i) { return K.dot_f16(reinterpret_cast<const uint16_t *>(wr), x + i * k, k); });
            break;
        case TV_Q4_0:
            run([&](const uint8_t *wr, int64_t i) { return K.dot_q4_0(wr, xq + i * nb, nb); });
            break;
        case TV_Q4_1:
            run([&](const uint8_t *wr, int64_t i) { return K.dot_q4_1(wr, xq + i * nb, nb); });
            break;
        case TV_Q8_0:
            run([&](const uint8_t *wr, int64_t i) { return K.dot_q8_0(wr, xq + i * nb, nb); });
            break;
        default:
            break;  // unreachable: dtypes are validated at the API
    }
}

void matmul(const Weight &w, const float *x, int64_t m, float *y, ThreadPool &pool, std::vector<BlockQ8x> &buf) {
    const BlockQ8x *xq = dtype_quantized(w.dtype) ? quantize_acts(x, m, w.cols, buf) : nullptr;
    matmul(w, x, xq, m, y, pool);
}

}  // namespace tv
