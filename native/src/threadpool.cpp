#include "threadpool.h"

#include <algorithm>
#include <chrono>

#include <cstdlib>

#if defined(__linux__)
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>
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

// The pools whose run_dup may leave a stale worker behind (quiesce_all's list).
std::mutex &stale_pools_mu() {
    static std::mutex mu;
    return mu;
}
std::vector<ThreadPool *> &stale_pools() {
    static std::vector<ThreadPool *> v;
    return v;
}

int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}
// Nanoseconds this thread has spent runnable but waiting for a CPU (the second field of
// /proc/thread-self/schedstat), or -1 where that is not available.
int64_t run_queue_wait_ns() {
#if defined(__linux__)
    struct File {  // this thread's schedstat, closed when the thread exits
        int fd = open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC);
        ~File() {
            if (fd >= 0) close(fd);
        }
    };
    thread_local File file;
    const int fd = file.fd;
    if (fd < 0) return -1;
    char buf[96];
    const ssize_t got = pread(fd, buf, sizeof buf - 1, 0);
    if (got <= 0) return -1;
    buf[got] = 0;
    char *end;
    std::strtoull(buf, &end, 10);  // time on a CPU
    return (int64_t)std::strtoull(end, nullptr, 10);
#else
    return -1;
#endif
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

namespace {
ThreadPool::Backoff default_backoff() {
    ThreadPool::Backoff b;
    if (const char *e = std::getenv("TINYVLLM_POOL_WAIT_SHARE")) b.max_wait_share = std::atof(e);
    // tests only (tests/test_pool_thread_exit.py): every worker task sleeps this long, a worker the OS
    // descheduled in it, so a forward returns while one still runs
    if (const char *e = std::getenv("TINYVLLM_POOL_TEST_TASK_DELAY_US")) b.test_item_delay_ns = std::atoll(e) * 1000;
    return b;
}
}  // namespace

ThreadPool::ThreadPool(int n_threads) : ThreadPool(n_threads, default_backoff()) {}

ThreadPool::ThreadPool(int n_threads, Backoff backoff)
    : n_threads_(std::min(n_threads > 0 ? n_threads : default_threads(), 256)),
      backoff_(backoff),
      solo_ns_(backoff.min_solo_ns) {
    workers_.reserve(n_threads_ - 1);
    ranges_ = std::make_unique<Range[]>((size_t)n_threads_);
#if defined(__linux__)
    CPU_ZERO(&allowed_);
    if (sched_getaffinity(0, sizeof allowed_, &allowed_) != 0) CPU_ZERO(&allowed_);
#endif
    for (int t = 1; t < n_threads_; t++) workers_.emplace_back([this, t] { worker_loop(t); });
}

ThreadPool::~ThreadPool() {
    set_allow_stale_workers(false);
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
    if (is_dup_) {
        for (int64_t i; (i = claim(tid)) >= 0; done++) dup_item(i, tid);
    } else {
        for (int64_t i; (i = next_.fetch_add(1, std::memory_order_relaxed)) < total_; done++) fn_(ctx_, i, tid);
    }
    t_pool = prev_pool;
    t_tid = prev_tid;
    return done;
}

// Range words: front in the low 32 bits, back in the high 32.
static inline uint32_t front_of(uint64_t v) { return (uint32_t)v; }
static inline uint32_t back_of(uint64_t v) { return (uint32_t)(v >> 32); }
static inline uint64_t range_of(uint64_t front, uint64_t back) { return back << 32 | front; }

