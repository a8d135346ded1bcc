// AVX-512 (F/BW/VL) + VNNI kernels, per-function target attributes so the library still loads
// on CPUs without them (kernels.cpp only picks this table when the CPU reports all features).
//
// Weights are read through the format traits (formats.h, unpacked by x86_common.h): a 32-value
// slice becomes 32 int16 lanes in ActBlock.qs order, so VNNI (vpdpwssd) forms its exact integer
// dot. On Zen 4 a 512-bit op costs two 256-bit slots, so the win over AVX2 comes from doing less
// per slice, not from wider lanes: the quantized matmul (x86_gemm.h's QuantGemm, with the traits
// below) forms each slice's
// exact integer dot first and does the float work (convert, scale, accumulate) once per slice
// for 8 outputs at a time (8 weight rows in decode, 8 activation rows in the panel path).
#include "attn_block.h"
#include "kernels.h"
#include "tinyvllm.h"
#include "x86_common.h"

#if defined(__x86_64__)

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#define TV_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")))
#define TV_ISA TV_AVX512
#include "x86_gemm.h"

namespace tv {
namespace {

// A format read as if it had no high bits and no offset (the rest of its traits unchanged).
template <class F>
struct LowBitsOnly : F {
    static constexpr High HIGH = HIGH_NONE;
    static constexpr int OFFSET = 0;
};

// unpack<F> with AVX-512BW's mask registers for a 32-bit high-bit mask (Q5_0, Q5_1): q = low +
// top * h - OFFSET is linear, so the bits select int16 lanes: Q5_1 (no offset) adds top where h = 1,
// Q5_0 (OFFSET == top) subtracts it where h = 0. One masked op per half instead of the AVX2 path's
// byte expansion and offset.
template <class F>
TV_AVX512 inline W16 unpack512(const uint8_t *blk, int s) {
    if constexpr (F::HIGH == HIGH_MASK32) {
        constexpr int top = 1 << F::LOW_BITS;
        static_assert(!F::HAS_TABLE && (F::OFFSET == 0 || F::OFFSET == top), "a shape this function knows");
        W16 u = unpack<LowBitsOnly<F>>(blk, s);
        uint32_t bits;
        std::memcpy(&bits, blk + F::src(s).hi, 4);
        if (F::OFFSET) bits = ~bits;
        const __m256i t = _mm256_set1_epi16(top);
        if constexpr (F::OFFSET == 0) {
            u.lo = _mm256_mask_add_epi16(u.lo, (__mmask16)bits, u.lo, t);
            u.hi = _mm256_mask_add_epi16(u.hi, (__mmask16)(bits >> 16), u.hi, t);
        } else {
            u.lo = _mm256_mask_sub_epi16(u.lo, (__mmask16)bits, u.lo, t);
            u.hi = _mm256_mask_sub_epi16(u.hi, (__mmask16)(bits >> 16), u.hi, t);
        }
        return u;
    } else {
        return unpack<F>(blk, s);
    }
}

TV_AVX512 inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

// Decode of int8 (Q8_0), two rows per zmm: each row's 32 bytes in one 256-bit half (one load and
// one insert), split even/odd as x86_gemm.h's ymm decode does (vpmaddubsw by 1, a shift), one zmm
// vpdpwssd per half against the even and odd activations broadcast to both rows. The ymm decode
// gave 4.4 us at 192x576 (1 thread), widening 8 rows per zmm pair 3.7 (port 5 bound), this 3.x.

// Pair vectors p[q] (int32 lanes 0..7: row q's partial dots, 8..15: row q + 4's) -> lane r = row r's dot.
TV_AVX512 inline __m256i reduce_pairs512(const __m512i p[4]) {
    // per 128-bit lane: [p0, p1, p2, p3]'s partial sums (lanes 0, 1: rows 0..3; lanes 2, 3: rows 4..7)
    const __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(p[0], p[1]), _mm512_unpackhi_epi32(p[0], p[1]));
    const __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(p[2], p[3]), _mm512_unpackhi_epi32(p[2], p[3]));
    const __m512i t = _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
    const __m512i u = _mm512_add_epi32(t, _mm512_shuffle_i32x4(t, t, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm512_castsi512_si256(_mm512_shuffle_i32x4(u, u, _MM_SHUFFLE(2, 0, 2, 0)));
}

// 16 activation rows as zmm lanes, for x86_gemm.h's micro().
struct Zmm {
    using I = __m512i;
    using F = __m512;
    TV_AVX512 static I zero_i() { return _mm512_setzero_si512(); }
    TV_AVX512 static F zero_f() { return _mm512_setzero_ps(); }
    TV_AVX512 static I load_i(const int32_t *p) { return _mm512_loadu_si512(p); }
    TV_AVX512 static F load_f(const float *p) { return _mm512_loadu_ps(p); }
    TV_AVX512 static I dot(I acc, int32_t w, I x) { return _mm512_dpwssd_epi32(acc, _mm512_set1_epi32(w), x); }
    TV_AVX512 static F scale(F acc, I id, float d, F dx) { return _mm512_fmadd_ps(_mm512_cvtepi32_ps(id), _mm512_mul_ps(_mm512_set1_ps(d), dx), acc); }
    TV_AVX512 static F fma1(float a, F b, F acc) { return _mm512_fmadd_ps(_mm512_set1_ps(a), b, acc); }
    TV_AVX512 static void store(F v, float *t) { _mm512_storeu_ps(t, v); }
};

// x86_gemm.h's ISA traits: VNNI dots, f16 scales of 8 rows in one gather, zmm tiles.
struct Avx512 {
    static constexpr int TW_MAX = 16;
    using Wide = Zmm;
    template <class F>
    TV_AVX512 static W16 unpack(const uint8_t *blk, int s) { return unpack512<F>(blk, s); }
    // decode (x86_gemm.h's pair_bytes): top added to the bytes whose bit is set in ba (low half), bc (high)
    template <class F>
    TV_AVX512 static void high_bits(__m256i &z1, __m256i &z2, uint32_t ba, uint32_t bc) {
        const __m256i top = _mm256_set1_epi8((char)(1 << F::LOW_BITS));
        z1 = _mm256_mask_add_epi8(z1, (ba & 0xFFFFu) | (bc << 16), z1, top);
        z2 = _mm256_mask_add_epi8(z2, (ba >> 16) | (bc & 0xFFFF0000u), z2, top);
    }
    template <class F>
    static constexpr bool zmm_decode() { return F::LOW == LOW_I8; }
    template <class F, int NR>
    TV_AVX512 static void slice_dots_zmm(const uint8_t *blk, const int32_t *off, int s, const Prep &x, int64_t nb,
                                         int64_t b, __m256i d[NR]) {
        static_assert(F::LOW == LOW_I8 && F::HIGH == HIGH_NONE && !F::HAS_TABLE && !F::TWO_SCALES, "plain int8");
        __m512i xe[NR], xo[NR];  // lanes: 0..15 for row q, 16..31 for row q + 4
        for (int i = 0; i < NR; i++) {
            const int16_t *xq = x.qe[(size_t)(i * nb + b)].v;
            xe[i] = _mm512_broadcast_i64x4(_mm256_load_si256(reinterpret_cast<const __m256i *>(xq)));
            xo[i] = _mm512_broadcast_i64x4(_mm256_load_si256(reinterpret_cast<const __m256i *>(xq + 16)));
        }
        const int at = F::src(s).lo;
        const __m512i one = _mm512_set1_epi16(1);
        __m512i p[NR][4];  // pair q: rows q and q + 4 (|sum| < 2^31 by far)
        for (int q = 0; q < 4; q++) {
            const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk + off[q] + at));
            const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk + off[q + 4] + at));
            const __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(a), c, 1);
            const __m512i e = _mm512_maddubs_epi16(one, z), o = _mm512_srai_epi16(z, 8);  // even, odd bytes
            for (int i = 0; i < NR; i++) p[i][q] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(_mm512_setzero_si512(), e, xe[i]), o, xo[i]);
        }
        for (int i = 0; i < NR; i++) d[i] = reduce_pairs512(p[i]);
    }
    TV_AVX512 static __m256i dot_pairs(__m256i acc, __m256i w, __m256i x) { return _mm256_dpwssd_epi32(acc, w, x); }
    // as Avx2's, the high halves narrowed by vpmovdw
    template <int AT, int>
    TV_AVX512 static __m256 halves(const uint8_t *w0, const int32_t *off, __m256i, __m256 *second) {
        if (!second) return _mm256_cvtph_ps(rows_f16x8(w0 + AT, off));
        const __m256i v = rows_u32x8(w0 + AT, off);
        *second = _mm256_cvtph_ps(_mm256_cvtepi32_epi16(_mm256_srli_epi32(v, 16)));
        return _mm256_cvtph_ps(_mm256_cvtepi32_epi16(v));
    }
};
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

