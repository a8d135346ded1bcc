// ThreadPool: every item runs exactly once whatever the timing, nested and concurrent calls work,
// and a worker descheduled while holding an item switches the pool to caller-only jobs for a while
// (run) or has its item re-run by the caller, committed once (run_dup).
#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>
#include <string>
#include <tuple>

#if defined(__linux__)
#include <sched.h>
#endif

#include "helpers.h"
#include "kernels.h"
#include "matmul.h"
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
    long_backoff.max_wait_share = 0;  // only stalls switch (a busy test machine makes the caller wait)
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
    short_backoff.max_wait_share = 0;
    ThreadPool pool(2, short_backoff);
    CHECK(provoke_stall(pool)) << "no stall seen";
    const auto before = pool.stats();
    for (int waits = 0; pool.stats().worker_items == before.worker_items && waits < 200; waits++) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        pool.run(256, [&](int64_t, int) { std::this_thread::sleep_for(std::chrono::microseconds(20)); });
    }
    CHECK(pool.stats().worker_items > before.worker_items) << "workers never came back";
}

// run_dup: item i's value is computed into the thread's own slot and copied out once. A worker whose
// item sleeps (tid != 0 and sleep_us > 0) stands for one the OS descheduled mid-item.
struct DupProbe {
    std::atomic<int> *commits;  // per item
    std::atomic<int> *computes;  // per item
    int64_t *out;                // per item: the committed value
    int64_t sleep_us;
    void compute(int64_t i, int tid, float *buf) const {
        computes[i]++;
        if (tid != 0 && sleep_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(sleep_us));
        const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(sleep_us > 0 ? 20 : 0);
        while (std::chrono::steady_clock::now() < until) {  // busy, so a waking worker can join
        }
        const int64_t v = i * 1000003 + 7;
        std::memcpy(buf, &v, sizeof v);  // two floats of the thread's scratch
    }
    void commit(int64_t i, int, const float *buf) const {
        commits[i]++;
        std::memcpy(&out[i], buf, sizeof out[i]);
    }
};

static void check_dup_job(ThreadPool &pool, int64_t n, int64_t sleep_us) {
    std::vector<std::atomic<int>> commits(n), computes(n);
    std::vector<int64_t> out(n, -1);
    pool.run_dup(n, 2, DupProbe{commits.data(), computes.data(), out.data(), sleep_us});
    for (int64_t i = 0; i < n; i++) {
        CHECK(commits[i].load() == 1) << "item " << i << " committed " << commits[i].load() << " times";
        CHECK(out[i] == i * 1000003 + 7) << "item " << i;
        CHECK(computes[i].load() >= 1);
    }
    pool.quiesce();  // a stale worker may still be in compute(): it must not touch freed vectors
}

TEST(threadpool_dup_every_item_committed_once) {
    for (int threads : {1, 2, 3, 8}) {
        ThreadPool pool(threads);
        for (int rep = 0; rep < 300; rep++) check_dup_job(pool, tvtest::randint(0, 200), 0);
        CHECK(pool.stats().dup_items == 0 || threads > 1);
    }
}

