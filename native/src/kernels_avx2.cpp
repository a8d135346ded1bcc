// AVX2 + FMA + F16C kernels. Compiled with per-function target attributes (not -mavx2) so the
// library still loads and runs the scalar path on CPUs without AVX2.
//
// Integer slice dot: a weight slice (formats.h, unpacked by unpack2 below) is 2 x 16 int16 lanes
// (values 0..15 and 16..31), multiplied with the int16 activations by _mm256_madd_epi16 (pairs ->
// 8 x int32, exact: |w| <= 128, |x| <= 32767), converted to float and scaled by d_w * d_x with one
// FMA per slice (per half when the halves have their own scales).
#include "attn_block.h"
#include "kernels.h"
#include "ops.h"
#include "tinyvllm.h"
#include "x86_common.h"

#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#define TV_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TV_ISA TV_AVX2
#include "x86_gemm.h"

namespace tv {
namespace {

// unpack<F> (x86_common.h) with a shorter form for 16-byte nibbles without a code book (Q4_0,
// Q4_1, Q5_0, Q5_1): widen the bytes to int16 once, then the low nibble is a mask and the high one
// a shift. A 32-bit high-bit mask (Q5_0, Q5_1) then selects int16 lanes as on the AVX-512 path
// (q = low + top * h - OFFSET is linear): bit j of the mask tested in lane j, and top added where
// h = 1 (Q5_1) or subtracted where h = 0 (Q5_0: OFFSET == top), instead of a byte expansion.
template <class F>
TV_AVX2 inline W16 unpack2(const uint8_t *blk, int s) {
    if constexpr (F::LOW == LOW_NIB16 && (F::HIGH == HIGH_NONE || F::HIGH == HIGH_MASK32) && !F::HAS_TABLE) {
        const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(blk + F::src(s).lo)));
        __m256i lo = _mm256_and_si256(v, _mm256_set1_epi16(15)), hi = _mm256_srli_epi16(v, 4);
        if constexpr (F::HIGH == HIGH_MASK32) {
            constexpr int top = 1 << F::LOW_BITS;
            static_assert(F::OFFSET == 0 || F::OFFSET == top, "a shape this function knows");
            uint32_t bits;
            std::memcpy(&bits, blk + F::src(s).hi, 4);
            const __m256i sel = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
                                                  (short)0x8000);
            const __m256i t = _mm256_set1_epi16(top);
            auto lanes = [&](uint32_t b16) TV_AVX2 {  // 0xFFFF where bit j of b16 is set
                return _mm256_cmpeq_epi16(_mm256_and_si256(_mm256_set1_epi16((short)b16), sel), sel);
            };
            const __m256i hl = lanes(bits & 0xFFFF), hh = lanes(bits >> 16);
            if constexpr (F::OFFSET == 0) {
                lo = _mm256_add_epi16(lo, _mm256_and_si256(hl, t));
                hi = _mm256_add_epi16(hi, _mm256_and_si256(hh, t));
            } else {
                lo = _mm256_sub_epi16(lo, _mm256_andnot_si256(hl, t));
                hi = _mm256_sub_epi16(hi, _mm256_andnot_si256(hh, t));
            }
        } else if constexpr (F::OFFSET != 0) {
            lo = _mm256_sub_epi16(lo, _mm256_set1_epi16(F::OFFSET));
            hi = _mm256_sub_epi16(hi, _mm256_set1_epi16(F::OFFSET));
        }
        return {lo, hi};
    } else if constexpr ((F::LOW == LOW_NIB32 || F::LOW == LOW_BIT2) && (F::HIGH == HIGH_NONE || F::HIGH == HIGH_BYTES) &&
                         !F::HAS_TABLE) {
        // 32 contiguous bytes of bit fields (the K formats): each step on one ymm of bytes, then
        // widened (plain int8, Q8_0, is widened straight from memory by x86_common.h's unpack)
        const SliceSrc src = F::src(s);
        auto load = [&](int at) TV_AVX2 { return _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk + at)); };
        // 16-bit shifts: the mask drops bits of the neighbour byte
        __m256i q = _mm256_and_si256(_mm256_srli_epi16(load(src.lo), src.lo_shift), _mm256_set1_epi8(F::LOW == LOW_NIB32 ? 0x0F : 0x03));
        if constexpr (F::HIGH == HIGH_BYTES) {
            const __m256i h = _mm256_and_si256(_mm256_srli_epi16(load(src.hi), src.hi_shift), _mm256_set1_epi8(F::HIGH_MASK));
            q = _mm256_or_si256(q, _mm256_slli_epi16(h, F::LOW_BITS));
        }
        if constexpr (F::OFFSET != 0) q = _mm256_sub_epi8(q, _mm256_set1_epi8(F::OFFSET));
        return {_mm256_cvtepi8_epi16(_mm256_castsi256_si128(q)), _mm256_cvtepi8_epi16(_mm256_extracti128_si256(q, 1))};
    } else {  // any other shape: x86_common.h's
        return unpack<F>(blk, s);
    }
}

