// What the AVX2 and AVX-512 paths share: the formats.h shapes as x86 vectors (a slice of 32
// weights as two int16 vectors, values 0..15 and 16..31, the order of ActBlock.qs), their block
// scales, and horizontal sums.
// AVX2 target attributes: GCC inlines these into AVX-512 functions too (a subset of their ISA).
#pragma once

#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include <cstring>

#include "formats.h"

#define TV_X86 __attribute__((target("avx2,fma,f16c")))

namespace tv {

struct W16 {
    __m256i lo, hi;
};

TV_X86 inline float hsum_f32(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

TV_X86 inline int hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

// The 8 rows' f16 scales (at p + off[r]) for decode, by scalar loads joined 4 to a 64-bit register
// with integer shifts and ors: 2 moves and 1 unpack reach the vector ports, which decode keeps busy
// (8 inserts cost 2 uops each on Intel, one on the shuffle port; AVX2 gathers are slow and have no
// narrowing). rows_f16x8: the 8 halves; rows_u32x8: 8 dwords (a scale and a min each), 2 per register.
TV_X86 inline __m128i rows_f16x8(const uint8_t *p, const int32_t *off) {
    auto four = [&](int r) {
        return (long long)((uint64_t)load_u16(p + off[r]) | (uint64_t)load_u16(p + off[r + 1]) << 16 |
                           (uint64_t)load_u16(p + off[r + 2]) << 32 | (uint64_t)load_u16(p + off[r + 3]) << 48);
    };
    return _mm_unpacklo_epi64(_mm_cvtsi64_si128(four(0)), _mm_cvtsi64_si128(four(4)));
}

TV_X86 inline __m256i rows_u32x8(const uint8_t *p, const int32_t *off) {
    auto two = [&](int r) {
        uint32_t a, b;
        std::memcpy(&a, p + off[r], 4);
        std::memcpy(&b, p + off[r + 1], 4);
        return _mm_cvtsi64_si128((long long)(a | (uint64_t)b << 32));
    };
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_unpacklo_epi64(two(0), two(2))),
                                   _mm_unpacklo_epi64(two(4), two(6)), 1);
}

// Slice s of block `blk`: each step below is one shape of formats.h, on two 16-byte halves.
template <class F>
TV_X86 inline W16 unpack(const uint8_t *blk, int s) {
    const SliceSrc src = F::src(s);
    const uint8_t *lo = blk + src.lo, *hi = blk + src.hi;
    auto load = [](const uint8_t *p) { return _mm_loadu_si128(reinterpret_cast<const __m128i *>(p)); };
    __m128i a, b;  // values 0..15 and 16..31, one byte each
    if constexpr (F::LOW == LOW_NIB16) {
        const __m128i q = load(lo), m = _mm_set1_epi8(0x0F);
        a = _mm_and_si128(q, m);
        b = _mm_and_si128(_mm_srli_epi16(q, 4), m);
    } else if constexpr (F::LOW == LOW_NIB32 || F::LOW == LOW_BIT2) {
        const __m128i m = _mm_set1_epi8(F::LOW == LOW_NIB32 ? 0x0F : 0x03);
        a = _mm_and_si128(_mm_srli_epi16(load(lo), src.lo_shift), m);  // 16-bit shifts: the mask drops
        b = _mm_and_si128(_mm_srli_epi16(load(lo + 16), src.lo_shift), m);  // bits of the neighbour byte
    } else {
        a = load(lo);
        b = load(lo + 16);
    }
    if constexpr (F::HIGH == HIGH_MASK32) {
        // bit j of the mask -> byte j: broadcast the mask bytes 8 times each, test one bit per lane
        uint32_t bits;
        __builtin_memcpy(&bits, hi, 4);
        const __m128i v = _mm_set1_epi32((int)bits), sel = _mm_set1_epi64x((long long)0x8040201008040201ULL);
        const __m128i top = _mm_set1_epi8((char)(1 << F::LOW_BITS));
        const __m128i ia = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        const __m128i ib = _mm_setr_epi8(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
        a = _mm_or_si128(a, _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(_mm_shuffle_epi8(v, ia), sel), sel), top));
        b = _mm_or_si128(b, _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(_mm_shuffle_epi8(v, ib), sel), sel), top));
    } else if constexpr (F::HIGH == HIGH_BYTES) {
        const __m128i m = _mm_set1_epi8(F::HIGH_MASK);
        a = _mm_or_si128(a, _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(load(hi), src.hi_shift), m), F::LOW_BITS));
        b = _mm_or_si128(b, _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(load(hi + 16), src.hi_shift), m), F::LOW_BITS));
    }
    if constexpr (F::HAS_TABLE) {
        const __m128i t = load(reinterpret_cast<const uint8_t *>(F::TABLE));
        a = _mm_shuffle_epi8(t, a);
        b = _mm_shuffle_epi8(t, b);
    } else if constexpr (F::OFFSET != 0) {
        const __m128i o = _mm_set1_epi8(F::OFFSET);
        a = _mm_sub_epi8(a, o);
        b = _mm_sub_epi8(b, o);
    }
    return {_mm256_cvtepi8_epi16(a), _mm256_cvtepi8_epi16(b)};  // every q fits int8
}