// ---- attention block (hd == 64, bs <= 16; anything else goes to the generic loops) -------------
// Keys come transposed from the cache (row d = element d of the block's 16 keys) so scores run with lanes over keys: per
// query row, score[s] = sum over even d + sum over odd d, each chain sequential in d, whatever
// the other rows are. Up to 4 rows share each key/value load. Vector exp (Cephes polynomial).
TV_AVX512 inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), r);
    __m512 p = _mm512_set1_ps(EXP_POLY[0]);
    for (int i = 1; i < 6; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_POLY[i]));
    const __m512 r2 = _mm512_mul_ps(r, r);
    const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(y, n);
}

// exp512 over a row of scores (the generic attention path: head sizes other than 64).
TV_AVX512 void exp_in_place(float *x, int n) {
    for (int i = 0; i < n; i += 16) {
        const __mmask16 k = tail_mask(n - i);
        _mm512_mask_storeu_ps(x + i, k, exp512(_mm512_maskz_loadu_ps(k, x + i)));
    }
}

TV_AVX512 void conv_row(const uint8_t *src, bool f16, float *dst, int hd) {
    for (int i = 0; i < hd; i += 16) {
        const __mmask16 k = tail_mask(hd - i);
        _mm512_mask_storeu_ps(dst + i, k, f16 ? load_h16(k, reinterpret_cast<const uint16_t *>(src) + i)
                                              : _mm512_maskz_loadu_ps(k, reinterpret_cast<const float *>(src) + i));
    }
}

