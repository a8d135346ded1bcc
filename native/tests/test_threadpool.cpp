// ThreadPool: every item runs exactly once whatever the timing, nested and concurrent calls work,
// and a worker descheduled while holding an item switches the pool to caller-only jobs for a while.
#include <atomic>
#include <chrono>
#include <thread>

#include "test.h"
#include "threadpool.h"

using tv::ThreadPool;

TEST(threadpool_every_item_once) {
    for (int threads : {1, 2, 3, 8}) {
        ThreadPool pool(threads);
        for (int rep = 0; rep < 300; rep++) {
            const int64_t n = tvtest::randint(0, 200);
            std::vector<std::atomic<int>> hits(n);
            std::atomic<int> bad_tid{0};
            pool.run(n, [&](int64_t i, int tid) {
                hits[i].fetch_add(1);
                if (tid < 0 || tid >= pool.size()) bad_tid++;
                if (i % 17 == 0) std::this_thread::yield();  // uneven items
            });
            for (int64_t i = 0; i < n; i++) CHECK(hits[i].load() == 1) << "threads " << threads << " item " << i;
            CHECK(bad_tid.load() == 0);
        }
    }
}

TEST(threadpool_nested_and_concurrent_callers) {
    ThreadPool pool(3);
    std::atomic<int64_t> sum{0};
    pool.run(8, [&](int64_t i, int) { pool.run(4, [&](int64_t j, int) { sum += i * 4 + j; }); });  // inline
    CHECK(sum.load() == 31 * 32 / 2);
    std::vector<std::thread> callers;
    std::atomic<int64_t> total{0};
    for (int c = 0; c < 4; c++)
        callers.emplace_back([&] {
            for (int rep = 0; rep < 200; rep++) pool.run(10, [&](int64_t i, int) { total += i; });
        });
    for (auto &t : callers) t.join();
    CHECK(total.load() == 4 * 200 * 45);
}

// A worker that sleeps inside an item stands for one the OS descheduled. The caller finishes the other
// items at once and then waits for it: that wait is a stall. Returns whether one was seen.
static bool provoke_stall(ThreadPool &pool) {
    for (int tries = 0; tries < 500 && pool.stats().stalls == 0; tries++) {
        std::atomic<int> done{0};
        pool.run(64, [&](int64_t, int tid) {
            if (tid != 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));
            const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(20);
            while (std::chrono::steady_clock::now() < until) {  // busy, so a waking worker can join
            }
            done++;
        });
        CHECK(done.load() == 64);
    }
    return pool.stats().stalls > 0;
}

TEST(threadpool_stalled_worker_switches_to_solo) {
    ThreadPool::Backoff long_backoff;
    long_backoff.min_solo_ns = long_backoff.max_solo_ns = 3600'000'000'000;  // solo for the rest of the test
    ThreadPool pool(2, long_backoff);
    CHECK(provoke_stall(pool)) << "no stall seen";
    const auto before = pool.stats();
    for (int rep = 0; rep < 20; rep++) {
        std::atomic<int> done{0};
        pool.run(64, [&](int64_t, int tid) {
            CHECK(tid == 0);  // solo: the caller runs everything, and still every item
            done++;
        });
        CHECK(done.load() == 64);
    }
    CHECK(pool.stats().solo_jobs == before.solo_jobs + 20);
    CHECK(pool.stats().worker_items == before.worker_items);
}

TEST(threadpool_workers_return_after_backoff) {
    ThreadPool::Backoff short_backoff;
    short_backoff.min_solo_ns = short_backoff.max_solo_ns = 1'000'000;  // 1 ms
    ThreadPool pool(2, short_backoff);
    CHECK(provoke_stall(pool)) << "no stall seen";
    const auto before = pool.stats();
    for (int waits = 0; pool.stats().worker_items == before.worker_items && waits < 200; waits++) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        pool.run(256, [&](int64_t, int) { std::this_thread::sleep_for(std::chrono::microseconds(20)); });
    }
    CHECK(pool.stats().worker_items > before.worker_items) << "workers never came back";
}

TEST(threadpool_default_threads_positive) { CHECK(ThreadPool::default_threads() >= 1); }
