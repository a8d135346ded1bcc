/* Machine ceilings for the benchmarks, printed as one JSON object:
 *   membw read MIB THREADS REPS  -> read bandwidth: THREADS threads XOR-reduce their slices of a
 *                                   MIB MiB buffer (far larger than L3), best of REPS, bytes/s
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

typedef struct { const uint64_t *p; size_t n; uint64_t out; int kind; double ops; } job;
static pthread_barrier_t barrier;

static void *read_job(void *arg) {
    job *j = arg;
    uint64_t a[8] = {0};
    pthread_barrier_wait(&barrier);
    for (size_t i = 0; i + 8 <= j->n; i += 8)
        for (int k = 0; k < 8; k++) a[k] ^= j->p[i + k];  /* vectorized at -O3: streams the slice */
    j->out = a[0] ^ a[1] ^ a[2] ^ a[3] ^ a[4] ^ a[5] ^ a[6] ^ a[7];
    return NULL;
}

#define ITERS 20000000L
static void *peak_job(void *arg) {
    job *j = arg;
    pthread_barrier_wait(&barrier);
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
    return NULL;
}

static double run(job *jobs, int nt, void *(*fn)(void *)) {
    pthread_t th[64];
    pthread_barrier_init(&barrier, NULL, nt + 1);
    for (int t = 0; t < nt; t++) pthread_create(&th[t], NULL, fn, &jobs[t]);
    pthread_barrier_wait(&barrier);
    double t0 = now();
    for (int t = 0; t < nt; t++) pthread_join(th[t], NULL);
    double s = now() - t0;
    pthread_barrier_destroy(&barrier);
    return s;
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
        uint64_t *buf = aligned_alloc(4096, n * 8);
        if (!buf) return 1;
        for (size_t i = 0; i < n; i++) buf[i] = i * 0x9E3779B97F4A7C15ull;  /* touch every page */
        double best = 1e30;
        for (int r = 0; r < reps; r++) {
            for (int t = 0; t < nt; t++) jobs[t] = (job){buf + t * per, per, 0, 0, 0};
            double s = run(jobs, nt, read_job);
            if (s < best) best = s;
            for (int t = 0; t < nt; t++) sink ^= jobs[t].out;
        }
        printf("{\"read_bytes_per_s\": %.6g, \"bytes\": %zu, \"threads\": %d, \"reps\": %d, \"sink\": %llu}\n",
               per * nt * 8.0 / best, per * nt * 8, nt, reps, (unsigned long long)(sink & 1));
        return 0;
    }
    if (!strcmp(argv[1], "peak")) {
        const char *names[3] = {"int16_dot", "int8_dot", "fp32_fma"};
        printf("{\"threads\": %d", nt);
        for (int kind = 0; kind < 3; kind++) {
            for (int t = 0; t < nt; t++) jobs[t] = (job){NULL, 0, 0, kind, 0};
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
