// The formats.h shapes as x86 vectors, shared by the AVX2 and AVX-512 paths: a slice of 32
// weights as two int16 vectors (values 0..15 and 16..31, the order of ActBlock.qs).
// AVX2 target attributes: GCC inlines these into AVX-512 functions too (a subset of their ISA).
#pragma once

#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include "formats.h"

#define TV_X86_UNPACK __attribute__((target("avx2,fma,f16c")))

namespace tv {

struct W16 {
    __m256i lo, hi;
};

// Slice s of block `blk`: each step below is one shape of formats.h, on two 16-byte halves.
template <class F>
TV_X86_UNPACK inline W16 unpack(const uint8_t *blk, int s) {
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

}  // namespace tv

#endif
