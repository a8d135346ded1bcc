// The sampler's per-row work (tv_sample, tinyvllm.h): log-sum-exp of the raw logits, greedy argmax, and
// the temperature -> top-k -> top-p -> min-p draw of tinyvllm/sampler.py, at SIMD speed.
//
// The exp passes use GCC/Clang vector extensions (16 floats), so one source serves NEON, AVX2 and
// AVX-512; on x86 the hot loops are cloned per ISA (target_clones) and picked once at load time.
// Weights exp((x - max) / T) are float32 (Cephes' polynomial, ~2 ulp); every sum over them is
// double. The filters are decided on a candidate set (the tokens with weight >= e^-8 of the best
// one, else e^-12, e^-30, else every token with a nonzero weight) when it provably holds every
// survivor; top-p buckets the candidates by weight and sorts only the bucket where the nucleus ends.
#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors pass between always_inline helpers only

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "c_api.h"
#include "common.h"
#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace tv {
namespace {

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
constexpr int L = 16;       // floats per vector
constexpr int CHUNK = 256;  // floats per partial sum: float lanes add 16 values each, then double

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define TV_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TV_SIMD_CLONES
#endif
#define TV_INLINE static inline __attribute__((always_inline))

TV_INLINE vf load(const float *p) {
    vf v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

TV_INLINE vf splat(float a) { return vf{} + a; }

TV_INLINE bool any_lane(vi m) {
    m |= __builtin_shufflevector(m, m, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    m |= __builtin_shufflevector(m, m, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    m |= __builtin_shufflevector(m, m, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    m |= __builtin_shufflevector(m, m, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return m[0] != 0;
}

TV_INLINE double hsum(vf v) {
    float s = 0.0f;
    for (int l = 0; l < L; l++) s += v[l];
    return s;
}

// e^x for x <= 0 (and -inf): 2^n * (1 + r + r^2 P(r)), kernels.h's constants; 0 below -87.3, where
// float32 would go subnormal.
TV_INLINE vf vexp(vf x) {
    const vf lo = splat(-87.33f);
    vi under = x < lo;
    x = x < lo ? lo : x;
    const vf shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    vf n = (x * 1.44269504088896341f + shifter) - shifter;
    vf r = x - n * EXP_LN2_HI;
    r = r - n * EXP_LN2_LO;
    vf p = splat(EXP_POLY[0]);
    for (int i = 1; i < 6; i++) p = p * r + EXP_POLY[i];
    vf y = (p * r) * r + r + 1.0f;
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    vf scale;
    std::memcpy(&scale, &e, sizeof scale);
    y *= scale;
    return under ? splat(0.0f) : y;
}

// The last n < L values of a row as a vector, padded with -inf (weight 0): the tail goes through the
// same vector code as the body (a scalar exp could round differently: FMA contraction), so tied
// logits get tied weights wherever they sit.
TV_INLINE vf load_tail(const float *x, int64_t n) {
    float buf[L];
    for (int l = 0; l < L; l++) buf[l] = l < n ? x[l] : -std::numeric_limits<float>::infinity();
    return load(buf);
}

// The vector exp and candidate collection the row loops below are instantiated with: Generic (vector
// extensions: NEON, AVX2, SSE; cloned per x86 ISA) and, on x86 CPUs with AVX-512, Avx512 (scalef: ~20%
// fewer instructions per exp; candidates compress-stored while the weights are made).
struct Generic {
    static constexpr bool COLLECTS = false;
    vf exp(vf x) const { return vexp(x); }
    void collect(vf, float, int64_t, int32_t *, int64_t &) const {}
};

#if defined(__x86_64__) && defined(__GNUC__)
#define TV_AVX512 1
struct Avx512 {
    static constexpr bool COLLECTS = true;
    __attribute__((target("avx512f"))) inline vf exp(vf v) const {
        const __m512 lo = _mm512_set1_ps(-87.33f);
        __m512 x = (__m512)v;
        const __mmask16 ok = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);  // below: 0, as vexp
        x = _mm512_max_ps(x, lo);
        const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), x);
        r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), r);
        __m512 p = _mm512_set1_ps(EXP_POLY[0]);
        for (int i = 1; i < 6; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_POLY[i]));
        const __m512 y = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
        return (vf)_mm512_maskz_scalef_ps(ok, y, n);
    }
    // appends the ids base + l of the lanes with e >= cut
    __attribute__((target("avx512f"))) inline void collect(vf e, float cut, int64_t base, int32_t *ids,
                                                            int64_t &k) const {
        const __mmask16 hit = _mm512_cmp_ps_mask((__m512)e, _mm512_set1_ps(cut), _CMP_GE_OQ);
        if (hit) {
            const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(int32_t(base)),
                                                 _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
            _mm512_mask_compressstoreu_epi32(ids + k, hit, idx);
            k += __builtin_popcount(hit);
        }
    }
};
#endif

