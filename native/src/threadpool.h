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
//  * run_dup() jobs (the matmuls, most of a decode step) never wait for a descheduled worker. Their
//    items are split into one contiguous range per thread (a thread's items follow each other in
//    memory, so its weight stream and prefetch run on across items); a thread takes items from the
//    front of its own range, then steals from the back of the others'. Every thread computes an item
//    into its own buffer and then commits it (copies it out) only if nobody has yet. When the caller
//    has run out of items and a worker's item is overdue (Backoff::dup_after_ns), the caller computes
//    that item too and commits first; the late worker discards its copy when it wakes. Jobs that come
//    while such a stale worker is still inside run on the caller alone (the stale worker still reads
//    its old job's fields), so the caller uses the second core whenever the neighbour leaves it and
//    never waits for it. Memory a stale worker may still read (the caller's activations) must not be
//    freed before quiesce_all(): see StaleReaders below.
//  * A worker that is descheduled while holding an item of a run() job still stalls the caller. When
//    such stalls (waits over Backoff::stall_ns) take a good share of the time, the pool runs jobs on
//    the caller alone for a back-off period (doubling while stalls recur), then tries its workers
//    again: one core that runs all the time beats two that take turns with the neighbour.
//  * The caller itself waiting for a CPU (Backoff::max_wait_share) backs off the same way; then the
//    workers resume kept off the caller's CPU, so the caller keeps a core and a worker takes what
//    the neighbour leaves of another (run_dup covers its descheduled items).
//  * Workers spin briefly after a job (a decode step issues hundreds of small jobs back to back, and
//    a wake-up per job would dominate), then sleep on a condition variable.
// One job at a time: concurrent callers are serialized; a nested call runs inline.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

namespace tv {

class ThreadPool {
   public:
    // When a wait for a worker counts as a stall, and the caller-only back-off that follows.
    struct Backoff {
        int64_t stall_ns = 1'000'000;          // a wait this long means a worker was descheduled
        int64_t min_solo_ns = 50'000'000;      // first back-off
        int64_t max_solo_ns = 2'000'000'000;   // doubling while stalls recur, up to this
        int64_t dup_after_ns = 20'000;          // run_dup: re-run a worker's item overdue by this
                                                // (plus two of the caller's item times)
        int64_t test_item_delay_ns = 0;         // tests only: a worker sleeps this long in each run_dup
                                                // item (one the OS descheduled)
        // The caller itself waiting for a CPU (its run-queue wait, /proc/thread-self/schedstat, over
        // windows of wait_window_ns) for more than this share of the time means our threads and a
        // neighbour share a core: caller-only jobs for a back-off (min_solo_ns doubling up to
        // max_wait_solo_ns), so the workers sleep and the OS gives the caller a core of its own.
        // 0 turns the check off; TINYVLLM_POOL_WAIT_SHARE overrides it.
        double max_wait_share = 0.15;
        int64_t wait_window_ns = 5'000'000;
        int64_t max_wait_solo_ns = 400'000'000;
        // With the check on, run() stalls back off only when they cost over max_wait_share of the
        // time since the first stall of a window this long (with it off: at the first stall).
        int64_t stall_window_ns = 100'000'000;
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

    // Items that may run twice: job.compute(i, tid, buf) computes item i into buf (the pool's
    // scratch of thread tid, scratch_floats floats), job.commit(i, tid, buf) (same thread, right
    // after) copies it to the shared output; exactly one commit per item happens, and the call
    // returns when every item is committed. A worker may still be computing an item after the call
    // returned (see above): the job is copied into the pool, and compute must only read memory that
    // stays allocated until quiesce() / quiesce_all() (weights, the owner's buffers, a caller's
    // thread_local with a StaleReaders member). Unless stale workers are allowed
    // (set_allow_stale_workers), the call waits for them before returning.
    template <class J>
    void run_dup(int64_t n, size_t scratch_floats, const J &job) {
        static_assert(std::is_trivially_copyable_v<J> && sizeof(J) <= kJobBytes && alignof(J) <= 16,
                      "run_dup: the job must be a small trivially copyable struct");
        DupJob d;
        d.compute = [](const void *j, int64_t i, int tid, float *buf) { static_cast<const J *>(j)->compute(i, tid, buf); };
        d.commit = [](const void *j, int64_t i, int tid, const float *buf) { static_cast<const J *>(j)->commit(i, tid, buf); };
        d.floats = scratch_floats;
        std::memcpy(d.bytes, &job, sizeof(J));
        run_dup_impl(n, d);
    }
    // Waits until no worker is inside a job (a stale run_dup worker has finished its item).
    void quiesce();
    // quiesce() on every pool that allows stale workers: before memory one may read is freed or moved.
    static void quiesce_all();
    // With true, run_dup returns without waiting for stale workers; the owner calls quiesce() before
    // freeing or reallocating anything a job's compute reads (Model: before a forward whose scratch may
    // grow, and when it is destroyed).
    void set_allow_stale_workers(bool allow);
    // run_dup's per-thread item buffers: size() buffers of this many floats, allocated now (the owner
    // pays them from its memory budget); a job that needs more grows them (while no worker is inside).
    void reserve_scratch(size_t floats_per_thread);
    size_t scratch_floats() const { return scratch_floats_; }

