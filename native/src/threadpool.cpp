#include "threadpool.h"

#include <algorithm>
#include <chrono>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#elif defined(__aarch64__)
static inline void cpu_relax() { __asm__ __volatile__("yield"); }
#else
static inline void cpu_relax() {}
#endif

namespace tv {
namespace {
thread_local const ThreadPool *t_pool = nullptr;  // the pool this thread is running a job for
thread_local int t_tid = 0;
}  // namespace

int ThreadPool::default_threads() {
    const unsigned n = std::thread::hardware_concurrency();
    return n ? (int)n : 1;
}

ThreadPool::ThreadPool(int n_threads) : n_threads_(std::min(n_threads > 0 ? n_threads : default_threads(), 256)) {
    workers_.reserve(n_threads_ - 1);
    for (int t = 1; t < n_threads_; t++) workers_.emplace_back([this, t] { worker_loop(t); });
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lk(mu_);
        stop_.store(true);
    }
    cv_.notify_all();
    for (auto &w : workers_) w.join();
}

void ThreadPool::work(int tid) {
    const ThreadPool *prev_pool = t_pool;
    const int prev_tid = t_tid;
    t_pool = this;
    t_tid = tid;
    for (int64_t i; (i = next_.fetch_add(1, std::memory_order_relaxed)) < total_;) fn_(ctx_, i, tid);
    t_pool = prev_pool;
    t_tid = prev_tid;
}

void ThreadPool::run_impl(int64_t n, TaskFn fn, void *ctx) {
    if (n <= 0) return;
    if (t_pool == this || workers_.empty() || n == 1) {  // nested, single-threaded or trivial
        const int tid = t_pool == this ? t_tid : 0;
        for (int64_t i = 0; i < n; i++) fn(ctx, i, tid);
        return;
    }
    std::lock_guard<std::mutex> job(dispatch_mu_);
    fn_ = fn;
    ctx_ = ctx;
    total_ = n;
    next_.store(0, std::memory_order_relaxed);
    pending_.store((int)workers_.size(), std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);  // publishes the job fields above
    { std::lock_guard<std::mutex> lk(mu_); }  // a worker between its check and wait sees the bump
    cv_.notify_all();
    work(0);
    // Wait for workers to leave the job (they may still be running their last item).
    for (int spins = 0; pending_.load(std::memory_order_acquire) != 0; spins++) {
        if (spins < 4096) cpu_relax();
        else std::this_thread::yield();
    }
}

void ThreadPool::worker_loop(int tid) {
    uint64_t seen = 0;
    for (;;) {
        // Spin for a short while (~0.5 ms) expecting the next job, then sleep.
        const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(500);
        for (int i = 0; generation_.load(std::memory_order_acquire) == seen; i++) {
            cpu_relax();
            if ((i & 255) == 255 && std::chrono::steady_clock::now() > spin_until) {
                std::unique_lock<std::mutex> lk(mu_);
                cv_.wait(lk, [&] { return stop_.load() || generation_.load(std::memory_order_acquire) != seen; });
                break;
            }
        }
        if (stop_.load(std::memory_order_acquire)) return;
        seen = generation_.load(std::memory_order_acquire);
        work(tid);
        pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
}

}  // namespace tv