struct RowMax {
    float max;
    bool nan;
};

TV_SIMD_CLONES RowMax row_max(const float *x, int64_t n) {
    vf m = splat(-std::numeric_limits<float>::infinity());
    vi bad = vi{};
    int64_t i = 0;
    for (; i + L <= n; i += L) {
        vf v = load(x + i);
        bad |= v != v;
        m = v > m ? v : m;
    }
    float best = -std::numeric_limits<float>::infinity();
    bool nan = any_lane(bad);
    for (int l = 0; l < L; l++) best = std::max(best, m[l]);
    for (; i < n; i++) {
        nan |= x[i] != x[i];
        best = std::max(best, x[i]);
    }
    return {best, nan};
}

// A chunk's partial sum: four accumulators (vector q of the chunk into a[q % 4]), then (a0 + a1) + (a2 + a3) across
// lanes. weights() and chunk_sum() both sum this way, so draw_all() walks the very total it drew for.
TV_INLINE double chunk_total(vf a0, vf a1, vf a2, vf a3) { return hsum((a0 + a1) + (a2 + a3)); }

TV_INLINE void prefetch_line(const float *p) { __builtin_prefetch(p, 0, 2); }

// The lowest i with x[i] == v (v occurs): a vector test per 16 values.
TV_SIMD_CLONES int64_t first_index_of(const float *x, int64_t n, float v) {
    const vf vv = splat(v);
    int64_t i = 0;
    for (; i + L <= n; i += L)
        if (any_lane(load(x + i) == vv)) break;
    for (; i < n; i++)
        if (x[i] == v) return i;
    return 0;  // unreachable for a v from the row
}

// sum of e^(x - m): the log-sum-exp's mass. next (may be null): the next row, pulled into cache
// meanwhile (one line per vector of this row), so its first pass does not wait on memory.
template <class S>
TV_INLINE double exp_sum_rows(S isa, const float *x, int64_t n, float m, const float *next) {
    double total = 0.0;
    const vf mv = splat(m);
    int64_t i = 0;
    for (; i + CHUNK <= n; i += CHUNK) {
        vf a0 = vf{}, a1 = vf{}, a2 = vf{}, a3 = vf{};  // named: an indexed array would live on the stack
        for (int j = 0; j < CHUNK; j += 4 * L) {
            const float *p = x + i + j;
            if (next)
                for (int q = 0; q < 4; q++) prefetch_line(next + i + j + q * L);
            a0 += isa.exp(load(p) - mv);
            a1 += isa.exp(load(p + L) - mv);
            a2 += isa.exp(load(p + 2 * L) - mv);
            a3 += isa.exp(load(p + 3 * L) - mv);
        }
        total += chunk_total(a0, a1, a2, a3);
    }
    for (; i < n; i += L) total += hsum(isa.exp(load_tail(x + i, n - i) - mv));
    return total;
}

