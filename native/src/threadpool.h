// A small persistent thread pool: run(n, fn) calls fn(i, tid) for every i in [0, n) spread over
// the workers and the calling thread (tid 0 is the caller, workers are 1..size()-1).
// Workers spin briefly after a job before sleeping, because a decode step issues hundreds of
// small jobs back to back and a condition-variable wake-up per job would dominate.
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
    explicit ThreadPool(int n_threads);  // n_threads <= 0: one per online CPU; at most 256
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

    static int default_threads();

   private:
    using TaskFn = void (*)(void *ctx, int64_t i, int tid);
    void run_impl(int64_t n, TaskFn fn, void *ctx);
    void work(int tid);
    void worker_loop(int tid);

    int n_threads_;
    std::vector<std::thread> workers_;
    std::mutex dispatch_mu_;  // one job at a time
    std::mutex mu_;
    std::condition_variable cv_;
    std::atomic<bool> stop_{false};
    std::atomic<uint64_t> generation_{0};
    std::atomic<int64_t> next_{0};
    std::atomic<int> pending_{0};  // workers that have not finished the current job
    int64_t total_ = 0;
    TaskFn fn_ = nullptr;
    void *ctx_ = nullptr;
};

}  // namespace tv
