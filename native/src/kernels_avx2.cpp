// AVX2 + FMA + F16C kernels. Compiled with per-function target attributes (not -mavx2) so the
// library still loads and runs the scalar path on CPUs without AVX2.
//
// Integer block dot: a weight block is widened to 2 x 16 int16 lanes (values 0..15 and 16..31),
// multiplied with the int16 activations by _mm256_madd_epi16 (pairs -> 8 x int32, exact: |w| <= 128,
// |x| <= 32767), converted to float and scaled by d_w * d_x with one FMA per block.
#include "attn_block.h"
#include "kernels.h"
#include "ops.h"
#include "tinyvllm.h"

#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include <cmath>
#include <cstring>

#define TV_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace tv {
namespace {

TV_AVX2 inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

TV_AVX2 inline float half(const uint8_t *p) { return _cvtsh_ss(load_u16(p)); }

// A weight block as int16: lo = values 0..15, hi = values 16..31 (GGML's nibble order).
struct W16 {
    __m256i lo, hi;
};

TV_AVX2 inline W16 nibbles16(const uint8_t *qs) {
    const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(qs)));
    return {_mm256_and_si256(b, _mm256_set1_epi16(0x0F)), _mm256_srli_epi16(b, 4)};
}

// sum over the block of w * x, as 8 int32 lanes
TV_AVX2 inline __m256i dot16(const W16 &w, const ActBlock &x) {
    const __m256i xlo = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x.qs));
    const __m256i xhi = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x.qs + 16));
    return _mm256_add_epi32(_mm256_madd_epi16(w.lo, xlo), _mm256_madd_epi16(w.hi, xhi));
}

// Per-format block access: the 32 weights as int16, and Q4_1's min.
struct FmtQ4_0 {
    static constexpr size_t BYTES = 18;
    static constexpr bool HAS_MIN = false;
    TV_AVX2 static W16 weights(const uint8_t *w) {
        const W16 n = nibbles16(w + 2);
        const __m256i eight = _mm256_set1_epi16(8);
        return {_mm256_sub_epi16(n.lo, eight), _mm256_sub_epi16(n.hi, eight)};
    }
    TV_AVX2 static float min(const uint8_t *) { return 0.0f; }
};
struct FmtQ4_1 {
    static constexpr size_t BYTES = 20;
    static constexpr bool HAS_MIN = true;
    TV_AVX2 static W16 weights(const uint8_t *w) { return nibbles16(w + 4); }
    TV_AVX2 static float min(const uint8_t *w) { return half(w + 2); }
};
struct FmtQ8_0 {
    static constexpr size_t BYTES = 34;
    static constexpr bool HAS_MIN = false;
    TV_AVX2 static W16 weights(const uint8_t *w) {
        return {_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(w + 2))),
                _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(w + 18)))};
    }
    TV_AVX2 static float min(const uint8_t *) { return 0.0f; }
};

// One weight block against NX activation rows: unpack once, one FMA per row.
template <class Fmt, int NX>
TV_AVX2 inline void block_step(const uint8_t *w, const ActBlock *x, int64_t nb, __m256 *acc, float *macc) {
    const W16 wv = Fmt::weights(w);
    const float dw = half(w);
    for (int i = 0; i < NX; i++) {
        const ActBlock &xb = x[i * nb];
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot16(wv, xb)), _mm256_set1_ps(dw * xb.d), acc[i]);
        // explicit fma: contraction must not depend on NX (vectorized or not) for batch invariance
        if (Fmt::HAS_MIN) macc[i] = std::fma(Fmt::min(w), xb.s, macc[i]);
    }
}

// Two accumulator sets (even / odd blocks) hide the FMA latency; the same for every NX, so a
// row's result does not depend on how many rows ran with it.
template <class Fmt, int NX>
TV_AVX2 void rows_nx(const uint8_t *w, const ActBlock *x, int64_t nb, float *out, int64_t out_stride) {
    __m256 acc0[NX], acc1[NX];
    float macc[NX];
    for (int i = 0; i < NX; i++) acc0[i] = acc1[i] = _mm256_setzero_ps(), macc[i] = 0.0f;
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2, w += 2 * Fmt::BYTES) {
        block_step<Fmt, NX>(w, x + b, nb, acc0, macc);
        block_step<Fmt, NX>(w + Fmt::BYTES, x + b + 1, nb, acc1, macc);
    }
    if (b < nb) block_step<Fmt, NX>(w, x + b, nb, acc0, macc);
    for (int i = 0; i < NX; i++) out[i * out_stride] = hsum(_mm256_add_ps(acc0[i], acc1[i])) + macc[i];
}

