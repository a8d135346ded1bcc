// Matmul speed on the reference model's shapes: GB/s of weight bytes streamed.
// Usage: tinyvllm_bench [threads=2] [m=1] [set=q4_1|q4_k_m]; prints the best call over ~1 s per shape.
// q4_k_m: the matmuls of the Q4_K_M SmolLM2 file (Q5_0 q/k/o/gate/up, Q8_0 v and output, Q4_K or
// Q6_K down) with the us per forward they add up to (x count per model).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "tinyvllm.h"

static double bench(const char *label, int32_t dtype, int64_t rows, int64_t cols, int64_t m, int threads, int count = 1) {
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
    std::printf("%-28s %-6s m=%-3lld threads=%d  %8.1f us  %6.1f GB/s weights  %7.1f GFLOP/s  x%-3d %8.1f us\n", label,
                tv_kernel_path(), (long long)m, threads, per * 1e6, w.size() / per / 1e9,
                2.0 * m * rows * cols / per / 1e9, count, count * per * 1e6);
    return count * per;
}

int main(int argc, char **argv) {
    const int threads = argc > 1 ? std::atoi(argv[1]) : 2;
    const int64_t m = argc > 2 ? std::atoll(argv[2]) : 1;
    if (argc > 3 && std::string(argv[3]) == "q4_k_m") {
        double t = 0;
        t += bench("Q5_0 576x576 (q, o)", TV_Q5_0, 576, 576, m, threads, 60);
        t += bench("Q5_0 192x576 (k)", TV_Q5_0, 192, 576, m, threads, 30);
        t += bench("Q8_0 192x576 (v)", TV_Q8_0, 192, 576, m, threads, 15);
        t += bench("Q5_0 192x576 (v)", TV_Q5_0, 192, 576, m, threads, 15);
        t += bench("Q5_0 1536x576 (gate, up)", TV_Q5_0, 1536, 576, m, threads, 60);
        t += bench("Q6_K 576x1536 (down)", TV_Q6_K, 576, 1536, m, threads, 14);
        t += bench("Q4_K 576x1536 (down)", TV_Q4_K, 576, 1536, m, threads, 16);
        if (m <= 4) t += bench("Q8_0 49152x576 (output)", TV_Q8_0, 49152, 576, m, threads);
        std::printf("sum of matmuls per forward: %.1f ms\n", t * 1e3);
        return 0;
    }
    bench("Q4_1 1536x576 (ffn up)", TV_Q4_1, 1536, 576, m, threads);
    bench("Q4_1 576x1536 (ffn down)", TV_Q4_1, 576, 1536, m, threads);
    bench("Q8_0 49152x576 (output)", TV_Q8_0, 49152, 576, m, threads);
    bench("F16 1536x576", TV_F16, 1536, 576, m, threads);
    return 0;
}
