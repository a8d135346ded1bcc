// AVX-512 (F/BW/VL) + VNNI kernels, per-function target attributes so the library still loads
// on CPUs without them (kernels.cpp only picks this table when the CPU reports all features).
//
// A weight block is widened to 32 int16 lanes (value order 0..31, the same order as ActBlock.qs),
// so one _mm512_dpwssd_epi32 forms the block's exact integer dot as 16 int32 partial sums.
// On Zen 4 a 512-bit op costs two 256-bit slots, so the win over AVX2 comes from doing less
// per block, not from wider lanes:
//   - the quantized matmul (QuantGemm below) unpacks a weight row once into an L1 buffer and
//     reuses it for every activation row (prefill, batched decode);
//   - per-block scales are never converted one by one: 16 weight scales come in with one gather,
//     and d_w * d_x is formed 16 blocks at a time, so the inner loop is dpwssd, cvt, fma;
//   - Q4_1's min term sum_b m_b * (d_x * sum q_x) is a separate 16-wide dot per row.
#include "attn_block.h"
#include "kernels.h"

#if defined(__x86_64__)

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#define TV_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")))

namespace tv {
namespace {

TV_AVX512 inline float half(const uint8_t *p) { return _cvtsh_ss(load_u16(p)); }

// A weight block as int16: lo = values 0..15, hi = values 16..31 (GGML's nibble order). 256-bit
// halves on purpose: Zen 4 runs 512-bit ops as two 256-bit halves, and a ymm pair needs no
// cross-lane shuffle to widen 16 bytes, so the ymm form of VNNI does the same work in fewer slots.
struct W16 {
    __m256i lo, hi;
};

TV_AVX512 inline W16 nibbles16(const uint8_t *qs) {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i *>(qs)), f = _mm_set1_epi8(0x0F);
    return {_mm256_cvtepu8_epi16(_mm_and_si128(q, f)), _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(q, 4), f))};
}

struct FmtQ4_0 {
    static constexpr size_t BYTES = Q4_0_BYTES;
    static constexpr bool HAS_MIN = false;
    TV_AVX512 static W16 weights(const uint8_t *w) {
        const W16 n = nibbles16(w + 2);
        const __m256i eight = _mm256_set1_epi16(8);
        return {_mm256_sub_epi16(n.lo, eight), _mm256_sub_epi16(n.hi, eight)};
    }
};
struct FmtQ4_1 {
    static constexpr size_t BYTES = Q4_1_BYTES;
    static constexpr bool HAS_MIN = true;
    TV_AVX512 static W16 weights(const uint8_t *w) { return nibbles16(w + 4); }
};
struct FmtQ8_0 {
    static constexpr size_t BYTES = Q8_0_BYTES;
    static constexpr bool HAS_MIN = false;
    TV_AVX512 static W16 weights(const uint8_t *w) {
        return {_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(w + 2))),
                _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(w + 18)))};
    }
};

// The block's exact integer dot as 8 int32 lanes: two chained dpwssd (|sum| < 2^31 by far).
TV_AVX512 inline __m256i dot8(__m256i wlo, __m256i whi, const int16_t *x) {
    const __m256i s = _mm256_dpwssd_epi32(_mm256_setzero_si256(), wlo, _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x)));
    return _mm256_dpwssd_epi32(s, whi, _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x + 16)));
}

TV_AVX512 inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

TV_AVX512 inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

// ---- Kernels-table entry points (one weight row against <= MAX_NX ActBlock rows) -------------
// Straightforward per-block code; the matmul driver uses QuantGemm instead when this path is active.
template <class Fmt>
TV_AVX512 void rows(const uint8_t *w, const ActBlock *x, int64_t nb, int nx, float *out, int64_t out_stride) {
    __m256 acc[MAX_NX];
    float macc[MAX_NX];
    for (int i = 0; i < nx; i++) acc[i] = _mm256_setzero_ps(), macc[i] = 0.0f;
    for (int64_t b = 0; b < nb; b++, w += Fmt::BYTES) {
        const W16 wv = Fmt::weights(w);
        const float dw = half(w);
        for (int i = 0; i < nx; i++) {
            const ActBlock &xb = x[i * nb + b];
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot8(wv.lo, wv.hi, xb.qs)), _mm256_set1_ps(dw * xb.d), acc[i]);
            if (Fmt::HAS_MIN) macc[i] = std::fma(half(w + 2), xb.s, macc[i]);
        }
    }
    for (int i = 0; i < nx; i++) out[i * out_stride] = hsum8(acc[i]) + macc[i];
}

