// The sampler's per-row work (tv_sample, tinyvllm.h): log-sum-exp of the raw logits, greedy argmax, and
// the temperature -> top-k -> top-p -> min-p draw of tinyvllm/sampler.py, at SIMD speed.
//
// The exp passes use GCC/Clang vector extensions (16 floats), so one source serves NEON, AVX2 and
// AVX-512; on x86 the hot loops are cloned per ISA (target_clones) and picked once at load time.
// Weights exp((x - max) / T) are float32 (Cephes' polynomial, ~2 ulp); every sum over them is
// double. The filters are decided on a candidate set (the tokens with weight >= e^-12 of the best
// one, else e^-30, else every token with a nonzero weight) when it provably holds every survivor:
// then only the candidates are sorted, and only as many of them as the nucleus needs.
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

// sum of e^(x - m): the log-sum-exp's mass
TV_SIMD_CLONES double exp_sum(const float *x, int64_t n, float m) {
    double total = 0.0;
    const vf mv = splat(m);
    int64_t i = 0;
    for (; i + CHUNK <= n; i += CHUNK) {
        vf s = vf{};
        for (int j = 0; j < CHUNK; j += L) s += vexp(load(x + i + j) - mv);
        total += hsum(s);
    }
    for (; i + L <= n; i += L) total += hsum(vexp(load(x + i) - mv));
    if (i < n) total += hsum(vexp(load_tail(x + i, n - i) - mv));
    return total;
}

// w[i] = e^((x[i] - m) * inv_t); returns their sum (float chunks of CHUNK, added in double: the
// same partial sums draw_all() recomputes), counts the nonzero weights, and appends the ids of
// those >= cut to ids.
TV_SIMD_CLONES double weights(const float *x, int64_t n, float m, float inv_t, float cut, float *w, int64_t *nonzero,
                              int32_t *ids, int64_t *n_ids) {
    const vf mv = splat(m), tv = splat(inv_t), cv = splat(cut), zero = vf{};
    double total = 0.0;
    vi nz = vi{};
    int64_t k = 0, i = 0;
    for (; i + CHUNK <= n; i += CHUNK) {
        vf s = vf{};
        for (int j = 0; j < CHUNK; j += 4 * L) {  // four vectors, one test for candidates among them
            vi hit = vi{};
            for (int q = 0; q < 4; q++) {
                vf e = vexp((load(x + i + j + q * L) - mv) * tv);
                std::memcpy(w + i + j + q * L, &e, sizeof e);
                s += e;
                nz -= e > zero;
                hit |= e >= cv;
            }
            if (any_lane(hit))
                for (int t = 0; t < 4 * L; t++)
                    if (w[i + j + t] >= cut) ids[k++] = int32_t(i + j + t);
        }
        total += hsum(s);
    }
    int64_t count = 0;
    for (int l = 0; l < L; l++) count += nz[l];
    for (int64_t j = i; j < n; j += L) {  // the tail's weights, a vector at a time
        vf e = vexp((load_tail(x + j, n - j) - mv) * tv);
        for (int l = 0; l < L && j + l < n; l++) w[j + l] = e[l];
    }
    for (; i < n; i++) {  // then one at a time, each its own partial sum (as draw_all walks it)
        total += w[i];
        count += w[i] > 0.0f;
        if (w[i] >= cut) ids[k++] = int32_t(i);
    }
    *nonzero = count;
    *n_ids = k;
    return total;
}

TV_SIMD_CLONES double chunk_sum(const float *w) {
    vf s = vf{};
    for (int j = 0; j < CHUNK; j += L) s += load(w + j);
    return hsum(s);
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
            break;  // rounding: the chunk's float sum crossed, its walk did not
        }
        run += s;
    }
    for (; i < n && run <= target; i++)
        if ((run += w[i]) > target && w[i] > 0.0f) return i;
    // u * total rounded up to the total: the last token with a weight, at or before where the walk ended
    for (int64_t j = std::min(n, i + CHUNK) - 1; j >= 0; j--)
        if (w[j] > 0.0f) return j;
    return 0;
}