int64_t ThreadPool::claim(int tid) {
    std::atomic<uint64_t> &own = ranges_[tid].fb;
    uint64_t v = own.load(std::memory_order_acquire);
    while (front_of(v) < back_of(v))
        if (own.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel, std::memory_order_acquire))
            return front_of(v);
    // Own range empty: steal the back half of another's (the next thread's first) and run it from
    // its front as our own range, so the stolen items are contiguous too.
    for (int k = 1; k < n_threads_; k++) {
        std::atomic<uint64_t> &r = ranges_[(tid + k) % n_threads_].fb;
        v = r.load(std::memory_order_acquire);
        while (front_of(v) < back_of(v)) {
            const uint64_t f = front_of(v), b = back_of(v), mid = f + (b - f) / 2;
            if (r.compare_exchange_weak(v, range_of(f, mid), std::memory_order_acq_rel, std::memory_order_acquire)) {
                // ours is empty, so nobody else changes it: a store is enough
                own.store(range_of(mid + 1, b), std::memory_order_release);
                return (int64_t)mid;
            }
        }
    }
    return -1;
}

void ThreadPool::grow_scratch(size_t floats) {
    scratch_ = std::make_unique<float[]>(floats * (size_t)n_threads_);
    scratch_floats_ = floats;
}

void ThreadPool::reserve_scratch(size_t floats_per_thread) {
    std::lock_guard<std::mutex> job(dispatch_mu_);
    if (floats_per_thread <= scratch_floats_) return;
    wait_idle();
    grow_scratch(floats_per_thread);
}

void ThreadPool::set_allow_stale_workers(bool allow) {
    std::lock_guard<std::mutex> lk(stale_pools_mu());
    auto &v = stale_pools();
    v.erase(std::remove(v.begin(), v.end(), this), v.end());
    if (allow) v.push_back(this);
    allow_stale_ = allow;
}

void ThreadPool::quiesce_all() {
    std::lock_guard<std::mutex> lk(stale_pools_mu());
    for (ThreadPool *p : stale_pools())
        if (p != t_pool) p->wait_idle();  // (a worker of p calling this would wait for itself)
}

bool ThreadPool::dup_item(int64_t i, int tid) {
    const uint64_t gen = item_gen_;
    std::atomic<uint64_t> &st = item_state_[i];
    if ((st.load(std::memory_order_acquire) >> 2) == gen) return false;  // committed or being committed
    if (tid != 0 && backoff_.test_item_delay_ns > 0)
        std::this_thread::sleep_for(std::chrono::nanoseconds(backoff_.test_item_delay_ns));
    float *buf = scratch(tid);
    dup_.compute(dup_.bytes, i, tid, buf);
    uint64_t v = st.load(std::memory_order_acquire);
    if ((v >> 2) == gen || !st.compare_exchange_strong(v, gen << 2 | 1, std::memory_order_acq_rel)) return false;
    dup_.commit(dup_.bytes, i, tid, buf);
    st.store(gen << 2 | 2, std::memory_order_release);
    return true;
}

bool ThreadPool::solo_now() {
    const int64_t now = now_ns();
    if (solo_until_ns_ != 0) {
        if (now < solo_until_ns_) return true;
        solo_until_ns_ = 0;  // back-off over: try the workers again, with a fresh wait window
        wait_window_start_ = 0;
        if (caller_waited_) keep_workers_off_caller_cpu();
    }
    check_caller_wait(now);
    return solo_until_ns_ != 0;
}

// Caller-only jobs from now on for a while: the first back-off, or twice the last one while they
// recur (up to max_ns).
void ThreadPool::back_off(int64_t now, int64_t max_ns) {
    solo_ns_ = now - last_stall_ns_ < solo_ns_ + 1'000'000'000 ? std::min(2 * solo_ns_, max_ns) : backoff_.min_solo_ns;
    solo_ns_ = std::max(solo_ns_, backoff_.min_solo_ns);
    last_stall_ns_ = now;
    solo_until_ns_ = now + solo_ns_;
}