TEST(threadpool_dup_caller_takes_over_descheduled_worker) {
    ThreadPool::Backoff no_wait_check;
    no_wait_check.max_wait_share = 0;
    ThreadPool pool(2, no_wait_check);  // waits for stale workers before returning (the default)
    for (int tries = 0; tries < 200 && pool.stats().dup_items == 0; tries++) check_dup_job(pool, 16, 20'000);
    CHECK(pool.stats().dup_items > 0) << "the caller never re-ran a sleeping worker's item";
    CHECK(pool.stats().stalls == 0);     // run_dup does not count waits as stalls
    CHECK(pool.stats().solo_jobs == 0);  // ... nor back off to caller-only jobs
}

TEST(threadpool_dup_stale_worker_leaves_jobs_to_the_caller) {
    ThreadPool pool(2);
    pool.set_allow_stale_workers(true);
    std::vector<std::atomic<int>> commits(16), computes(16);
    std::vector<int64_t> out(16, -1);
    bool stale = false;
    for (int tries = 0; tries < 200 && !stale; tries++) {
        pool.quiesce();
        const auto before = pool.stats();
        for (auto &c : commits) c = 0;
        pool.run_dup(16, 2, DupProbe{commits.data(), computes.data(), out.data(), 200'000});  // a 200 ms nap
        for (int i = 0; i < 16; i++) CHECK(commits[i].load() == 1 && out[i] == i * 1000003 + 7);
        if (pool.stats().dup_items == before.dup_items) continue;
        // The napping worker is still inside: the next jobs run on the caller alone, and complete.
        std::atomic<int> done{0};
        pool.run(64, [&](int64_t, int tid) {
            CHECK(tid == 0);
            done++;
        });
        CHECK(done.load() == 64);
        stale = pool.stats().stale_solo_jobs > before.stale_solo_jobs;
    }
    CHECK(stale) << "never saw a stale worker";
    pool.quiesce();
    for (int i = 0; i < 16; i++) CHECK(commits[i].load() == 1) << "a late worker committed item " << i;
}

#if defined(__linux__)
// The caller sharing its CPU with two busy threads waits for it most of the time: the pool must see
// that, run jobs on the caller alone, and then bring its workers back off the caller's CPU.
TEST(threadpool_caller_waiting_for_a_cpu_backs_off) {
    cpu_set_t old_set, one;
    CHECK(sched_getaffinity(0, sizeof old_set, &old_set) == 0);
    int cpu = 0;
    while (!CPU_ISSET(cpu, &old_set)) cpu++;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    ThreadPool::Backoff quick;
    quick.min_solo_ns = 1'000'000;
    ThreadPool pool(2, quick);  // made before the pinning: it may use every CPU
    CHECK(sched_setaffinity(0, sizeof one, &one) == 0);  // this thread only; pool workers are free
    std::atomic<bool> stop{false};
    std::vector<std::thread> hogs;
    for (int h = 0; h < 2; h++)
        hogs.emplace_back([&] {
            sched_setaffinity(0, sizeof one, &one);
            while (!stop.load()) {
            }
        });
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(3);
    while ((pool.stats().caller_waits == 0 || pool.stats().worker_moves == 0) &&
           std::chrono::steady_clock::now() < until)
        pool.run(8, [](int64_t, int) {
            const auto t = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
            while (std::chrono::steady_clock::now() < t) {
            }
        });
    stop = true;
    for (auto &h : hogs) h.join();
    sched_setaffinity(0, sizeof old_set, &old_set);
    CHECK(pool.stats().caller_waits > 0) << "the caller's run-queue wait went unnoticed";
    CHECK(pool.stats().solo_jobs > 0);
    CHECK(pool.stats().worker_moves > 0) << "the workers were not kept off the caller's CPU after the back-off";
}
#endif

TEST(threadpool_default_threads_positive) { CHECK(ThreadPool::default_threads() >= 1); }

// A thread runs a matmul on a pool that allows stale workers and exits at once, while a worker
// still sleeps in one of the job's tasks (test_item_delay_ns stands for the OS descheduling it): the
// caller re-ran that task and returned; the late worker then reads the exited thread's prepared
// activations (a thread_local). StaleReaders in it must hold the thread's exit until the worker is
// out (under ASan a read after the free is reported). Results stay exact.
TEST(threadpool_caller_thread_exits_while_a_worker_is_stale) {
    ThreadPool::Backoff slow_worker;
    slow_worker.test_item_delay_ns = 20'000'000;
    slow_worker.max_wait_share = 0;
    ThreadPool pool(2, slow_worker);
    pool.set_allow_stale_workers(true);
    pool.reserve_scratch((size_t)tv::DUP_ITEM_FLOATS);
    for (int32_t dtype : {TV_Q4_1, TV_Q8_0, TV_F32}) {
        tvtest::HostTensor w = tvtest::random_tensor(dtype, 4096, 576);  // a job long enough for a worker to join
        const tv_tensor desc = w.desc();
        const tv::Weight W = tv::check_weight("w", &desc);
        for (int64_t m : {1, 3, 8}) {
            std::vector<float> x = tvtest::random_vec((size_t)(m * 576)), ref((size_t)(m * 4096));
            CHECK(tv_matmul(&desc, x.data(), m, ref.data(), 1) == TV_OK);
            std::vector<tv::ActBlock> xq;  // the owner's buffer (a Model's scratch): outlives the threads
            const auto before = pool.stats();
            for (int rep = 0; rep < 3 || (rep < 10 && pool.stats().dup_items == before.dup_items); rep++) {
                std::vector<float> y((size_t)(m * 4096), -1.0f);
                std::thread caller([&] { tv::matmul(W, x.data(), m, y.data(), pool, xq); });
                caller.join();  // its thread_locals are gone: no worker may read them any more
                CHECK(y == ref) << "dtype " << desc.dtype << " m " << m;
            }
            pool.quiesce();  // before xq goes
        }
    }
    // (per case a worker woken too late on a loaded machine may miss every job: checked overall)
    CHECK(pool.stats().dup_items > 0) << "no task was re-run: the worker was never stale";
}

// A Model-like owner reuses one pool across forwards of different row counts (a decode step, then a
// chunked prefill's 40 rows, then the logits row): the caller's prepared activations change shape
// under a late worker only after it left. Results match a single-threaded pool exactly.
TEST(threadpool_stale_worker_across_shapes) {
    ThreadPool::Backoff slow_worker;
    slow_worker.test_item_delay_ns = 3'000'000;
    slow_worker.max_wait_share = 0;
    ThreadPool pool(2, slow_worker), one(1);
    pool.set_allow_stale_workers(true);
    pool.reserve_scratch((size_t)tv::DUP_ITEM_FLOATS);
    tvtest::HostTensor a = tvtest::random_tensor(TV_Q4_1, 768, 576), b = tvtest::random_tensor(TV_Q4_0, 512, 1536);
    const tv_tensor da = a.desc(), db = b.desc();
    const tv::Weight Wa = tv::check_weight("a", &da), Wb = tv::check_weight("b", &db);
    std::vector<tv::ActBlock> xq, xq1;
    for (int64_t m : {1, 40, 1, 2, 64, 1}) {
        std::vector<float> xa = tvtest::random_vec((size_t)(m * 576)), xb = tvtest::random_vec((size_t)(m * 1536));
        std::vector<float> ya((size_t)(m * 768)), yb((size_t)(m * 512)), ra(ya.size()), rb(yb.size());
        tv::matmul(Wa, xa.data(), m, ya.data(), pool, xq);
        tv::matmul(Wb, xb.data(), m, yb.data(), pool, xq);
        tv::matmul(Wa, xa.data(), m, ra.data(), one, xq1);
        tv::matmul(Wb, xb.data(), m, rb.data(), one, xq1);
        CHECK(ya == ra && yb == rb) << "m " << m;
        pool.quiesce();  // xa / xb go (a Model's forward starts with this)
    }
}

// The per-thread task buffers a Model reserves (and runner/native_runner.py's workspace_bytes pays)
// are all the matmul driver ever needs: no shape grows them, every decode / small-batch row count on
// every kernel path (a task's rows depend on the row width and m, not on the weight's height: a
// vocabulary-tall output matrix needs no more than these).
TEST(threadpool_matmul_scratch_stays_reserved) {
    const char *restore = tv_kernel_path();
    std::vector<tvtest::HostTensor> ws;
    for (auto [dtype, n, k] : {std::tuple<int32_t, int64_t, int64_t>{TV_Q8_0, 4096, 576}, {TV_Q4_1, 1536, 576},
                               {TV_Q4_K, 576, 1536}, {TV_F32, 300, 64}, {TV_F16, 100, 64}})
        ws.push_back(tvtest::random_tensor(dtype, n, k));
    for (const char *path : tv::available_kernels()) {
        tv::select_kernels(path);
        for (int threads : {2, 3}) {
            if (threads == 3 && std::string(path) != restore) continue;  // (3 threads: one path, for time)
            ThreadPool pool(threads);
            pool.reserve_scratch((size_t)tv::DUP_ITEM_FLOATS);
            for (const tvtest::HostTensor &w : ws) {
                const tv_tensor desc = w.desc();
                const tv::Weight W = tv::check_weight("w", &desc);
                std::vector<tv::ActBlock> xq;
                for (int64_t m : {1, 2, 3, 4, 5, 8, 16, 33, 64}) {
                    std::vector<float> x = tvtest::random_vec((size_t)(m * w.cols)), y((size_t)(m * w.rows));
                    tv::matmul(W, x.data(), m, y.data(), pool, xq);
                    CHECK(pool.scratch_floats() == (size_t)tv::DUP_ITEM_FLOATS)
                        << path << " dtype " << w.dtype << " n " << w.rows << " m " << m << ": grew to " << pool.scratch_floats();
                }
            }
        }
    }
    tv::select_kernels(restore);
}