// NR (1-4) query rows against one block: keys from kt (fp32, transposed, 16 per row d), or straight
// from the cache's fp16 rows (kh: a decode's single row group converts each key row once anyway,
// without the store and reload). Each row's arithmetic is the same whatever NR and the key source.
template <int NR>
TV_AVX512 inline void attn_rows(const float *q, const int *n_valid, const float *kt, const uint16_t *kh, int bs,
                                __mmask16 gm, int nmax, const uint8_t *v, size_t ld, bool f16, float scale, float *m,
                                float *l, float *acc) {
    alignas(64) float pa[NR][16];
    __m512 se[NR], so[NR];
    for (int j = 0; j < NR; j++) se[j] = so[j] = _mm512_setzero_ps();
    for (int d = 0; d < 64; d += 2) {
        __m512 k0, k1;
        if (kh) {
            k0 = load_h16(gm, kh + d * bs), k1 = load_h16(gm, kh + (d + 1) * bs);
        } else {
            k0 = _mm512_load_ps(kt + 16 * d), k1 = _mm512_load_ps(kt + 16 * (d + 1));
        }
        for (int j = 0; j < NR; j++) {
            se[j] = _mm512_fmadd_ps(_mm512_set1_ps(q[j * 64 + d]), k0, se[j]);
            so[j] = _mm512_fmadd_ps(_mm512_set1_ps(q[j * 64 + d + 1]), k1, so[j]);
        }
    }
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int j = 0; j < NR; j++) {
        const int n = n_valid[j];
        if (n <= 0) {
            _mm512_store_ps(pa[j], _mm512_setzero_ps());
            continue;
        }
        const __mmask16 mk = tail_mask(n);
        const __m512 sc = _mm512_mul_ps(_mm512_add_ps(se[j], so[j]), vscale);
        const float bmax = _mm512_mask_reduce_max_ps(mk, sc);
        float mr = m[j], lr = l[j];
        if (bmax > mr) {  // new running max: rescale what was accumulated so far
            const float rr = std::exp(mr - bmax);
            lr *= rr;
            const __m512 vr = _mm512_set1_ps(rr);
            for (int i = 0; i < 64; i += 16) _mm512_storeu_ps(acc + j * 64 + i, _mm512_mul_ps(_mm512_loadu_ps(acc + j * 64 + i), vr));
            mr = bmax;
        }
        const __m512 p = _mm512_maskz_mov_ps(mk, exp512(_mm512_sub_ps(sc, _mm512_set1_ps(mr))));
        lr += _mm512_reduce_add_ps(p);
        m[j] = mr;
        l[j] = lr;
        _mm512_store_ps(pa[j], p);
    }
    __m512 a[NR][4];
    for (int j = 0; j < NR; j++)
        for (int i = 0; i < 4; i++) a[j][i] = _mm512_loadu_ps(acc + j * 64 + 16 * i);
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
        for (int j = 0; j < NR; j++) {
            const __m512 p = _mm512_set1_ps(pa[j][s]);
            a[j][0] = _mm512_fmadd_ps(p, v0, a[j][0]);
            a[j][1] = _mm512_fmadd_ps(p, v1, a[j][1]);
            a[j][2] = _mm512_fmadd_ps(p, v2, a[j][2]);
            a[j][3] = _mm512_fmadd_ps(p, v3, a[j][3]);
        }
    }
    for (int j = 0; j < NR; j++)
        for (int i = 0; i < 4; i++) _mm512_storeu_ps(acc + j * 64 + 16 * i, a[j][i]);
}