struct RowParams {
    int64_t top_k;  // 0 < top_k < nonzero: on
    double top_p;   // < 1: on
    double min_p;   // > 0: on
};

// Scratch reused row after row (one set per calling thread).
struct Scratch {
    std::vector<float> w;
    std::vector<int32_t> ids, keep_ids;
    std::vector<double> cw, sorted, keep_w;
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
        // stays iff the mass strictly before it is < target). Sort only the best h: enough when they
        // already hold target.
        double *srt = s.sorted.data();
        std::copy(cw, cw + n, srt);
        int64_t h = std::min<int64_t>(n, 64);
        for (;;) {
            if (h < n) std::nth_element(srt, srt + (h - 1), srt + n, std::greater<>());
            std::sort(srt, srt + h, std::greater<>());
            double before = 0.0;
            int64_t k = 0;
            while (k < h && before < target) before += srt[k++];
            if (before >= target || h == n) {
                if (k == n && !complete && before < target) return false;  // may reach past the candidates
                if (k == 0) k = 1;
                double t = srt[k - 1];
                int64_t above = 0;
                for (int64_t j = 0; j < n; j++) above += cw[j] > t;
                int64_t ties = k - above, m = 0;  // ties at the edge: lower ids first
                for (int64_t j = 0; j < n; j++)
                    if (cw[j] > t || (cw[j] == t && ties-- > 0)) ids[m] = ids[j], cw[m++] = cw[j];
                n = m;
                complete = true;
                break;
            }
            h = std::min(n, h * 8);
            std::copy(cw, cw + n, srt);
        }
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

void sample_row(Scratch &s, const float *x, int64_t V, float m, double temperature, const RowParams &p, double u,
                int32_t *token, double *weights_out) {
    const float cuts[3] = {std::exp(-12.0f), std::exp(-30.0f), 0.0f};
    const float inv_t = float(std::min(1.0 / temperature, 1e30));
    int64_t nonzero = 0, n_ids = 0;
    float *w = s.w.data();
    const double total = weights(x, V, m, inv_t, cuts[0], w, &nonzero, s.ids.data(), &n_ids);
    const bool filtered = (p.top_k > 0 && p.top_k < nonzero) || p.top_p < 1.0 || p.min_p > 0.0;
    if (!filtered) {
        *token = int32_t(draw_all(w, V, u * total));
        if (weights_out)
            for (int64_t i = 0; i < V; i++) weights_out[i] = w[i];
        return;
    }
    for (int c = 0; c < 3; c++) {
        if (c > 0) {  // a wider candidate set, from the stored weights
            n_ids = 0;
            for (int64_t i = 0; i < V; i++)
                if (c == 2 ? w[i] > 0.0f : w[i] >= cuts[c]) s.ids[n_ids++] = int32_t(i);
        }
        for (int64_t j = 0; j < n_ids; j++) s.cw[j] = w[s.ids[j]];
        int64_t kept = 0;
        if (decide(s, n_ids, p, nonzero, total, cuts[c], c == 2, &kept)) {
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
        }
        for (int64_t r = 0; r < rows; r++) {
            const float *x = processed + r * row_stride, *xr = raw + r * row_stride;
            const RowMax mx = row_max(x, vocab);
            const RowMax mr = xr == x ? mx : row_max(xr, vocab);
            if (mx.nan || mr.nan || !std::isfinite(mx.max) || !std::isfinite(mr.max))
                fail("tv_sample: row %lld has a NaN or no finite logit", (long long)r);
            lse[r] = float(double(mr.max) + std::log(exp_sum(xr, vocab, mr.max)));
            if (temperature[r] == 0.0) {  // greedy: the first maximum, i.e. the lowest id on ties
                tokens[r] = int32_t(std::find(x, x + vocab, mx.max) - x);
                continue;
            }
            const RowParams p{top_k[r], top_p[r], min_p[r]};
            sample_row(s, x, vocab, mx.max, temperature[r], p, u[r], tokens + r, weights ? weights + r * vocab : nullptr);
        }
    });
}
