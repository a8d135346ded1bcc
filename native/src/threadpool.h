// A small persistent thread pool: run(n, fn) calls fn(i, tid) for every i in [0, n) spread over
// the workers and the calling thread (tid 0 is the caller, workers are 1..size()-1).
//
// Items are claimed one at a time from a shared counter, so which thread runs an item never changes
// what the item computes (results are the same for any thread count or timing).
//
// Sharing the cores with a busy process (a robot's perception loop) must not stall a job:
//  * A worker joins a job only while it is open; the caller closes it once every item is claimed and
//    then waits only for workers that hold an item. A worker the OS has not scheduled yet misses the
//    job instead of holding it up.
//  * A worker that is descheduled while holding an item still stalls the caller. When a wait exceeds
//    Backoff::stall_ns, the pool runs jobs on the caller alone for a back-off period (doubling while
//    stalls recur), then tries its workers again: one core that runs all the time
//    beats two that take turns with the neighbour, and decode is bandwidth-bound anyway.
//  * Workers spin briefly after a job (a decode step issues hundreds of small jobs back to back, and
//    a wake-up per job would dominate), then sleep on a condition variable.
// One job at a time: concurrent callers are serialized; a nested call runs inline.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace tv {

class ThreadPool {
   public:
    // When a wait for a worker counts as a stall, and the caller-only back-off that follows.
    struct Backoff {
        int64_t stall_ns = 1'000'000;          // a wait this long means a worker was descheduled
        int64_t min_solo_ns = 50'000'000;      // first back-off
        int64_t max_solo_ns = 2'000'000'000;   // doubling while stalls recur, up to this
    };

    explicit ThreadPool(int n_threads);  // n_threads <= 0: default_threads(); at most 256
    ThreadPool(int n_threads, Backoff backoff);
    ~ThreadPool();
    ThreadPool(const ThreadPool &) = delete;
    ThreadPool &operator=(const ThreadPool &) = delete;

    int size() const { return n_threads_; }

    // fn(int64_t i, int tid) must not throw.
    template <class F>
    void run(int64_t n, F &&fn) {
        using Fn = std::remove_reference_t<F>;
        run_impl(n, [](void *ctx, int64_t i, int tid) { (*static_cast<Fn *>(ctx))(i, tid); }, &fn);
    }

    // The CPUs this process may run on (its affinity mask), at least 1.
    static int default_threads();

    // Counters for tests and benchmarks (read while no job runs).
    struct Stats {
        uint64_t jobs = 0;        // jobs run (not counting inline single-item / nested calls)
        uint64_t solo_jobs = 0;   // of those, run on the caller alone (back-off after a stall)
        uint64_t stalls = 0;      // waits for a worker longer than Backoff::stall_ns
        uint64_t worker_items = 0;  // items run by workers
    };
    Stats stats() const;


   private:
    using TaskFn = void (*)(void *ctx, int64_t i, int tid);
    void run_impl(int64_t n, TaskFn fn, void *ctx);
    int64_t work(int tid);  // runs items until none is left; returns how many it ran
    void worker_loop(int tid);
    bool solo_now();

    // state_: generation << 32 | kOpen (the job accepts workers) | number of workers inside the job.
    static constexpr uint64_t kOpen = 1ull << 31;
    static constexpr uint64_t kCount = kOpen - 1;

    int n_threads_;
    Backoff backoff_;
    std::vector<std::thread> workers_;
    std::mutex dispatch_mu_;  // one job at a time
    std::mutex mu_;           // with cv_: sleeping workers
    std::condition_variable cv_;
    std::atomic<bool> stop_{false};
    std::atomic<uint64_t> state_{0};
    std::atomic<int> sleepers_{0};
    std::atomic<int64_t> next_{0};
    std::atomic<uint64_t> worker_items_{0};
    // Job fields: written by the caller while the job is closed and no worker is inside it.
    int64_t total_ = 0;
    TaskFn fn_ = nullptr;
    void *ctx_ = nullptr;
    // Back-off state, caller side (under dispatch_mu_).
    int64_t solo_until_ns_ = 0;
    int64_t solo_ns_;
    int64_t last_stall_ns_ = 0;
    Stats stats_;
};

}  // namespace tv