// w[i] = e^((x[i] - m) * inv_t); returns their sum (per chunk as chunk_total, added in double) and
// counts the nonzero weights. mass (may be null): also sum of e^(x - m), the log-sum-exp's mass of
// the same row. next: as exp_sum. Where the ISA collects: the ids of the weights >= cut into ids
// (*n_ids; -1 where it does not).
template <class S>
TV_INLINE double weights_rows(S isa, const float *x, int64_t n, float m, float inv_t, float *w, int64_t *nonzero,
                              double *mass, const float *next, float cut, int32_t *ids, int64_t *n_ids) {
    const vf mv = splat(m), tv = splat(inv_t), zero = vf{};
    double total = 0.0, raw_total = 0.0;
    vi nz = vi{};
    int64_t i = 0, k = 0;
    for (; i + CHUNK <= n; i += CHUNK) {
        vf a0 = vf{}, a1 = vf{}, a2 = vf{}, a3 = vf{}, r0 = vf{}, r1 = vf{}, r2 = vf{}, r3 = vf{};
        for (int j = 0; j < CHUNK; j += 4 * L) {
            if (next)
                for (int q = 0; q < 4; q++) prefetch_line(next + i + j + q * L);
            const vf d0 = load(x + i + j) - mv, d1 = load(x + i + j + L) - mv;
            const vf d2 = load(x + i + j + 2 * L) - mv, d3 = load(x + i + j + 3 * L) - mv;
            const vf e0 = isa.exp(d0 * tv), e1 = isa.exp(d1 * tv), e2 = isa.exp(d2 * tv), e3 = isa.exp(d3 * tv);
            std::memcpy(w + i + j, &e0, sizeof e0);
            std::memcpy(w + i + j + L, &e1, sizeof e1);
            std::memcpy(w + i + j + 2 * L, &e2, sizeof e2);
            std::memcpy(w + i + j + 3 * L, &e3, sizeof e3);
            a0 += e0, a1 += e1, a2 += e2, a3 += e3;
            nz -= e0 > zero;
            nz -= e1 > zero;
            nz -= e2 > zero;
            nz -= e3 > zero;
            if (mass) {
                r0 += isa.exp(d0), r1 += isa.exp(d1), r2 += isa.exp(d2), r3 += isa.exp(d3);
            }
            if constexpr (S::COLLECTS) {
                isa.collect(e0, cut, i + j, ids, k);
                isa.collect(e1, cut, i + j + L, ids, k);
                isa.collect(e2, cut, i + j + 2 * L, ids, k);
                isa.collect(e3, cut, i + j + 3 * L, ids, k);
            }
        }
        total += chunk_total(a0, a1, a2, a3);
        if (mass) raw_total += chunk_total(r0, r1, r2, r3);
    }
    int64_t count = 0;
    for (int l = 0; l < L; l++) count += nz[l];
    for (int64_t j = i; j < n; j += L) {  // the tail's weights, a vector at a time
        const vf d = load_tail(x + j, n - j) - mv;
        const vf e = isa.exp(d * tv);
        for (int l = 0; l < L && j + l < n; l++) w[j + l] = e[l];
        if (mass) raw_total += hsum(isa.exp(d));
    }
    for (; i < n; i++) {  // then one at a time, each its own partial sum (as draw_all walks it)
        total += w[i];
        count += w[i] > 0.0f;
        if (S::COLLECTS && w[i] >= cut) ids[k++] = int32_t(i);
    }
    *nonzero = count;
    *n_ids = S::COLLECTS ? k : -1;
    if (mass) *mass = raw_total;
    return total;
}

TV_SIMD_CLONES double exp_sum_generic(const float *x, int64_t n, float m, const float *next) {
    return exp_sum_rows(Generic{}, x, n, m, next);
}

TV_SIMD_CLONES double weights_generic(const float *x, int64_t n, float m, float inv_t, float *w, int64_t *nonzero,
                                      double *mass, const float *next, float cut, int32_t *ids, int64_t *n_ids) {
    return weights_rows(Generic{}, x, n, m, inv_t, w, nonzero, mass, next, cut, ids, n_ids);
}