// 8 int8 as 8 float lanes.
TV_X86 inline __m256 int8_lanes(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }

// One row's block scales (formats.h), with hardware f16 conversion; K formats convert their
// integer scales with vector ops. Same products as F::scales, so the same bits.
template <class F>
TV_X86 inline void block_scales(const uint8_t *b, BlockScales<F::SLICES> &s) {
    if constexpr (F::D_AT >= 0) {
        s.d[0][0] = s.d[0][1] = _cvtsh_ss(load_u16(b + F::D_AT));
        if constexpr (F::HAS_MIN) s.m[0][0] = s.m[0][1] = _cvtsh_ss(load_u16(b + F::M_AT));
    } else {
        alignas(32) int8_t v[32] = {};
        alignas(32) float f[32];
        F::scale_ints(b, v);
        const __m256 d = _mm256_set1_ps(_cvtsh_ss(load_u16(b + F::SD_AT)));
        const __m256 nd = _mm256_set1_ps(F::HAS_MIN ? -_cvtsh_ss(load_u16(b + F::SDMIN_AT)) : 0.0f);
        constexpr int n = nsc<F>() + (F::HAS_MIN ? (F::TWO_MINS ? 16 : 8) : 0);
        for (int i = 0; i < n; i += 8)
            _mm256_store_ps(f + i, _mm256_mul_ps(i < nsc<F>() ? d : nd,
                                                 int8_lanes(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(v + i)))));
        for (int j = 0; j < 8; j++)
            for (int h = 0; h < 2; h++) {
                s.d[j][h] = f[sc_index<F>(j, h)];
                if constexpr (F::HAS_MIN) s.m[j][h] = f[mn_index<F>(j, h)];
            }
    }
}

// 8 rows x 16 bytes -> the 16 columns: column c (one byte per row) is the low (c even) or high
// (c odd) 8 bytes of out[c / 2].
TV_X86 inline void transpose8x16(const __m128i r[8], __m128i out[8]) {
    __m128i t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm_unpacklo_epi8(r[2 * i], r[2 * i + 1]);      // columns 0..7 of rows 2i, 2i+1
        t[2 * i + 1] = _mm_unpackhi_epi8(r[2 * i], r[2 * i + 1]);  // columns 8..15
    }
    for (int h = 0; h < 2; h++)      // rows 0..3, 4..7
        for (int c = 0; c < 2; c++) {  // columns 0..7, 8..15
            u[4 * h + 2 * c] = _mm_unpacklo_epi16(t[4 * h + c], t[4 * h + 2 + c]);      // 4 columns x 4 rows
            u[4 * h + 2 * c + 1] = _mm_unpackhi_epi16(t[4 * h + c], t[4 * h + 2 + c]);
        }
    for (int q = 0; q < 4; q++) {  // u[q] and u[4 + q]: the same 4 columns of rows 0..3 and 4..7
        out[2 * q] = _mm_unpacklo_epi32(u[q], u[4 + q]);
        out[2 * q + 1] = _mm_unpackhi_epi32(u[q], u[4 + q]);
    }
}

}  // namespace tv

#endif