// After the caller waited for a CPU: the workers may run anywhere the process may, except on the
// CPU the caller runs on now (it has one to itself after the back-off), so that a worker sharing a
// core with the neighbour is the one that waits, not the caller. Linux only; skipped with one CPU.
void ThreadPool::keep_workers_off_caller_cpu() {
#if defined(__linux__)
    const int cpu = sched_getcpu();
    if (cpu < 0 || cpu >= CPU_SETSIZE || !CPU_ISSET(cpu, &allowed_) || CPU_COUNT(&allowed_) < 2) return;
    cpu_set_t set = allowed_;
    CPU_CLR(cpu, &set);
    for (auto &w : workers_) pthread_setaffinity_np(w.native_handle(), sizeof set, &set);
    stats_.worker_moves++;
#endif
}

void ThreadPool::check_caller_wait(int64_t now) {
    if (backoff_.max_wait_share <= 0) return;
    if (std::this_thread::get_id() != wait_thread_) {  // another caller thread: its own counter
        wait_thread_ = std::this_thread::get_id();
        wait_window_start_ = 0;
    }
    if (wait_window_start_ != 0 && now - wait_window_start_ < backoff_.wait_window_ns) return;
    const int64_t wait = run_queue_wait_ns();
    if (wait < 0) return;
    const bool judge = wait_window_start_ != 0 && wait >= wait_at_window_start_;
    const double share = judge ? (double)(wait - wait_at_window_start_) / (double)(now - wait_window_start_) : 0.0;
    wait_window_start_ = now;
    wait_at_window_start_ = wait;
    if (share > backoff_.max_wait_share) {
        stats_.caller_waits++;
        caller_waited_ = true;
        back_off(now, backoff_.max_wait_solo_ns);
        wait_window_start_ = 0;
    }
}

bool ThreadPool::open_job(int64_t n) {
    stats_.jobs++;
    if (state_.load(std::memory_order_acquire) & kCount) {  // a stale run_dup worker is still inside
        stats_.stale_solo_jobs++;
        stats_.solo_jobs++;
        return false;
    }
    if (solo_now()) {
        stats_.solo_jobs++;
        return false;
    }
    (void)n;
    return true;
}

void ThreadPool::run_solo(int64_t n, TaskFn fn, void *ctx, const DupJob *dup) {
    const ThreadPool *prev_pool = t_pool;
    const int prev_tid = t_tid;
    const int tid = t_pool == this ? t_tid : 0;
    float *buf = nullptr;
    if (dup && t_pool == this) {  // nested in one of our items (which may hold scratch(tid)): a private buffer
        thread_local std::vector<float> nested;
        if (nested.size() < dup->floats) nested.resize(dup->floats);
        buf = nested.data();
    } else if (dup) {
        buf = scratch(0);  // the caller's, under dispatch_mu_
    }
    t_pool = this;
    t_tid = tid;
    for (int64_t i = 0; i < n; i++) {
        if (dup) {
            dup->compute(dup->bytes, i, tid, buf);
            dup->commit(dup->bytes, i, tid, buf);
        } else {
            fn(ctx, i, tid);
        }
    }
    t_pool = prev_pool;
    t_tid = prev_tid;
}

void ThreadPool::run_impl(int64_t n, TaskFn fn, void *ctx) {
    if (n <= 0) return;
    if (t_pool == this || workers_.empty() || n == 1) return run_solo(n, fn, ctx, nullptr);  // nested or trivial
    std::lock_guard<std::mutex> job(dispatch_mu_);
    if (!open_job(n)) return run_solo(n, fn, ctx, nullptr);
    // No worker is inside a job here (the last one was closed and drained), so the fields are ours.
    fn_ = fn;
    ctx_ = ctx;
    is_dup_ = false;
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
        stats_.stalls++;
        const int64_t now = now_ns();
        if (backoff_.max_wait_share <= 0) return back_off(now, backoff_.max_solo_ns);
        // With the caller-wait check on, one stall is only its cost (the worker shares its core with a
        // neighbour and still helps between its turns): back off when stalls take over
        // max_wait_share of a stall window.
        stalled_ns_ += waited;
        if (stall_window_start_ == 0) stall_window_start_ = t0;
        if (now - stall_window_start_ >= backoff_.stall_window_ns) {
            if ((double)stalled_ns_ > backoff_.max_wait_share * (double)(now - stall_window_start_))
                back_off(now, backoff_.max_wait_solo_ns);
            stall_window_start_ = 0;
            stalled_ns_ = 0;
        }
    }
}