    // The CPUs this process may run on (its affinity mask), at least 1.
    static int default_threads();

    // Counters for tests and benchmarks (read while no job runs).
    struct Stats {
        uint64_t jobs = 0;        // jobs run (not counting inline single-item / nested calls)
        uint64_t solo_jobs = 0;   // of those, run on the caller alone (back-off after a stall)
        uint64_t stalls = 0;      // waits for a worker longer than Backoff::stall_ns
        uint64_t worker_items = 0;  // items run by workers
        uint64_t dup_items = 0;     // run_dup items the caller re-ran because a worker's was overdue
        uint64_t stale_solo_jobs = 0;  // jobs run on the caller alone because a stale worker was inside
        uint64_t caller_waits = 0;     // back-offs because the caller itself waited for a CPU
        uint64_t worker_moves = 0;     // times the workers were moved off the caller's CPU after one
    };
    Stats stats() const;


   private:
    static constexpr size_t kJobBytes = 512;
    using TaskFn = void (*)(void *ctx, int64_t i, int tid);
    struct DupJob {
        void (*compute)(const void *job, int64_t i, int tid, float *buf) = nullptr;
        void (*commit)(const void *job, int64_t i, int tid, const float *buf) = nullptr;
        size_t floats = 0;
        alignas(16) unsigned char bytes[kJobBytes];
    };
    void run_impl(int64_t n, TaskFn fn, void *ctx);
    void run_dup_impl(int64_t n, const DupJob &job);
    bool open_job(int64_t n);  // under dispatch_mu_: false when the job must run on the caller alone
    void run_solo(int64_t n, TaskFn fn, void *ctx, const DupJob *dup);
    void wait_idle();  // until no worker is inside a job
    bool dup_item(int64_t i, int tid);  // compute + commit unless taken; true if committed
    int64_t work(int tid);  // runs items until none is left; returns how many it ran
    int64_t claim(int tid);               // run_dup: the next item for tid (own range, then steal); -1: none
    void grow_scratch(size_t floats);     // while no worker is inside a job
    float *scratch(int tid) { return scratch_.get() + (size_t)tid * scratch_floats_; }
    void worker_loop(int tid);
    bool solo_now();
    void back_off(int64_t now, int64_t max_ns);
    void check_caller_wait(int64_t now);
    int64_t wait_window_start_ = 0, wait_at_window_start_ = 0;  // caller side (under dispatch_mu_)
    std::thread::id wait_thread_;
    int64_t stall_window_start_ = 0, stalled_ns_ = 0;
    bool caller_waited_ = false;
    void keep_workers_off_caller_cpu();
#if defined(__linux__)
    cpu_set_t allowed_;  // the CPUs the process could use when the pool was made
#endif

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
    bool is_dup_ = false;
    DupJob dup_;
    // run_dup item states: gen << 2 | 0 pending, 1 committing, 2 committed (another gen: pending);
    // item_gen_ counts run_dup jobs (64 bits: never wraps to a stored value).
    uint64_t item_gen_ = 0;
    std::unique_ptr<std::atomic<uint64_t>[]> item_state_;
    int64_t item_cap_ = 0;
    bool allow_stale_ = false;
    // run_dup: thread t's items are [front, back) of ranges_[t] (front in the low 32 bits).
    struct alignas(64) Range {
        std::atomic<uint64_t> fb{0};
    };
    std::unique_ptr<Range[]> ranges_;
    std::unique_ptr<float[]> scratch_;
    size_t scratch_floats_ = 0;
    // Back-off state, caller side (under dispatch_mu_).
    int64_t solo_until_ns_ = 0;
    int64_t solo_ns_;
    int64_t last_stall_ns_ = 0;
    Stats stats_;
};

// A last member of a thread_local that run_dup jobs read from other threads (a caller's prepared
// activations): its destructor runs first at thread exit and waits for stale workers, so the rest is
// freed only when no worker can read it. Growing such a buffer: call ThreadPool::quiesce_all() first.
struct StaleReaders {
    StaleReaders() = default;
    StaleReaders(const StaleReaders &) {}
    StaleReaders &operator=(const StaleReaders &) { return *this; }
    ~StaleReaders() { ThreadPool::quiesce_all(); }
};

}  // namespace tv