TV_AVX512 void attn_block(const float *q, int R, int hd, const int *n_valid, const uint8_t *k, const uint8_t *v,
                          size_t ld, bool f16, int bs, float scale, float *m, float *l, float *acc, float *work) {
    if (hd != 64 || bs > 16 || ld > (1u << 24))
        return attn_block_rows(conv_row, exp_in_place, q, R, hd, n_valid, k, v, ld, f16, bs, scale, m, l, acc, work);
    int nmax = 0;
    for (int r = 0; r < R; r++) nmax = std::max(nmax, n_valid[r]);
    if (nmax <= 0) return;
    alignas(64) float kt[64 * 16];
    const __mmask16 gm = tail_mask(nmax);  // keys past every query load as 0
    // one row group (decode: a GQA group of <= 4 heads) reads fp16 keys directly; more convert once
    const uint16_t *kh = f16 && R <= 4 ? reinterpret_cast<const uint16_t *>(k) : nullptr;
    if (!kh)
        for (int d = 0; d < 64; d++)
            _mm512_store_ps(kt + 16 * d, f16 ? load_h16(gm, reinterpret_cast<const uint16_t *>(k) + d * bs)
                                             : _mm512_maskz_loadu_ps(gm, reinterpret_cast<const float *>(k) + d * bs));
    for (int r0 = 0; r0 < R; r0 += 4) {
        const float *qr = q + (size_t)r0 * 64;
        float *ar = acc + (size_t)r0 * 64;
        switch (std::min(4, R - r0)) {
            case 1: attn_rows<1>(qr, n_valid + r0, kt, kh, bs, gm, nmax, v, ld, f16, scale, m + r0, l + r0, ar); break;
            case 2: attn_rows<2>(qr, n_valid + r0, kt, kh, bs, gm, nmax, v, ld, f16, scale, m + r0, l + r0, ar); break;
            case 3: attn_rows<3>(qr, n_valid + r0, kt, kh, bs, gm, nmax, v, ld, f16, scale, m + r0, l + r0, ar); break;
            default: attn_rows<4>(qr, n_valid + r0, kt, kh, bs, gm, nmax, v, ld, f16, scale, m + r0, l + r0, ar); break;
        }
    }
    (void)work;
}

