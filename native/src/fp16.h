// IEEE 754 half <-> float, portable (no F16C needed). The AVX2 kernels use hardware conversion
// where it pays; these are the reference the tests compare against.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace tv {

inline float fp16_to_fp32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
    uint32_t bits;
    if (exp == 0) {
        // zero or subnormal: mant * 2^-24 is exact in float
        float f = (float)mant * 5.9604644775390625e-8f;
        std::memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (mant << 13);  // inf / nan (payload kept)
    } else {
        bits = sign | ((exp + 112) << 23) | (mant << 13);  // rebias 15 -> 127
    }
    float out;
    std::memcpy(&out, &bits, 4);
    return out;
}

// Round to nearest, ties to even (what hardware conversion does).
inline uint16_t fp32_to_fp16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7FFFFFFFu;
    if (ax >= 0x7F800000u) return sign | (ax > 0x7F800000u ? 0x7E00 : 0x7C00);  // nan, inf
    if (ax >= 0x477FF000u) return sign | 0x7C00;  // >= 65520 rounds to inf
    if (ax < 0x38800000u) {
        // below the smallest normal half (2^-14): count units of 2^-24; scaling by 2^24 is exact,
        // nearbyint rounds half to even, and 1024 correctly becomes the smallest normal.
        float a;
        std::memcpy(&a, &ax, 4);
        return sign | (uint16_t)std::nearbyint(a * 16777216.0f);
    }
    uint32_t h = (ax >> 13) - (112u << 10);  // rebias exponent, keep 10 mantissa bits
    const uint32_t rem = ax & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;  // a carry into the exponent is right
    return sign | (uint16_t)h;
}

}  // namespace tv