// ---- QuantGemm: the tiled matmul --------------------------------------------------------------

// Activations re-laid once per matmul: qs 64-byte aligned (one aligned load per block), and the
// per-block scales d and sums s contiguous per row so 16 blocks' worth load as one vector.
// 64 bytes, 64-aligned: one block of int16 (std::vector<__m512i> would drop the vector attributes).
struct alignas(64) Blk16 {
    int16_t v[QK];
};

struct Prep {
    std::vector<Blk16> qs;  // [m][nb]
    std::vector<float> d, s;  // [m][nb]
};

TV_AVX512 const void *prepare(const ActBlock *x, int64_t m, int64_t nb) {
    thread_local Prep p;  // the calling thread's; workers only read it during the matmul
    const size_t n = (size_t)(m * nb);
    if (p.qs.size() < n) p.qs.resize(n), p.d.resize(n), p.s.resize(n);
    Blk16 *qs = p.qs.data();
    float *d = p.d.data(), *s = p.s.data();
    for (size_t i = 0; i < n; i++) {
        _mm512_store_si512(qs[i].v, _mm512_loadu_si512(x[i].qs));
        d[i] = x[i].d;
        s[i] = x[i].s;
    }
    return &p;
}

// Per-thread unpacked weights: a panel of rows as int16 blocks plus float scales (and mins).
// Row strides are nb16 (nb rounded up to 16) so every scale vector load/store is a full one: a
// masked store followed by loads of what it wrote cannot be store-forwarded (a stall per row).
struct Panel {
    std::vector<Blk16> w;           // [rows][nb]
    std::vector<uint16_t> hd, hm;   // [rows][nb16] raw fp16 scales / mins, converted 16 at a time
    std::vector<float> d, mn;       // [rows][nb16]
    std::vector<float> scale;       // [rows][NR][nb16]: d_w * d_x for the current activation tile
};

constexpr int GEMM_NR = 6;  // activation rows per micro-kernel: 2 x 6 accumulators + loads fit easily

// One weight row (unpacked) x NR activation rows. Every row runs the same sequence (block order,
// two fma chains for even/odd blocks, a fixed reduction tree), whatever NR is, so results are
// batch invariant.
template <int NR, bool HAS_MIN>
TV_AVX512 void micro(const Blk16 *w, const float *wm, const Prep &x, int64_t i0, int64_t nb, int64_t nb16,
                     const float *scale, float *y, int64_t ldy) {
    __m256 acc0[NR], acc1[NR];
    for (int i = 0; i < NR; i++) acc0[i] = acc1[i] = _mm256_setzero_ps();
    const Blk16 *xq = x.qs.data() + i0 * nb;
    auto step = [&](int64_t b, __m256 *acc) TV_AVX512 {
        const __m256i lo = _mm256_load_si256(reinterpret_cast<const __m256i *>(w[b].v));
        const __m256i hi = _mm256_load_si256(reinterpret_cast<const __m256i *>(w[b].v + 16));
        for (int i = 0; i < NR; i++)
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot8(lo, hi, xq[i * nb + b].v)), _mm256_set1_ps(scale[i * nb16 + b]), acc[i]);
    };
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) step(b, acc0), step(b + 1, acc1);
    if (b < nb) step(b, acc0);
    for (int i = 0; i < NR; i++) {
        float r = hsum8(_mm256_add_ps(acc0[i], acc1[i]));
        if (HAS_MIN) {  // sum_b m_b * s_b, 16 blocks per fma (x.s rows are not padded: mask the tail)
            const float *xs = x.s.data() + (i0 + i) * nb;
            __m512 mv = _mm512_setzero_ps();
            for (int64_t c = 0; c < nb; c += 16)
                mv = _mm512_fmadd_ps(_mm512_loadu_ps(wm + c), _mm512_maskz_loadu_ps(tail_mask(nb - c), xs + c), mv);
            r += _mm512_reduce_add_ps(mv);
        }
        y[(i0 + i) * ldy] = r;
    }
}

