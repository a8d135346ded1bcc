/* Machine ceilings for the benchmarks, printed as one JSON object:
 *   membw read MIB THREADS REPS  -> read bandwidth: THREADS threads sum their slices of a MIB MiB
 *                                   buffer (several passes, so that a rep lasts >= ~50 ms), best of
 *                                   REPS, bytes/s. A buffer below the last-level cache measures that
 *                                   cache: pass the working set you want the ceiling for.
 *   membw peak THREADS           -> int16 / int8 dot-product and fp32 FMA peaks, ops/s (1 MAC = 2 ops):
 *                                   10 independent register chains of vpdpwssd ("int16_dot"; vpmaddwd +
 *                                   vpaddd without VNNI), vpdpbusd ("int8_dot"), vfmadd ("fp32_fma")
 * Built by the benchmark scripts with `cc -O3 -march=native -pthread` (see benchmarks/machine.py). */
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Each thread times its own work (t0 after the start barrier, t1 when done): a rep lasts from the
 * first thread's t0 to the last one's t1. Timing from the main thread instead was wrong on a busy
 * machine: when the OS ran the main thread late after the barrier, the workers had already read
 * their slices and a rep "took" microseconds (TB/s at 8-32 MiB). */
typedef struct { const uint64_t *p; size_t n; int passes; uint64_t out; int kind; double ops, t0, t1; } job;
static pthread_barrier_t barrier;

/* Sums 64-byte lines with 4 independent vector accumulators (explicit SIMD: GCC does not vectorize
 * the scalar version of this loop, which then measures the core, not memory). */
static uint64_t sum_words(const uint64_t *p, size_t n) {
    size_t i = 0;
    uint64_t s = 0;
#if defined(__AVX512F__)
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm512_add_epi64(a0, _mm512_loadu_si512((const void *)(p + i)));
        a1 = _mm512_add_epi64(a1, _mm512_loadu_si512((const void *)(p + i + 8)));
        a2 = _mm512_add_epi64(a2, _mm512_loadu_si512((const void *)(p + i + 16)));
        a3 = _mm512_add_epi64(a3, _mm512_loadu_si512((const void *)(p + i + 24)));
    }
    s = (uint64_t)_mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)));
#elif defined(__AVX2__)
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_add_epi64(a0, _mm256_loadu_si256((const __m256i *)(p + i)));
        a1 = _mm256_add_epi64(a1, _mm256_loadu_si256((const __m256i *)(p + i + 4)));
        a2 = _mm256_add_epi64(a2, _mm256_loadu_si256((const __m256i *)(p + i + 8)));
        a3 = _mm256_add_epi64(a3, _mm256_loadu_si256((const __m256i *)(p + i + 12)));
    }
    __m256i t = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
    uint64_t l[4];
    _mm256_storeu_si256((__m256i *)l, t);
    s = l[0] + l[1] + l[2] + l[3];
#endif
    for (; i < n; i++) s += p[i];
    return s;
}

static void *read_job(void *arg) {
    job *j = arg;
    uint64_t s = 0;
    pthread_barrier_wait(&barrier);
    j->t0 = now();
    /* A sum, not XOR: an even number of XOR passes cancels out, which a compiler may exploit. */
    for (int r = 0; r < j->passes; r++) {
        s += sum_words(j->p, j->n);
        __asm__ __volatile__("" : "+r"(s) : : "memory");  /* every pass reads memory again */
    }
    j->t1 = now();
    j->out = s;
    return NULL;
}