// ---- per-token ops --------------------------------------------------------------------------

// quantize_row_act (quant.cpp) 16 lanes at a time, the same operations in the same order, so
// the same bits: amax over non-NaN values (max(a, acc) keeps acc when a is NaN, like the scalar
// `a > amax`), the scalar d and 1/d, then per value the product, the 1.5 * 2^23 rounding and
// the clamp of anything not within +-ACT_MAX (inf/NaN products) to +-ACT_MAX or 0.
TV_AVX512 void quantize_act(const float *x, ActBlock *out, int64_t cols) {
    const __m512 qmax = _mm512_set1_ps((float)ACT_MAX), magic = _mm512_set1_ps(12582912.0f), zero = _mm512_setzero_ps();
    for (int64_t b = 0; b < cols / QK; b++, x += QK) {
        const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
        const __m512 m = _mm512_max_ps(_mm512_abs_ps(x1), _mm512_max_ps(_mm512_abs_ps(x0), zero));
        const float amax = _mm512_reduce_max_ps(m), d = amax / (float)ACT_MAX, id = d > 0.0f ? 1.0f / d : 0.0f;
        const __m512 vid = _mm512_set1_ps(id);
        __m512i q[2];
        for (int h = 0; h < 2; h++) {
            const __m512 v = _mm512_mul_ps(h ? x1 : x0, vid);
            __m512 r = _mm512_sub_ps(_mm512_add_ps(v, magic), magic);
            const __mmask16 in = _mm512_cmp_ps_mask(_mm512_abs_ps(v), qmax, _CMP_LE_OQ);
            const __m512 sat = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ),
                                                    _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ), qmax),
                                                    _mm512_sub_ps(zero, qmax));
            r = _mm512_mask_blend_ps(in, sat, r);
            q[h] = _mm512_cvttps_epi32(r);
            _mm256_storeu_si256(reinterpret_cast<__m256i *>(out[b].qs + 16 * h), _mm512_cvtepi32_epi16(q[h]));
        }
        out[b].d = d;
        out[b].s = d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q[0], q[1]));
    }
}

// g = g / (1 + exp(-g)) * u with exp512 (a few ulp from libm's expf).
TV_AVX512 void silu_mul(float *g, const float *u, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = tail_mask(n - i);
        const __m512 x = _mm512_maskz_loadu_ps(k, g + i);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), x));
        _mm512_mask_storeu_ps(g + i, k, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), _mm512_maskz_loadu_ps(k, u + i)));
    }
}

// gelu(x) * u = x * u / (1 + exp(-2y)), y = sqrt(2/pi) (x + 0.044715 x^3): 0.5 (1 + tanh(y)) is
// the logistic function of 2y, so one exp512 serves (a few ulp from libm's tanh form).
TV_AVX512 void gelu_mul(float *g, const float *u, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f), c = _mm512_set1_ps(-2.0f * 0.7978845608028654f),
                 c3 = _mm512_set1_ps(0.044715f);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = tail_mask(n - i);
        const __m512 x = _mm512_maskz_loadu_ps(k, g + i);
        const __m512 e = exp512(_mm512_mul_ps(c, _mm512_fmadd_ps(_mm512_mul_ps(c3, x), _mm512_mul_ps(x, x), x)));
        _mm512_mask_storeu_ps(g + i, k, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), _mm512_maskz_loadu_ps(k, u + i)));
    }
}

Kernels make_table() {
    Kernels k = make_kernels("avx512vnni", dot_f32, dot_f16, attn_block, quantize_act, silu_mul, gelu_mul);
    k.gemm = &x86_gemm<Avx512>;  // every format but per-half mins; those keep the scalar rows
    return k;
}
const Kernels table = make_table();

}  // namespace

const Kernels *kernels_avx512_table() { return &table; }

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
bool cpu_has_avx512vnni() { return false; }
}  // namespace tv

#endif
