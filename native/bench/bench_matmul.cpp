// Matmul speed on the reference model's shapes: GB/s of weight bytes streamed.
// Usage: tinyvllm_bench [threads=2] [m=1]; prints the best call over ~1 s per shape.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "tinyvllm.h"

static void bench(const char *label, int32_t dtype, int64_t rows, int64_t cols, int64_t m, int threads) {
    std::vector<uint8_t> w(tv_row_bytes(dtype, cols) * rows);
    std::mt19937 rng(1);
    for (auto &b : w) b = (uint8_t)rng();
    for (size_t i = 0; i + 1 < w.size(); i += 2) w[i + 1] &= 0x3B;  // keep fp16 scales finite-ish
    std::vector<float> x(m * cols), y(m * rows);
    for (auto &v : x) v = (float)(rng() % 2000) / 1000.0f - 1.0f;
    tv_tensor t{dtype, rows, cols, w.data(), w.size()};
    tv_matmul(&t, x.data(), m, y.data(), threads);  // warm up (pool, pages)
    // best call over ~1 s: robust to other processes on a shared machine (a mean is not)
    double per = 1e9, s = 0;
    const auto t0 = std::chrono::steady_clock::now();
    while (s < 1.0) {
        const auto t1 = std::chrono::steady_clock::now();
        tv_matmul(&t, x.data(), m, y.data(), threads);
        const auto t2 = std::chrono::steady_clock::now();
        per = std::min(per, std::chrono::duration<double>(t2 - t1).count());
        s = std::chrono::duration<double>(t2 - t0).count();
    }
    std::printf("%-28s %-6s m=%-3lld threads=%d  %8.1f us  %6.1f GB/s weights  %7.1f GFLOP/s\n", label,
                tv_kernel_path(), (long long)m, threads, per * 1e6, w.size() / per / 1e9,
                2.0 * m * rows * cols / per / 1e9);
}

int main(int argc, char **argv) {
    const int threads = argc > 1 ? std::atoi(argv[1]) : 2;
    const int64_t m = argc > 2 ? std::atoll(argv[2]) : 1;
    bench("Q4_1 1536x576 (ffn up)", TV_Q4_1, 1536, 576, m, threads);
    bench("Q4_1 576x1536 (ffn down)", TV_Q4_1, 576, 1536, m, threads);
    bench("Q8_0 49152x576 (output)", TV_Q8_0, 49152, 576, m, threads);
    bench("F16 1536x576", TV_F16, 1536, 576, m, threads);
    return 0;
}