#define ITERS 20000000L
static void *peak_job(void *arg) {
    job *j = arg;
    pthread_barrier_wait(&barrier);
    j->t0 = now();
    j->ops = 0;
#if defined(__AVX512F__)
    if (j->kind == 2) {  /* fp32 FMA: 16 lanes x 2 flops */
        __m512 acc[10], x = _mm512_set1_ps(1e-7f), y = _mm512_set1_ps(0.999f);
        for (int k = 0; k < 10; k++) acc[k] = _mm512_set1_ps((float)k);
        for (long i = 0; i < ITERS; i++)
            for (int k = 0; k < 10; k++) acc[k] = _mm512_fmadd_ps(acc[k], y, x);
        for (int k = 1; k < 10; k++) acc[0] = _mm512_add_ps(acc[0], acc[k]);
        j->out = (uint64_t)_mm512_reduce_add_ps(acc[0]);
        j->ops = 10.0 * ITERS * 16 * 2;
    }
#endif
#if defined(__AVX512VNNI__)
    if (j->kind < 2) {  /* vpdpwssd: 16 lanes x 2 int16 MACs; vpdpbusd: 16 lanes x 4 int8 MACs */
        __m512i acc[10], x = _mm512_set1_epi16(3), y = _mm512_set1_epi16(5);
        for (int k = 0; k < 10; k++) acc[k] = _mm512_set1_epi32(k);
        if (j->kind == 0)
            for (long i = 0; i < ITERS; i++)
                for (int k = 0; k < 10; k++) acc[k] = _mm512_dpwssd_epi32(acc[k], x, y);
        else
            for (long i = 0; i < ITERS; i++)
                for (int k = 0; k < 10; k++) acc[k] = _mm512_dpbusd_epi32(acc[k], x, y);
        for (int k = 1; k < 10; k++) acc[0] = _mm512_add_epi32(acc[0], acc[k]);
        j->out = (uint64_t)_mm512_reduce_add_epi32(acc[0]);
        j->ops = 10.0 * ITERS * 16 * (j->kind == 0 ? 2 : 4) * 2;
    }
#elif defined(__AVX2__)
    if (j->kind == 0) {  /* no VNNI: vpmaddwd + vpaddd, 8 lanes x 2 int16 MACs per pair */
        __m256i acc[10], x = _mm256_set1_epi16(3), y = _mm256_set1_epi16(5);
        for (int k = 0; k < 10; k++) acc[k] = _mm256_set1_epi32(k);
        for (long i = 0; i < ITERS; i++)
            for (int k = 0; k < 10; k++) acc[k] = _mm256_add_epi32(acc[k], _mm256_madd_epi16(x, y));
        for (int k = 1; k < 10; k++) acc[0] = _mm256_add_epi32(acc[0], acc[k]);
        j->out = (uint64_t)_mm256_extract_epi32(acc[0], 0);
        j->ops = 10.0 * ITERS * 8 * 2 * 2;
    }
#endif
    j->t1 = now();
    return NULL;
}

/* Seconds from the first thread's start to the last thread's end (see job). */
static double run(job *jobs, int nt, void *(*fn)(void *)) {
    pthread_t th[64];
    pthread_barrier_init(&barrier, NULL, nt);
    for (int t = 0; t < nt; t++) pthread_create(&th[t], NULL, fn, &jobs[t]);
    for (int t = 0; t < nt; t++) pthread_join(th[t], NULL);
    pthread_barrier_destroy(&barrier);
    double t0 = jobs[0].t0, t1 = jobs[0].t1;
    for (int t = 1; t < nt; t++) {
        if (jobs[t].t0 < t0) t0 = jobs[t].t0;
        if (jobs[t].t1 > t1) t1 = jobs[t].t1;
    }
    return t1 - t0;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: membw read MIB THREADS REPS | membw peak THREADS\n"); return 2; }
    int nt = atoi(argv[argc > 3 && !strcmp(argv[1], "read") ? 3 : 2]);
    if (nt < 1 || nt > 64) return 2;
    job jobs[64];
    memset(jobs, 0, sizeof jobs);
    uint64_t sink = 0;
    if (!strcmp(argv[1], "read") && argc >= 5) {
        size_t n = (size_t)atol(argv[2]) << 17, per = n / nt;  /* uint64 words */
        int reps = atoi(argv[4]);
        /* Passes so that a rep reads >= 512 MiB (>= ~50 ms at any bandwidth this could reach). */
        int passes = atol(argv[2]) >= 512 ? 1 : (int)(512 / (atol(argv[2]) > 0 ? atol(argv[2]) : 1));
        uint64_t *buf = aligned_alloc(4096, n * 8);
        if (!buf) return 1;
        for (size_t i = 0; i < n; i++) buf[i] = i * 0x9E3779B97F4A7C15ull;  /* touch every page */
        double best = 1e30;
        for (int r = 0; r < reps; r++) {
            for (int t = 0; t < nt; t++) jobs[t] = (job){.p = buf + t * per, .n = per, .passes = passes};
            double s = run(jobs, nt, read_job);
            if (s < best) best = s;
            for (int t = 0; t < nt; t++) sink ^= jobs[t].out;
        }
        printf("{\"read_bytes_per_s\": %.6g, \"bytes\": %zu, \"passes\": %d, \"threads\": %d, \"reps\": %d, "
               "\"sink\": %llu}\n",
               per * nt * 8.0 * passes / best, per * nt * 8, passes, nt, reps, (unsigned long long)(sink & 1));
        return 0;
    }
    if (!strcmp(argv[1], "peak")) {
        const char *names[3] = {"int16_dot", "int8_dot", "fp32_fma"};
        printf("{\"threads\": %d", nt);
        for (int kind = 0; kind < 3; kind++) {
            for (int t = 0; t < nt; t++) jobs[t] = (job){.kind = kind};
            double s = run(jobs, nt, peak_job);
            double ops = 0;
            for (int t = 0; t < nt; t++) { ops += jobs[t].ops; sink ^= jobs[t].out; }
            if (ops > 0) printf(", \"%s_ops_per_s\": %.6g", names[kind], ops / s);
            else printf(", \"%s_ops_per_s\": null", names[kind]);
        }
        printf(", \"sink\": %llu}\n", (unsigned long long)(sink & 1));
        return 0;
    }
    return 2;
}