#ifdef TV_AVX512
__attribute__((target("avx512f"))) double exp_sum_avx512(const float *x, int64_t n, float m, const float *next) {
    return exp_sum_rows(Avx512{}, x, n, m, next);
}

__attribute__((target("avx512f"))) double weights_avx512(const float *x, int64_t n, float m, float inv_t, float *w,
                                                         int64_t *nonzero, double *mass, const float *next, float cut,
                                                         int32_t *ids, int64_t *n_ids) {
    return weights_rows(Avx512{}, x, n, m, inv_t, w, nonzero, mass, next, cut, ids, n_ids);
}
#endif

// The Avx512 loops where the CPU has AVX-512 and the kernel path in use is an AVX-512 one
// (TINYVLLM_KERNEL=avx2 or scalar, or tv_select_kernel_path, selects the generic loops: tests run both).
bool use_avx512() {
#ifdef TV_AVX512
    static const bool cpu = __builtin_cpu_supports("avx512f");
    return cpu && std::strncmp(kernels().name, "avx512", 6) == 0;
#else
    return false;
#endif
}

double exp_sum(const float *x, int64_t n, float m, const float *next) {
#ifdef TV_AVX512
    if (use_avx512()) return exp_sum_avx512(x, n, m, next);
#endif
    return exp_sum_generic(x, n, m, next);
}

double weights(const float *x, int64_t n, float m, float inv_t, float *w, int64_t *nonzero, double *mass,
               const float *next, float cut, int32_t *ids, int64_t *n_ids) {
#ifdef TV_AVX512
    if (use_avx512()) return weights_avx512(x, n, m, inv_t, w, nonzero, mass, next, cut, ids, n_ids);
#endif
    return weights_generic(x, n, m, inv_t, w, nonzero, mass, next, cut, ids, n_ids);
}

// The ids of the weights >= cut (cut 0: > 0), ascending; returns how many.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) int64_t collect_avx512(const float *w, int64_t n, float cut, int32_t *ids) {
    const __m512 c = _mm512_set1_ps(cut);
    __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(L);
    int64_t k = 0, i = 0;
    for (; i + L <= n; i += L, idx = _mm512_add_epi32(idx, step)) {
        const __m512 v = _mm512_loadu_ps(w + i);
        const __mmask16 hit = cut > 0.0f ? _mm512_cmp_ps_mask(v, c, _CMP_GE_OQ) : _mm512_cmp_ps_mask(v, c, _CMP_GT_OQ);
        _mm512_mask_compressstoreu_epi32(ids + k, hit, idx);
        k += __builtin_popcount(hit);
    }
    for (; i < n; i++)
        if (cut > 0.0f ? w[i] >= cut : w[i] > 0.0f) ids[k++] = int32_t(i);
    return k;
}
#endif

TV_SIMD_CLONES int64_t collect_generic(const float *w, int64_t n, float cut, int32_t *ids) {
    const vf c = splat(cut), zero = vf{};
    int64_t k = 0, i = 0;
    for (; i + L <= n; i += L) {  // a vector test first: most vectors hold no candidate
        const vf v = load(w + i);
        if (any_lane(cut > 0.0f ? v >= c : v > zero))
            for (int l = 0; l < L; l++) {
                ids[k] = int32_t(i + l);
                k += cut > 0.0f ? w[i + l] >= cut : w[i + l] > 0.0f;
            }
    }
    for (; i < n; i++) {
        ids[k] = int32_t(i);
        k += cut > 0.0f ? w[i] >= cut : w[i] > 0.0f;
    }
    return k;
}

int64_t collect(const float *w, int64_t n, float cut, int32_t *ids) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (use_avx512()) return collect_avx512(w, n, cut, ids);
#endif
    return collect_generic(w, n, cut, ids);
}

