#include "threadpool.h"

#include <algorithm>
#include <chrono>

#if defined(__linux__)
#include <sched.h>
#endif

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

int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}
}  // namespace

int ThreadPool::default_threads() {
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        const int n = CPU_COUNT(&set);
        if (n > 0) return n;
    }
#endif
    const unsigned n = std::thread::hardware_concurrency();
    return n ? (int)n : 1;
}

ThreadPool::ThreadPool(int n_threads) : ThreadPool(n_threads, Backoff{}) {}

ThreadPool::ThreadPool(int n_threads, Backoff backoff)
    : n_threads_(std::min(n_threads > 0 ? n_threads : default_threads(), 256)),
      backoff_(backoff),
      solo_ns_(backoff.min_solo_ns) {
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

ThreadPool::Stats ThreadPool::stats() const {
    Stats s = stats_;
    s.worker_items = worker_items_.load(std::memory_order_relaxed);
    return s;
}

int64_t ThreadPool::work(int tid) {
    const ThreadPool *prev_pool = t_pool;
    const int prev_tid = t_tid;
    t_pool = this;
    t_tid = tid;
    int64_t done = 0;
    for (int64_t i; (i = next_.fetch_add(1, std::memory_order_relaxed)) < total_; done++) fn_(ctx_, i, tid);
    t_pool = prev_pool;
    t_tid = prev_tid;
    return done;
}

bool ThreadPool::solo_now() {
    if (solo_until_ns_ == 0) return false;
    if (now_ns() < solo_until_ns_) return true;
    solo_until_ns_ = 0;  // back-off over: try the workers again
    return false;
}

void ThreadPool::run_impl(int64_t n, TaskFn fn, void *ctx) {
    if (n <= 0) return;
    if (t_pool == this || workers_.empty() || n == 1) {  // nested, single-threaded or trivial
        const int tid = t_pool == this ? t_tid : 0;
        for (int64_t i = 0; i < n; i++) fn(ctx, i, tid);
        return;
    }
    std::lock_guard<std::mutex> job(dispatch_mu_);
    stats_.jobs++;
    if (solo_now()) {
        stats_.solo_jobs++;
        const ThreadPool *prev_pool = t_pool;
        t_pool = this;
        t_tid = 0;
        for (int64_t i = 0; i < n; i++) fn(ctx, i, 0);
        t_pool = prev_pool;
        return;
    }
    // No worker is inside a job here (the last one was closed and drained), so the fields are ours.
    fn_ = fn;
    ctx_ = ctx;
    total_ = n;
    next_.store(0, std::memory_order_relaxed);
    const uint64_t gen = (state_.load(std::memory_order_relaxed) >> 32) + 1;
    state_.store(gen << 32 | kOpen, std::memory_order_seq_cst);  // publishes the fields above
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {  // pairs with the worker's increment, then check
        { std::lock_guard<std::mutex> lk(mu_); }
        cv_.notify_all();
    }
    const int64_t t0 = now_ns();
    const int64_t mine = work(0);
    // Every item is claimed: late workers must not join any more; wait for those that hold items.
    const uint64_t s = state_.fetch_and(~kOpen, std::memory_order_acq_rel);
    if ((s & kCount) == 0) return;
    const int64_t t1 = now_ns();
    int64_t waited = 0;
    for (int spins = 0; state_.load(std::memory_order_acquire) & kCount; spins++) {
        if (spins < 2048) {
            cpu_relax();
        } else {
            std::this_thread::yield();
        }
        if ((spins & 63) == 63) waited = now_ns() - t1;
    }
    // A worker legitimately finishes the one item it holds; far longer means it was descheduled.
    const int64_t item_ns = mine > 0 ? (t1 - t0) / mine : t1 - t0;
    if (waited > backoff_.stall_ns + 4 * item_ns) {
        const int64_t t = now_ns();
        stats_.stalls++;
        solo_ns_ = t - last_stall_ns_ < solo_ns_ + 1'000'000'000 ? std::min(2 * solo_ns_, backoff_.max_solo_ns)
                                                                : backoff_.min_solo_ns;
        last_stall_ns_ = t;
        solo_until_ns_ = t + solo_ns_;
    }
}

void ThreadPool::worker_loop(int tid) {
    uint64_t seen = 0;  // the last generation this worker looked at
    for (;;) {
        // Spin for a short while (~0.5 ms) expecting the next job, then sleep.
        const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(500);
        uint64_t s;
        for (int i = 0; ((s = state_.load(std::memory_order_acquire)) >> 32) == seen; i++) {
            cpu_relax();
            if ((i & 255) == 255 && std::chrono::steady_clock::now() > spin_until) {
                std::unique_lock<std::mutex> lk(mu_);
                sleepers_.fetch_add(1, std::memory_order_seq_cst);
                cv_.wait(lk, [&] {
                    return stop_.load() || (state_.load(std::memory_order_seq_cst) >> 32) != seen;
                });
                sleepers_.fetch_sub(1, std::memory_order_relaxed);
                s = state_.load(std::memory_order_acquire);
                break;
            }
        }
        if (stop_.load(std::memory_order_acquire)) return;
        seen = s >> 32;
        // Join only the job we saw, and only while it is open.
        while ((s >> 32) == seen && (s & kOpen) &&
               !state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        }
        if ((s >> 32) != seen || !(s & kOpen)) continue;  // missed it: the caller did the work
        const int64_t done = work(tid);
        if (done) worker_items_.fetch_add((uint64_t)done, std::memory_order_relaxed);
        state_.fetch_sub(1, std::memory_order_release);
    }
}

}  // namespace tv