// x86_gemm.h's ISA traits: vpmaddwd + vpaddd dots (AVX2 has no vpdpwssd: two ops a pair), f16
// scales by scalar loads, ymm tiles only.
struct Avx2 {
    static constexpr int TW_MAX = 8;
    using Wide = Ymm<Avx2>;
    template <class F>
    TV_AVX2 static W16 unpack(const uint8_t *blk, int s) { return unpack2<F>(blk, s); }
    // decode (x86_gemm.h's pair_bytes): top added to the bytes whose bit is set in ba (low half), bc (high)
    template <class F>
    TV_AVX2 static void high_bits(__m256i &z1, __m256i &z2, uint32_t ba, uint32_t bc) {
        // each mask byte broadcast 8 times, one bit tested per byte lane
        const __m256i v = _mm256_set1_epi64x((long long)(ba | (uint64_t)bc << 32));
        const __m256i sel = _mm256_set1_epi64x((long long)0x8040201008040201ULL), top = _mm256_set1_epi8((char)(1 << F::LOW_BITS));
        const __m256i i1 = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5);
        const __m256i i2 = _mm256_setr_epi8(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7);
        auto bit = [&](__m256i idx) TV_AVX2 {
            return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(v, idx), sel), sel), top);
        };
        z1 = _mm256_or_si256(z1, bit(i1));
        z2 = _mm256_or_si256(z2, bit(i2));
    }
    template <class F>
    static constexpr bool zmm_decode() { return false; }
    TV_AVX2 static __m256i dot_pairs(__m256i acc, __m256i w, __m256i x) {
        __m256i r = _mm256_add_epi32(acc, _mm256_madd_epi16(w, x));
        // keeps the accumulator a register chain: GCC otherwise re-associates the exact int sums
        // into all products first, spilled to the stack (2.5x slower, measured)
        asm("" : "+x"(r));
        return r;
    }
    // 8 scalar loads (AVX2 gathers are slow on many cores, and there is no vpmovdw to narrow a
    // dword gather), joined 4 (or 2) to a 64-bit register by integer shifts and ors, so that only
    // 2 (4) moves and 1 (3) unpacks reach the vector ports, which decode keeps busy (8 inserts did:
    // 2 uops each on Intel, one on the shuffle port); with `second`, 8 dword loads split into low
    // halves (returned) and high ones.
    template <int AT, int>
    TV_AVX2 static __m256 halves(const uint8_t *w0, const int32_t *off, __m256i, __m256 *second) {
        const uint8_t *p = w0 + AT;
        if (!second) {
            auto four = [&](int r) {
                return (long long)((uint64_t)load_u16(p + off[r]) | (uint64_t)load_u16(p + off[r + 1]) << 16 |
                                   (uint64_t)load_u16(p + off[r + 2]) << 32 | (uint64_t)load_u16(p + off[r + 3]) << 48);
            };
            return _mm256_cvtph_ps(_mm_unpacklo_epi64(_mm_cvtsi64_si128(four(0)), _mm_cvtsi64_si128(four(4))));
        }
        auto two = [&](int r) {
            uint32_t a, b;
            std::memcpy(&a, p + off[r], 4);
            std::memcpy(&b, p + off[r + 1], 4);
            return _mm_cvtsi64_si128((long long)(a | (uint64_t)b << 32));
        };
        const __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_unpacklo_epi64(two(0), two(2))),
                                                  _mm_unpacklo_epi64(two(4), two(6)), 1);
        const __m256i split = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
                                               0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
        const __m256i t = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, split), 0xD8);  // [d 0..7 | m 0..7]
        *second = _mm256_cvtph_ps(_mm256_extracti128_si256(t, 1));
        return _mm256_cvtph_ps(_mm256_castsi256_si128(t));
    }
};

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
    float s = hsum_f32(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
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
    float s = hsum_f32(_mm256_add_ps(a0, a1));
    for (; i < n; i++) s += _cvtsh_ss(w[i]) * x[i];
    return s;
}

TV_AVX2 void conv_row(const uint8_t *src, bool f16, float *dst, int hd) {  // hd: any count
    int i = 0;
    if (f16) {
        for (; i + 8 <= hd; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(src + 2 * i))));
        for (; i < hd; i++) dst[i] = _cvtsh_ss(load_u16(src + 2 * i));
    } else {
        std::memcpy(dst, src, sizeof(float) * hd);
    }
}

// quantize_row_act 8 lanes at a time, bit for bit (the reasoning is at kernels_avx512.cpp's copy,
// which takes ~25% less time with mask registers (measured): the two stay apart).
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
        out[b].d = d;
        out[b].s = d * (float)hsum_i32(sum);
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

// exp256 over a row of scores (attention), libm for the last n % 8: the same for a query however it
// is batched, since n is its own number of visible keys in the block.
TV_AVX2 void exp_in_place(float *x, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, exp256(_mm256_loadu_ps(x + i)));
    exp_in_place_libm(x + i, n - i);
}
TV_DEFINE_ATTN_BLOCK(TV_AVX2, attn_block, conv_row, exp_in_place)

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

// gelu(x) * u = x * u / (1 + exp(-2y)), y = sqrt(2/pi) (x + 0.044715 x^3): 0.5 (1 + tanh(y)) is
// the logistic function of 2y, so one exp256 serves (a few ulp from libm's tanh form).
TV_AVX2 void gelu_mul(float *g, const float *u, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f), c = _mm256_set1_ps(-2.0f * 0.7978845608028654f),
                 c3 = _mm256_set1_ps(0.044715f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 e = exp256(_mm256_mul_ps(c, _mm256_fmadd_ps(_mm256_mul_ps(c3, x), _mm256_mul_ps(x, x), x)));
        _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
    gelu_tanh_mul(g + i, u + i, n - i);
}

Kernels make_table() {
    Kernels k = make_kernels("avx2", dot_f32, dot_f16, attn_block, quantize_act, silu_mul, gelu_mul);
    k.gemm = &x86_gemm<Avx2>;  // every format but per-half mins (Q2_K keeps the scalar rows)
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
