// The thread pool's cost per parallel region (a decode step issues ~150: 5 per layer x 30 + the
// logits): batches of 150 back-to-back regions of trivial items, the fastest batch's mean per region,
// for run() and run_dup() at a few item counts, on 1 and 2 threads. With 2 threads the worker is
// spinning between regions (as in a decode step) when the OS runs it; the pool's counters say how
// many items it took. Set TINYVLLM_POOL_WAIT_SHARE=0 on a loaded machine, or the caller-wait back-off
// runs most regions on the caller alone.
// Usage: tinyvllm_bench_pool [batches=400]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "threadpool.h"

namespace {

struct Tiny {  // a run_dup item: one float computed, then copied out
    float *out;
    void compute(int64_t i, int, float *buf) const { buf[0] = (float)i; }
    void commit(int64_t i, int, const float *buf) const { out[i] = buf[0]; }
};

template <class F>
double ns_per_region(int batches, F &&region) {
    double best = 1e30;
    for (int b = 0; b < batches; b++) {
        const auto t0 = std::chrono::steady_clock::now();
        for (int r = 0; r < 150; r++) region();
        best = std::min(best, std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count() / 150);
    }
    return best;
}

}  // namespace

int main(int argc, char **argv) {
    const int batches = argc > 1 ? std::atoi(argv[1]) : 400;
    std::vector<float> out(64);
    for (int threads : {1, 2}) {
        tv::ThreadPool pool(threads);
        pool.reserve_scratch(1);
        const double run2 = ns_per_region(batches, [&] { pool.run(2, [&](int64_t i, int) { out[i] = 1; }); });
        const double run16 = ns_per_region(batches, [&] { pool.run(16, [&](int64_t i, int) { out[i] = 1; }); });
        const double dup16 = ns_per_region(batches, [&] { pool.run_dup(16, 1, Tiny{out.data()}); });
        const double dup64 = ns_per_region(batches, [&] { pool.run_dup(64, 1, Tiny{out.data()}); });
        const auto s = pool.stats();
        std::printf("threads %d: ns per region: run(2) %.0f, run(16) %.0f, run_dup(16) %.0f, run_dup(64) %.0f"
                    "  (jobs %llu, on the caller alone %llu, items run by workers %llu)\n",
                    threads, run2, run16, dup16, dup64, (unsigned long long)s.jobs, (unsigned long long)s.solo_jobs,
                    (unsigned long long)s.worker_items);
    }
}
