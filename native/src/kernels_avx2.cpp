// AVX2 + FMA + F16C kernels. Compiled with per-function target attributes (not -mavx2) so the
// library still loads and runs the scalar path on CPUs without AVX2.
//
// Integer block dot: 32 int8 x 32 int8 -> _mm256_maddubs_epi16 (u8 x s8 pairs -> s16) ->
// _mm256_madd_epi16 with ones (-> 8 x s32, exact), converted to float and scaled by d_w * d_x
// with one FMA per block. maddubs needs one unsigned operand: 4-bit Q4_1 nibbles are already
// unsigned; signed weights (Q8_0, Q4_0 - 8) use the sign trick |w| * (x * sign(w)).
#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

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

// sum of w[i] * x[i] over 32 signed bytes, as 8 int32 lanes.
TV_AVX2 inline __m256i dot_i8(__m256i w, __m256i x) {
    const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

// 16 bytes of nibbles -> 32 bytes: low nibbles in lanes 0..15, high nibbles in 16..31 (GGML order).
TV_AVX2 inline __m256i unpack_nibbles(const uint8_t *qs) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i *>(qs));
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

TV_AVX2 inline __m256i load_x(const BlockQ8x &x) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x.qs));
}

TV_AVX2 float dot_q4_0(const uint8_t *w, const BlockQ8x *x, int64_t nb) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    const __m256i eight = _mm256_set1_epi8(8);
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2, w += 2 * Q4_0_BYTES) {
        const __m256i q0 = _mm256_sub_epi8(unpack_nibbles(w + 2), eight);
        const __m256i q1 = _mm256_sub_epi8(unpack_nibbles(w + Q4_0_BYTES + 2), eight);
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_i8(q0, load_x(x[b]))), _mm256_set1_ps(half(w) * x[b].d), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_i8(q1, load_x(x[b + 1]))),
                               _mm256_set1_ps(half(w + Q4_0_BYTES) * x[b + 1].d), acc1);
    }
    for (; b < nb; b++, w += Q4_0_BYTES) {
        const __m256i q = _mm256_sub_epi8(unpack_nibbles(w + 2), eight);
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_i8(q, load_x(x[b]))), _mm256_set1_ps(half(w) * x[b].d), acc0);
    }
    return hsum(_mm256_add_ps(acc0, acc1));
}

TV_AVX2 float dot_q4_1(const uint8_t *w, const BlockQ8x *x, int64_t nb) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    float macc = 0.0f;
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2, w += 2 * Q4_1_BYTES) {
        const uint8_t *w1 = w + Q4_1_BYTES;
        const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(unpack_nibbles(w + 4), load_x(x[b])), ones);
        const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(unpack_nibbles(w1 + 4), load_x(x[b + 1])), ones);
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(half(w) * x[b].d), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(half(w1) * x[b + 1].d), acc1);
        macc += half(w + 2) * x[b].s + half(w1 + 2) * x[b + 1].s;
    }
    for (; b < nb; b++, w += Q4_1_BYTES) {
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(unpack_nibbles(w + 4), load_x(x[b])), ones);
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(half(w) * x[b].d), acc0);
        macc += half(w + 2) * x[b].s;
    }
    return hsum(_mm256_add_ps(acc0, acc1)) + macc;
}

TV_AVX2 float dot_q8_0(const uint8_t *w, const BlockQ8x *x, int64_t nb) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2, w += 2 * Q8_0_BYTES) {
        const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(w + 2));
        const __m256i q1 = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(w + Q8_0_BYTES + 2));
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_i8(q0, load_x(x[b]))), _mm256_set1_ps(half(w) * x[b].d), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_i8(q1, load_x(x[b + 1]))),
                               _mm256_set1_ps(half(w + Q8_0_BYTES) * x[b + 1].d), acc1);
    }
    for (; b < nb; b++, w += Q8_0_BYTES) {
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(w + 2));
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_i8(q, load_x(x[b]))), _mm256_set1_ps(half(w) * x[b].d), acc0);
    }
    return hsum(_mm256_add_ps(acc0, acc1));
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

TV_AVX2 void axpy_f32(float a, const float *v, float *y, int64_t n) {
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(v + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * v[i];
}

TV_AVX2 void axpy_f16(float a, const uint16_t *v, float *y, int64_t n) {
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, load_h8(v + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * _cvtsh_ss(v[i]);
}

const Kernels table = {"avx2", dot_q4_0, dot_q4_1, dot_q8_0, dot_f32, dot_f16, axpy_f32, axpy_f16};

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