// Few activation rows (decode): weights unpacked in registers, no buffer. Bit-identical to micro()
// (same products, block b into accumulator b & 1, the min term per lane b % 16, same reductions),
// so a row's result does not depend on whether its batch took this path or the panel path.
template <class Fmt, int NR>
TV_AVX512 void direct_row(const uint8_t *w, const Prep &x, int64_t i0, int64_t nb, float *y, int64_t ldy) {
    __m256 acc0[NR], acc1[NR];
    alignas(64) float mv[NR][16] = {};  // lane b % 16 of micro()'s 16-wide min-term fma, kept per lane
    for (int i = 0; i < NR; i++) acc0[i] = acc1[i] = _mm256_setzero_ps();
    const Blk16 *xq = x.qs.data() + i0 * nb;
    const float *xd = x.d.data() + i0 * nb, *xs = x.s.data() + i0 * nb;
    // even blocks into acc0, odd into acc1; the scale is the same float product micro() uses
    auto step = [&](int64_t b, __m256 *acc) TV_AVX512 {
        const uint8_t *wb = w + b * Fmt::BYTES;
        const W16 wv = Fmt::weights(wb);
        const float dw = half(wb);
        for (int i = 0; i < NR; i++) {
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot8(wv.lo, wv.hi, xq[i * nb + b].v)),
                                     _mm256_set1_ps(dw * xd[i * nb + b]), acc[i]);
            if (Fmt::HAS_MIN) mv[i][b & 15] = std::fma(half(wb + 2), xs[i * nb + b], mv[i][b & 15]);
        }
    };
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) step(b, acc0), step(b + 1, acc1);
    if (b < nb) step(b, acc0);
    for (int i = 0; i < NR; i++) {
        float r = hsum8(_mm256_add_ps(acc0[i], acc1[i]));
        if (Fmt::HAS_MIN) r += _mm512_reduce_add_ps(_mm512_load_ps(mv[i]));
        y[(i0 + i) * ldy] = r;
    }
}