template <class Fmt>
TV_AVX2 void rows(const uint8_t *w, const ActBlock *x, int64_t nb, int nx, float *out, int64_t out_stride) {
    switch (nx) {
        case 1: rows_nx<Fmt, 1>(w, x, nb, out, out_stride); break;
        case 2: rows_nx<Fmt, 2>(w, x, nb, out, out_stride); break;
        case 3: rows_nx<Fmt, 3>(w, x, nb, out, out_stride); break;
        default: rows_nx<Fmt, 4>(w, x, nb, out, out_stride); break;
    }
}

TV_AVX2 float dot_f32(const float *w, const float *x, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < n; i++) s += w[i] * x[i];
    return s;
}

TV_AVX2 inline __m256 load_h8(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
}

TV_AVX2 float dot_f16(const uint16_t *w, const float *x, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(load_h8(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(load_h8(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    }
    for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(load_h8(w + i), _mm256_loadu_ps(x + i), a0);
    float s = hsum(_mm256_add_ps(a0, a1));
    for (; i < n; i++) s += _cvtsh_ss(w[i]) * x[i];
    return s;
}



TV_AVX2 void conv_row(const uint8_t *src, bool f16, float *dst, int hd) {  // hd: any count
    int i = 0;
    if (f16) {
        for (; i + 8 <= hd; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(src + 2 * i))));
        for (; i < hd; i++) dst[i] = _cvtsh_ss((unsigned short)(src[2 * i] | src[2 * i + 1] << 8));
    } else {
        std::memcpy(dst, src, sizeof(float) * hd);
    }
}
TV_DEFINE_ATTN_BLOCK(TV_AVX2, attn_block, conv_row)

// quantize_row_act 8 lanes at a time, bit for bit (the reasoning is at kernels_avx512.cpp's copy).
TV_AVX2 void quantize_act(const float *x, ActBlock *out, int64_t cols) {
    const __m256 qmax = _mm256_set1_ps((float)ACT_MAX), magic = _mm256_set1_ps(12582912.0f), zero = _mm256_setzero_ps();
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (int64_t b = 0; b < cols / QK; b++, x += QK) {
        __m256 xv[4], m = zero;
        for (int h = 0; h < 4; h++) xv[h] = _mm256_loadu_ps(x + 8 * h), m = _mm256_max_ps(_mm256_and_ps(xv[h], abs_mask), m);
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        const float d = amax / (float)ACT_MAX, id = d > 0.0f ? 1.0f / d : 0.0f;
        __m256i sum = _mm256_setzero_si256();
        for (int h = 0; h < 4; h++) {
            const __m256 v = _mm256_mul_ps(xv[h], _mm256_set1_ps(id));
            const __m256 r = _mm256_sub_ps(_mm256_add_ps(v, magic), magic);
            const __m256 sat = _mm256_blendv_ps(_mm256_and_ps(_mm256_cmp_ps(v, zero, _CMP_GT_OQ), qmax),
                                                _mm256_sub_ps(zero, qmax), _mm256_cmp_ps(v, zero, _CMP_LT_OQ));
            const __m256i q = _mm256_cvttps_epi32(_mm256_blendv_ps(sat, r, _mm256_cmp_ps(_mm256_and_ps(v, abs_mask), qmax, _CMP_LE_OQ)));
            sum = _mm256_add_epi32(sum, q);
            _mm_storeu_si128(reinterpret_cast<__m128i *>(out[b].qs + 8 * h),
                             _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)));
        }
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        out[b].d = d;
        out[b].s = d * (float)_mm_cvtsi128_si32(s4);
    }
}

// e^x, x clamped to [-87, 88] (EXP_POLY as in kernels_avx512.cpp's exp512; 2^n built
// in the exponent bits, which the clamp keeps in range).
TV_AVX2 inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_LO), r);
    __m256 p = _mm256_set1_ps(EXP_POLY[0]);
    for (int i = 1; i < 6; i++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_POLY[i]));
    const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

TV_AVX2 void silu_mul(float *g, const float *u, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), x));
        _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
    swiglu(g + i, u + i, n - i);
}

Kernels make_table() {
    Kernels k = kernels_with_scalar_rows("avx2");
    k.rows[TV_Q4_0] = rows<FmtQ4_0>;
    k.rows[TV_Q4_1] = rows<FmtQ4_1>;
    k.rows[TV_Q8_0] = rows<FmtQ8_0>;
    k.dot_f32 = dot_f32;
    k.dot_f16 = dot_f16;
    k.attn_block = attn_block;
    k.quantize_act = quantize_act;
    k.silu_mul = silu_mul;
    return k;
}
const Kernels table = make_table();

}  // namespace

const Kernels *kernels_avx2_table() { return &table; }

bool cpu_has_avx2() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

}  // namespace tv

#else  // not x86

namespace tv {
const Kernels *kernels_avx2_table() { return nullptr; }
bool cpu_has_avx2() { return false; }
}  // namespace tv

#endif