TV_SIMD_CLONES double chunk_sum(const float *w) {
    vf a0 = vf{}, a1 = vf{}, a2 = vf{}, a3 = vf{};
    for (int j = 0; j < CHUNK; j += 4 * L) {
        a0 += load(w + j), a1 += load(w + j + L), a2 += load(w + j + 2 * L), a3 += load(w + j + 3 * L);
    }
    return chunk_total(a0, a1, a2, a3);
}

// The last token with a weight at or before w[end - 1] (u * total rounded up to the total).
int64_t last_weighted(const float *w, int64_t end) {
    for (int64_t j = end - 1; j >= 0; j--)
        if (w[j] > 0.0f) return j;
    return 0;
}

// The inverse-cdf draw over all of w (id order) for target = u * total, total as weights() summed it.
int64_t draw_all(const float *w, int64_t n, double target) {
    double run = 0.0;
    int64_t i = 0;
    for (; i + CHUNK <= n; i += CHUNK) {
        const double s = chunk_sum(w + i);
        if (run + s > target) {  // the token is in this chunk: walk it in double
            for (int j = 0; j < CHUNK; j++)
                if ((run += w[i + j]) > target && w[i + j] > 0.0f) return i + j;
            return last_weighted(w, i + CHUNK);  // rounding: the chunk's float sum crossed, its walk did not
        }
        run += s;
    }
    for (; i < n; i++)
        if ((run += w[i]) > target && w[i] > 0.0f) return i;
    return last_weighted(w, n);
}

struct RowParams {
    int64_t top_k;  // 0 < top_k < nonzero: on
    double top_p;   // < 1: on
    double min_p;   // > 0: on
};

// Scratch reused row after row (one set per calling thread).
struct Scratch {
    std::vector<float> w;
    std::vector<int32_t> ids;
    std::vector<int16_t> keys;  // top-p's bucket of each candidate
    std::vector<double> cw, sorted;
};