template <class Fmt>
TV_AVX512 void gemm_rows(const uint8_t *w, size_t row_bytes, int64_t r0, int64_t r1, const Prep &x, int64_t m,
                         int64_t nb, float *y, int64_t ldy) {
    if (m < 4) {  // decode: nothing to share an unpacked row with
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t *wr = w + (size_t)r * row_bytes;
            switch (m) {
                case 1: direct_row<Fmt, 1>(wr, x, 0, nb, y + r, ldy); break;
                case 2: direct_row<Fmt, 2>(wr, x, 0, nb, y + r, ldy); break;
                default: direct_row<Fmt, 3>(wr, x, 0, nb, y + r, ldy); break;
            }
        }
        return;
    }
    static thread_local Panel tls;
    const int64_t nb16 = (nb + 15) & ~int64_t(15);
    // A panel of weight rows small enough (~16 KiB unpacked) to stay in L1 with an activation tile.
    const int64_t panel = std::clamp<int64_t>(16384 / (nb * 64), 1, 16);
    Panel &P = tls;  // raw pointers below: __m512i stores may alias anything, including vector internals
    if (P.w.size() < (size_t)(panel * nb)) P.w.resize((size_t)(panel * nb));
    if (P.d.size() < (size_t)(panel * nb16)) {
        const size_t n = (size_t)(panel * nb16);
        P.hd.resize(n), P.hm.resize(n), P.d.resize(n), P.mn.resize(n), P.scale.resize(n * GEMM_NR);
    }
    Blk16 *const pw0 = P.w.data();
    uint16_t *const hd = P.hd.data(), *const hm = P.hm.data();
    float *const pd0 = P.d.data(), *const pm0 = P.mn.data(), *const scale = P.scale.data();
    for (int64_t p0 = r0; p0 < r1; p0 += panel) {
        const int64_t np = std::min(panel, r1 - p0);
        for (int64_t r = 0; r < np; r++) {
            const uint8_t *wr = w + (size_t)(p0 + r) * row_bytes;
            Blk16 *dst = pw0 + r * nb;
            for (int64_t b = 0; b < nb; b++, wr += Fmt::BYTES) {
                const W16 wv = Fmt::weights(wr);
                _mm256_store_si256(reinterpret_cast<__m256i *>(dst[b].v), wv.lo);
                _mm256_store_si256(reinterpret_cast<__m256i *>(dst[b].v + 16), wv.hi);
                hd[r * nb16 + b] = load_u16(wr);
                if (Fmt::HAS_MIN) hm[r * nb16 + b] = load_u16(wr + 2);
            }
            for (int64_t b = nb; b < nb16; b++) hd[r * nb16 + b] = hm[r * nb16 + b] = 0;  // 0 * 0, never nan
        }
        // fp16 -> fp32 16 at a time
        for (int64_t c = 0; c < np * nb16; c += 16) {
            _mm512_storeu_ps(pd0 + c, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(hd + c))));
            if (Fmt::HAS_MIN)
                _mm512_storeu_ps(pm0 + c, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(hm + c))));
        }
        for (int64_t i0 = 0; i0 < m; i0 += GEMM_NR) {
            const int64_t nr = std::min<int64_t>(GEMM_NR, m - i0);
            // d_w * d_x for every (panel row, tile row, block), before any micro-kernel reads them
            for (int64_t r = 0; r < np; r++)
                for (int64_t i = 0; i < nr; i++) {
                    const float *xd = x.d.data() + (i0 + i) * nb;
                    for (int64_t c = 0; c < nb; c += 16)
                        _mm512_storeu_ps(scale + (r * GEMM_NR + i) * nb16 + c,
                                        _mm512_mul_ps(_mm512_loadu_ps(pd0 + r * nb16 + c),
                                                      _mm512_maskz_loadu_ps(tail_mask(nb - c), xd + c)));
                }
            for (int64_t r = 0; r < np; r++) {
                const Blk16 *pw = pw0 + r * nb;
                const float *pm = pm0 + r * nb16, *sc = scale + r * GEMM_NR * nb16;
                float *yr = y + p0 + r;
                constexpr bool M = Fmt::HAS_MIN;
                switch (nr) {
                    case 1: micro<1, M>(pw, pm, x, i0, nb, nb16, sc, yr, ldy); break;
                    case 2: micro<2, M>(pw, pm, x, i0, nb, nb16, sc, yr, ldy); break;
                    case 3: micro<3, M>(pw, pm, x, i0, nb, nb16, sc, yr, ldy); break;
                    case 4: micro<4, M>(pw, pm, x, i0, nb, nb16, sc, yr, ldy); break;
                    case 5: micro<5, M>(pw, pm, x, i0, nb, nb16, sc, yr, ldy); break;
                    default: micro<6, M>(pw, pm, x, i0, nb, nb16, sc, yr, ldy); break;
                }
            }
        }
    }
}

TV_AVX512 void gemm_run(int dtype, const uint8_t *w, size_t row_bytes, int64_t r0, int64_t r1, const void *prep,
                        int64_t m, int64_t nb, float *y, int64_t ldy) {
    const Prep &x = *static_cast<const Prep *>(prep);
    switch (dtype) {
        case 2: gemm_rows<FmtQ4_0>(w, row_bytes, r0, r1, x, m, nb, y, ldy); break;  // TV_Q4_0
        case 3: gemm_rows<FmtQ4_1>(w, row_bytes, r0, r1, x, m, nb, y, ldy); break;  // TV_Q4_1
        case 8: gemm_rows<FmtQ8_0>(w, row_bytes, r0, r1, x, m, nb, y, ldy); break;  // TV_Q8_0
        default: break;
    }
}

// ---- float dots ------------------------------------------------------------------------------

TV_AVX512 float dot_f32(const float *w, const float *x, int64_t n) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
    }
    for (; i < n; i += 16) {  // masked tail: no scalar loop
        const __mmask16 k = tail_mask(n - i);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, w + i), _mm512_maskz_loadu_ps(k, x + i), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

TV_AVX512 inline __m512 load_h16(__mmask16 k, const uint16_t *p) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p)); }