void ThreadPool::run_dup_impl(int64_t n, const DupJob &d) {
    if (n <= 0) return;
    if (t_pool == this) return run_solo(n, nullptr, nullptr, &d);  // nested
    std::lock_guard<std::mutex> job(dispatch_mu_);
    if (d.floats > scratch_floats_) {  // not reserved by the owner: grow once no worker uses them
        wait_idle();
        grow_scratch(d.floats);
    }
    if (workers_.empty() || n == 1 || !open_job(n)) return run_solo(n, nullptr, nullptr, &d);
    if (n > item_cap_) {  // zeros: pending for every generation (they start at 1)
        item_state_ = std::make_unique<std::atomic<uint64_t>[]>((size_t)n);
        for (int64_t i = 0; i < n; i++) item_state_[i].store(0, std::memory_order_relaxed);
        item_cap_ = n;
    }
    dup_ = d;
    is_dup_ = true;
    item_gen_++;
    total_ = n;
    for (int t = 0; t < n_threads_; t++)
        ranges_[t].fb.store(range_of((uint64_t)(n * t / n_threads_), (uint64_t)(n * (t + 1) / n_threads_)),
                            std::memory_order_relaxed);
    const uint64_t gen = (state_.load(std::memory_order_relaxed) >> 32) + 1;
    state_.store(gen << 32 | kOpen, std::memory_order_seq_cst);  // publishes the fields above
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
        { std::lock_guard<std::mutex> lk(mu_); }
        cv_.notify_all();
    }
    const int64_t t0 = now_ns();
    const int64_t mine = work(0);
    const uint64_t s = state_.fetch_and(~kOpen, std::memory_order_acq_rel);
    if ((s & kCount) == 0) return;  // every worker that joined has committed its items and left
    // Wait a little for workers' last items; an item overdue means its worker was descheduled.
    const int64_t t1 = now_ns();
    const int64_t item_ns = mine > 0 ? (t1 - t0) / mine : 0;
    const int64_t patience = backoff_.dup_after_ns + 2 * item_ns;
    for (int spins = 0; state_.load(std::memory_order_acquire) & kCount; spins++) {
        cpu_relax();
        if ((spins & 63) == 63 && now_ns() - t1 > patience) break;
    }
    if (state_.load(std::memory_order_acquire) & kCount) {
        // Commit every item still open ourselves; a worker that is committing one right now finishes
        // its copy in microseconds unless it is descheduled in it.
        const ThreadPool *prev_pool = t_pool;
        t_pool = this;
        t_tid = 0;
        const uint64_t ig = item_gen_;
        for (int64_t i = 0; i < n; i++) {
            for (int spins = 0;; spins++) {
                const uint64_t v = item_state_[i].load(std::memory_order_acquire);
                if (v == (ig << 2 | 2)) break;
                if (v == (ig << 2 | 1)) {
                    if (spins < 2048) {
                        cpu_relax();
                    } else {
                        std::this_thread::yield();
                    }
                    continue;
                }
                if (dup_item(i, 0)) stats_.dup_items++;
            }
        }
        t_pool = prev_pool;
    }
    if (!allow_stale_) wait_idle();
}

void ThreadPool::wait_idle() {
    for (int spins = 0; state_.load(std::memory_order_acquire) & kCount; spins++) {
        if (spins < 2048) {
            cpu_relax();
        } else {
            std::this_thread::yield();
        }
    }
}

void ThreadPool::quiesce() {
    std::lock_guard<std::mutex> job(dispatch_mu_);
    wait_idle();
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