// What filter_probs keeps of the candidates (ids ascending, weights cw), or false when the candidate
// set (every token with weight >= cut; exhaustive: every nonzero token) cannot decide it.
bool decide(Scratch &s, int64_t n_ids, const RowParams &p, int64_t nonzero, double total, double cut, bool exhaustive,
            int64_t *n_out) {
    int32_t *ids = s.ids.data();
    double *cw = s.cw.data();
    int64_t n = n_ids;
    bool complete = exhaustive;  // the candidates hold exactly the survivors so far
    if (p.top_k > 0 && p.top_k < nonzero) {
        if (p.top_k > n) return false;
        std::copy(cw, cw + n, s.sorted.begin());
        std::nth_element(s.sorted.begin(), s.sorted.begin() + (p.top_k - 1), s.sorted.begin() + n, std::greater<>());
        double kth = s.sorted[p.top_k - 1];  // ties with the k-th are kept (vLLM masks < kth)
        int64_t k = 0;
        for (int64_t j = 0; j < n; j++)
            if (cw[j] >= kth) ids[k] = ids[j], cw[k++] = cw[j];
        n = k;
        complete = true;
    }
    if (p.top_p < 1.0) {
        double mass = total;
        if (complete) {
            mass = 0.0;
            for (int64_t j = 0; j < n; j++) mass += cw[j];
        }
        const double target = p.top_p * mass;
        // The nucleus: the smallest prefix of the descending order whose mass reaches target (a token
        // stays iff the mass strictly before it is < target). Buckets by the weight's float bits (in
        // order with the weights, 8 per octave) find, from the top down, the bucket where the mass
        // reaches target: only the tokens at or above it are sorted.
        constexpr int SHIFT = 20, BUCKETS = (0x3f800000 >> SHIFT) + 1;  // weights in (0, 1]
        auto key = [](double v) {
            const float f = float(v);
            uint32_t b;
            std::memcpy(&b, &f, sizeof b);
            return int(b >> SHIFT);
        };
        double bucket_mass[BUCKETS] = {};
        int64_t bucket_count[BUCKETS] = {};
        int16_t *keys = s.keys.data();
        for (int64_t j = 0; j < n; j++) {
            const int b = keys[j] = int16_t(key(cw[j]));
            bucket_mass[b] += cw[j];
            bucket_count[b]++;
        }
        // Every token of a bucket above the edge is in the nucleus, whatever its order there: sort only
        // the edge bucket (the next ones too if rounding leaves the walk short of target).
        double before = 0.0;
        int64_t k = 0;
        int edge = BUCKETS - 1;
        for (; edge > 0 && before + bucket_mass[edge] < target; edge--) before += bucket_mass[edge], k += bucket_count[edge];
        double *srt = s.sorted.data();
        int64_t h = 0;
        for (;; edge--) {
            h = 0;
            for (int64_t j = 0; j < n; j++)
                if (keys[j] == edge) srt[h++] = cw[j];
            std::sort(srt, srt + h, std::greater<>());
            int64_t i = 0;
            while (i < h && before < target) before += srt[i++];
            k += i;
            if (before >= target || edge == 0) {
                if (k == n && !complete && before < target) return false;  // may reach past the candidates
                h = i;  // srt[h - 1]: the last token in, when this bucket took one
                break;
            }
        }
        if (k == 0) return false;  // unreachable: target > 0 and the best token is a candidate
        double t = 1.0;  // the k-th largest weight: the last one taken
        if (h > 0) {
            t = srt[h - 1];
        } else {  // the walk ended on a bucket edge: the smallest weight of the buckets taken
            for (int64_t j = 0; j < n; j++)
                if (keys[j] > edge) t = std::min(t, cw[j]);
        }
        int64_t above = 0;
        for (int64_t j = 0; j < n; j++) above += cw[j] > t;
        int64_t ties = k - above, m = 0;  // ties at the edge: lower ids first
        for (int64_t j = 0; j < n; j++)
            if (cw[j] > t || (cw[j] == t && ties-- > 0)) ids[m] = ids[j], cw[m++] = cw[j];
        n = m;
        complete = true;
    }
    if (p.min_p > 0.0) {
        double best = 0.0;
        for (int64_t j = 0; j < n; j++) best = std::max(best, cw[j]);
        const double floor = p.min_p * best;  // the best token survives top-k and top-p
        if (!complete && floor < cut) return false;
        int64_t m = 0;
        for (int64_t j = 0; j < n; j++)
            if (cw[j] >= floor) ids[m] = ids[j], cw[m++] = cw[j];
        n = m;
    }
    *n_out = n;
    return true;
}

// The inverse-cdf draw over the survivors (id order): the first whose cumulative weight > u * total.
int64_t draw_kept(const double *cw, int64_t n, double u) {
    double total = 0.0;
    for (int64_t j = 0; j < n; j++) total += cw[j];
    const double target = u * total;
    double run = 0.0;
    int64_t last = 0;
    for (int64_t j = 0; j < n; j++) {
        run += cw[j];
        if (cw[j] > 0.0) last = j;
        if (run > target) return j;
    }
    return last;  // u * total rounded up to the total
}