TV_AVX512 float dot_f16(const uint16_t *w, const float *x, int64_t n) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm512_fmadd_ps(load_h16(0xFFFF, w + i), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(load_h16(0xFFFF, w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
    }
    for (; i < n; i += 16) {
        const __mmask16 k = tail_mask(n - i);
        a0 = _mm512_fmadd_ps(load_h16(k, w + i), _mm512_maskz_loadu_ps(k, x + i), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

TV_AVX512 void axpy_f32(float a, const float *v, float *y, int64_t n) {
    const __m512 va = _mm512_set1_ps(a);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = tail_mask(n - i);
        _mm512_mask_storeu_ps(y + i, k, _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(k, v + i), _mm512_maskz_loadu_ps(k, y + i)));
    }
}

TV_AVX512 void axpy_f16(float a, const uint16_t *v, float *y, int64_t n) {
    const __m512 va = _mm512_set1_ps(a);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = tail_mask(n - i);
        _mm512_mask_storeu_ps(y + i, k, _mm512_fmadd_ps(va, load_h16(k, v + i), _mm512_maskz_loadu_ps(k, y + i)));
    }
}


// ---- attention block (hd == 64, bs <= 16; anything else goes to the generic loops) -------------
// Keys come transposed from the cache (row d = element d of the block's 16 keys) so scores run with lanes over keys: per
// query row, score[s] = sum over even d + sum over odd d, each chain sequential in d, whatever
// the other rows are. Up to 4 rows share each key/value load. Vector exp (Cephes polynomial).
TV_AVX512 inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    const __m512 r2 = _mm512_mul_ps(r, r);
    const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(y, n);
}

TV_AVX512 void conv_row(const uint8_t *src, bool f16, float *dst, int hd) {
    for (int i = 0; i < hd; i += 16) {
        const __mmask16 k = tail_mask(hd - i);
        _mm512_mask_storeu_ps(dst + i, k, f16 ? load_h16(k, reinterpret_cast<const uint16_t *>(src) + i)
                                              : _mm512_maskz_loadu_ps(k, reinterpret_cast<const float *>(src) + i));
    }
}