// mass, next: as weights().
void sample_row(Scratch &s, const float *x, int64_t V, float m, double temperature, const RowParams &p, double u,
                int32_t *token, double *weights_out, double *mass, const float *next) {
    // Candidate sets, narrow to wide: e^-8 of the best token decides top-p 0.95 on ~7 of 8 rows of a
    // chat model's logits (~400 candidates), e^-12 nearly all the rest.
    const float cuts[4] = {std::exp(-8.0f), std::exp(-12.0f), std::exp(-30.0f), 0.0f};
    const float inv_t = float(std::min(1.0 / temperature, 1e30));
    int64_t nonzero = 0, n_ids = 0;
    float *w = s.w.data();
    const double total = weights(x, V, m, inv_t, w, &nonzero, mass, next, cuts[0], s.ids.data(), &n_ids);
    const bool filtered = (p.top_k > 0 && p.top_k < nonzero) || p.top_p < 1.0 || p.min_p > 0.0;
    if (!filtered) {
        *token = int32_t(draw_all(w, V, u * total));
        if (weights_out)
            for (int64_t i = 0; i < V; i++) weights_out[i] = w[i];
        return;
    }
    for (int c = 0; c < 4; c++) {
        if (c > 0 || n_ids < 0) n_ids = collect(w, V, cuts[c], s.ids.data());  // wider and wider, from the weights
        for (int64_t j = 0; j < n_ids; j++) s.cw[j] = w[s.ids[j]];
        int64_t kept = 0;
        if (decide(s, n_ids, p, nonzero, total, cuts[c], c == 3, &kept)) {
            *token = s.ids[draw_kept(s.cw.data(), kept, u)];
            if (weights_out) {
                std::fill(weights_out, weights_out + V, 0.0);
                for (int64_t j = 0; j < kept; j++) weights_out[s.ids[j]] = s.cw[j];
            }
            return;
        }
    }
    fail("tv_sample: no candidate set decided the filters");  // unreachable: the last set is exhaustive
}

thread_local Scratch t_scratch;

}  // namespace
}  // namespace tv

extern "C" int tv_sample(const float *raw, const float *processed, int64_t rows, int64_t vocab, int64_t row_stride,
                         const double *temperature, const int32_t *top_k, const double *top_p, const double *min_p,
                         const double *u, int32_t *tokens, float *lse, double *weights) {
    using namespace tv;
    return guard([&] {
        if (rows < 0 || vocab < 1 || vocab > INT32_MAX || row_stride < vocab)
            fail("tv_sample: bad shape rows=%lld vocab=%lld row_stride=%lld", (long long)rows, (long long)vocab,
                 (long long)row_stride);
        if (rows == 0) return;
        if (!raw || !temperature || !top_k || !top_p || !min_p || !u || !tokens || !lse)
            fail("tv_sample: null argument");
        if (!processed) processed = raw;
        for (int64_t r = 0; r < rows; r++) {
            const double t = temperature[r];
            if (!(t >= 0.0 && t <= 1e30) || !(top_p[r] > 0.0 && top_p[r] <= 1.0) || !(min_p[r] >= 0.0 && min_p[r] <= 1.0) ||
                !(u[r] >= 0.0 && u[r] < 1.0))
                fail("tv_sample: row %lld: temperature %g top_p %g min_p %g u %g out of range", (long long)r, t,
                     top_p[r], min_p[r], u[r]);
        }
        Scratch &s = t_scratch;
        if ((int64_t)s.w.size() < vocab) {
            s.w.resize(vocab);
            s.ids.resize(vocab);
            s.cw.resize(vocab);
            s.sorted.resize(vocab);
            s.keys.resize(vocab);
        }
        for (int64_t r = 0; r < rows; r++) {
            const float *x = processed + r * row_stride, *xr = raw + r * row_stride;
            const RowMax mx = row_max(x, vocab);
            const RowMax mr = xr == x ? mx : row_max(xr, vocab);
            if (mx.nan || mr.nan || !std::isfinite(mx.max) || !std::isfinite(mr.max))
                fail("tv_sample: row %lld has a NaN or no finite logit", (long long)r);
            const float *next = r + 1 < rows ? processed + (r + 1) * row_stride : nullptr;
            const bool greedy = temperature[r] == 0.0, fused = xr == x && !greedy;  // fused: weights() sums both
            double mass = fused ? 0.0 : exp_sum(xr, vocab, mr.max, next);
            if (greedy) {  // the first maximum, i.e. the lowest id on ties
                tokens[r] = int32_t(first_index_of(x, vocab, mx.max));
            } else {
                const RowParams p{top_k[r], top_p[r], min_p[r]};
                sample_row(s, x, vocab, mx.max, temperature[r], p, u[r], tokens + r,
                           weights ? weights + r * vocab : nullptr, fused ? &mass : nullptr, next);
            }
            lse[r] = float(double(mr.max) + std::log(mass));
        }
    });
}