TV_AVX512 void attn_block(const float *q, int R, int hd, const int *n_valid, const uint8_t *k, const uint8_t *v,
                          size_t ld, bool f16, int bs, float scale, float *m, float *l, float *acc, float *work) {
    if (hd != 64 || bs > 16 || ld > (1u << 24))
        return attn_block_rows(conv_row, q, R, hd, n_valid, k, v, ld, f16, bs, scale, m, l, acc, work);
    int nmax = 0;
    for (int r = 0; r < R; r++) nmax = std::max(nmax, n_valid[r]);
    if (nmax <= 0) return;
    alignas(64) float kt[64 * 16];
    alignas(64) float pa[4][16];
    alignas(64) float dummy[64];
    const __mmask16 gm = tail_mask(nmax);  // keys past every query load as 0
    for (int d = 0; d < 64; d++)
        _mm512_store_ps(kt + 16 * d, f16 ? load_h16(gm, reinterpret_cast<const uint16_t *>(k) + d * bs)
                                         : _mm512_maskz_loadu_ps(gm, reinterpret_cast<const float *>(k) + d * bs));
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int r0 = 0; r0 < R; r0 += 4) {
        const int nr = std::min(4, R - r0);
        const float *qr[4];
        float *ar[4];
        for (int j = 0; j < 4; j++) {
            qr[j] = q + (size_t)(j < nr ? r0 + j : r0) * 64;
            ar[j] = j < nr ? acc + (size_t)(r0 + j) * 64 : dummy;
        }
        __m512 se0 = _mm512_setzero_ps(), se1 = se0, se2 = se0, se3 = se0, so0 = se0, so1 = se0, so2 = se0, so3 = se0;
        for (int d = 0; d < 64; d += 2) {
            const __m512 k0 = _mm512_load_ps(kt + 16 * d), k1 = _mm512_load_ps(kt + 16 * (d + 1));
            se0 = _mm512_fmadd_ps(_mm512_set1_ps(qr[0][d]), k0, se0);
            so0 = _mm512_fmadd_ps(_mm512_set1_ps(qr[0][d + 1]), k1, so0);
            se1 = _mm512_fmadd_ps(_mm512_set1_ps(qr[1][d]), k0, se1);
            so1 = _mm512_fmadd_ps(_mm512_set1_ps(qr[1][d + 1]), k1, so1);
            se2 = _mm512_fmadd_ps(_mm512_set1_ps(qr[2][d]), k0, se2);
            so2 = _mm512_fmadd_ps(_mm512_set1_ps(qr[2][d + 1]), k1, so2);
            se3 = _mm512_fmadd_ps(_mm512_set1_ps(qr[3][d]), k0, se3);
            so3 = _mm512_fmadd_ps(_mm512_set1_ps(qr[3][d + 1]), k1, so3);
        }
        const __m512 sv[4] = {_mm512_add_ps(se0, so0), _mm512_add_ps(se1, so1), _mm512_add_ps(se2, so2),
                              _mm512_add_ps(se3, so3)};
        for (int j = 0; j < 4; j++) {
            const int n = j < nr ? n_valid[r0 + j] : 0;
            if (n <= 0) {
                _mm512_store_ps(pa[j], _mm512_setzero_ps());
                continue;
            }
            const int r = r0 + j;
            const __mmask16 mk = tail_mask(n);
            const __m512 s = _mm512_mul_ps(sv[j], vscale);
            const float bmax = _mm512_mask_reduce_max_ps(mk, s);
            float mr = m[r], lr = l[r];
            if (bmax > mr) {  // new running max: rescale what was accumulated so far
                const float rr = std::exp(mr - bmax);
                lr *= rr;
                const __m512 vr = _mm512_set1_ps(rr);
                for (int i = 0; i < 64; i += 16) _mm512_storeu_ps(ar[j] + i, _mm512_mul_ps(_mm512_loadu_ps(ar[j] + i), vr));
                mr = bmax;
            }
            const __m512 p = _mm512_maskz_mov_ps(mk, exp512(_mm512_sub_ps(s, _mm512_set1_ps(mr))));
            lr += _mm512_reduce_add_ps(p);
            m[r] = mr;
            l[r] = lr;
            _mm512_store_ps(pa[j], p);
        }
        __m512 a[4][4];
        for (int j = 0; j < 4; j++)
            for (int i = 0; i < 4; i++) a[j][i] = _mm512_loadu_ps(ar[j] + 16 * i);
        for (int s = 0; s < nmax; s++) {
            const uint8_t *vs = v + s * ld;
            __m512 v0, v1, v2, v3;
            if (f16) {
                v0 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(vs)));
                v1 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(vs + 32)));
                v2 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(vs + 64)));
                v3 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(vs + 96)));
            } else {
                const float *vf = reinterpret_cast<const float *>(vs);
                v0 = _mm512_loadu_ps(vf), v1 = _mm512_loadu_ps(vf + 16), v2 = _mm512_loadu_ps(vf + 32),
                v3 = _mm512_loadu_ps(vf + 48);
            }
            for (int j = 0; j < 4; j++) {
                const __m512 p = _mm512_set1_ps(pa[j][s]);
                a[j][0] = _mm512_fmadd_ps(p, v0, a[j][0]);
                a[j][1] = _mm512_fmadd_ps(p, v1, a[j][1]);
                a[j][2] = _mm512_fmadd_ps(p, v2, a[j][2]);
                a[j][3] = _mm512_fmadd_ps(p, v3, a[j][3]);
            }
        }
        for (int j = 0; j < 4; j++)
            for (int i = 0; i < 4; i++) _mm512_storeu_ps(ar[j] + 16 * i, a[j][i]);
    }
    (void)work;
}

const Kernels table = {"avx512vnni", rows<FmtQ4_0>, rows<FmtQ4_1>, rows<FmtQ8_0>, dot_f32, dot_f16, axpy_f32, axpy_f16, attn_block};
const QuantGemm gemm = {prepare, gemm_run};

}  // namespace

const Kernels *kernels_avx512_table() { return &table; }

const QuantGemm *quant_gemm(const Kernels &k) { return &k == &table ? &gemm : nullptr; }

bool cpu_has_avx512vnni() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

}  // namespace tv

#else  // not x86-64

namespace tv {
const Kernels *kernels_avx512_table() { return nullptr; }
const QuantGemm *quant_gemm(const Kernels &) { return nullptr; }
bool cpu_has_avx512vnni() { return false; }
}  // namespace tv

#endif
