// GGML weight block formats, defined once: every kernel path (scalar, AVX2, AVX-512, NEON) and the
// dequantizer read blocks only through the traits below.
//
// A quantized row is a run of 32-value SLICES, the unit the int16 activations come in (ActBlock).
// A format's stored block holds VALUES = 32 or 256 values (SLICES = 1 or 8). Slice s of a block is
// 32 small integers q[j] and float scales with
//     w[j] = d[h] * q[j] + m[h],   h = 0 for j < 16, 1 for j >= 16,
// d[0] == d[1] and m[0] == m[1] unless the format says TWO_SCALES / TWO_MINS (16-value sub-blocks).
// So a kernel forms exact integer dots per slice (or per 16-value half) and does float work once
// per slice. How q is stored is one of a few SHAPES, each implemented once per ISA:
//   low bits  LOW_NIB16: 16 bytes at lo: q[j] = lo[j] & 15, q[j + 16] = lo[j] >> 4
//             LOW_NIB32: 32 bytes at lo: q[j] = (lo[j] >> lo_shift) & 15
//             LOW_BIT2:  32 bytes at lo: q[j] = (lo[j] >> lo_shift) & 3
//             LOW_I8:    32 int8 at lo:  q[j] = lo[j]
//   high bits HIGH_MASK32: q[j] |= bit j of the little-endian uint32 at hi, << LOW_BITS
//             HIGH_BYTES:  q[j] |= ((hi[j] >> hi_shift) & HIGH_MASK) << LOW_BITS
//   then      q[j] -= OFFSET, or q[j] = TABLE[q[j]] (a non-linear 4-bit code book).
// Every q fits int8. Scales are scalar code (once per block and row), shared by all paths.
//
// To add a format: its tv_dtype in tinyvllm.h, a Fmt struct here (layout, src(), scales()), one
// line in TV_QUANT_FORMATS. An ISA path runs it with no change when its shapes exist there.
#pragma once

#include <cstddef>
#include <cstdint>

#include "fp16.h"
#include "quant.h"
#include "tinyvllm.h"

namespace tv {

enum Low { LOW_NIB16, LOW_NIB32, LOW_BIT2, LOW_I8 };
enum High { HIGH_NONE, HIGH_MASK32, HIGH_BYTES };

// Where slice s of a block keeps its bits: byte offsets inside the block and bit shifts.
struct SliceSrc {
    int lo, lo_shift, hi, hi_shift;
};

// Scales of the slices of one block: w[j] = d[s][h] * q[j] + m[s][h].
template <int SLICES>
struct BlockScales {
    float d[SLICES][2], m[SLICES][2];
};

inline float half_at(const uint8_t *b, int off) { return fp16_to_fp32(load_u16(b + off)); }

// Defaults: a 32-value block, no high bits, no offset, one scale, no min.
struct FmtBase {
    static constexpr int VALUES = 32, SLICES = 1, LOW_BITS = 4, HIGH_MASK = 0, OFFSET = 0;
    static constexpr High HIGH = HIGH_NONE;
    static constexpr bool HAS_MIN = false, TWO_SCALES = false, TWO_MINS = false;
    static constexpr bool HAS_TABLE = false;
    static constexpr const int8_t *TABLE = nullptr;
    // 32-value formats whose d (and min) sit at fixed offsets: a path may load them directly.
    static constexpr int D_AT = 0, M_AT = -1;
};

// ---- 32-value blocks ---------------------------------------------------------------------------
struct FmtQ4_0 : FmtBase {  // f16 d, 16 bytes nibbles; w = (q - 8) d
    static constexpr int DTYPE = TV_Q4_0, BYTES = 18, OFFSET = 8;
    static constexpr Low LOW = LOW_NIB16;
    static constexpr SliceSrc src(int) { return {2, 0, 0, 0}; }
    static void scales(const uint8_t *b, BlockScales<1> &s) { s.d[0][0] = s.d[0][1] = half_at(b, 0); }
};
struct FmtQ4_1 : FmtBase {  // f16 d, f16 m, 16 bytes nibbles; w = q d + m
    static constexpr int DTYPE = TV_Q4_1, BYTES = 20, M_AT = 2;
    static constexpr Low LOW = LOW_NIB16;
    static constexpr bool HAS_MIN = true;
    static constexpr SliceSrc src(int) { return {4, 0, 0, 0}; }
    static void scales(const uint8_t *b, BlockScales<1> &s) {
        s.d[0][0] = s.d[0][1] = half_at(b, 0);
        s.m[0][0] = s.m[0][1] = half_at(b, 2);
    }
};
struct FmtQ5_0 : FmtBase {  // f16 d, u32 high bits, 16 bytes nibbles; w = (q - 16) d
    static constexpr int DTYPE = TV_Q5_0, BYTES = 22, OFFSET = 16;
    static constexpr Low LOW = LOW_NIB16;
    static constexpr High HIGH = HIGH_MASK32;
    static constexpr SliceSrc src(int) { return {6, 0, 2, 0}; }
    static void scales(const uint8_t *b, BlockScales<1> &s) { s.d[0][0] = s.d[0][1] = half_at(b, 0); }
};
struct FmtQ5_1 : FmtBase {  // f16 d, f16 m, u32 high bits, 16 bytes nibbles; w = q d + m
    static constexpr int DTYPE = TV_Q5_1, BYTES = 24, M_AT = 2;
    static constexpr Low LOW = LOW_NIB16;
    static constexpr High HIGH = HIGH_MASK32;
    static constexpr bool HAS_MIN = true;
    static constexpr SliceSrc src(int) { return {8, 0, 4, 0}; }
    static void scales(const uint8_t *b, BlockScales<1> &s) {
        s.d[0][0] = s.d[0][1] = half_at(b, 0);
        s.m[0][0] = s.m[0][1] = half_at(b, 2);
    }
};
struct FmtQ8_0 : FmtBase {  // f16 d, 32 int8; w = q d
    static constexpr int DTYPE = TV_Q8_0, BYTES = 34;
    static constexpr Low LOW = LOW_I8;
    static constexpr SliceSrc src(int) { return {2, 0, 0, 0}; }
    static void scales(const uint8_t *b, BlockScales<1> &s) { s.d[0][0] = s.d[0][1] = half_at(b, 0); }
};
// IQ4_NL: f16 d, 16 bytes of 4-bit indices into a fixed non-linear code book; w = TABLE[q] d.
constexpr int8_t IQ4_NL_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
struct FmtIQ4_NL : FmtBase {
    static constexpr int DTYPE = TV_IQ4_NL, BYTES = 18;
    static constexpr Low LOW = LOW_NIB16;
    static constexpr bool HAS_TABLE = true;
    static constexpr const int8_t *TABLE = IQ4_NL_VALUES;
    static constexpr SliceSrc src(int) { return {2, 0, 0, 0}; }
    static void scales(const uint8_t *b, BlockScales<1> &s) { s.d[0][0] = s.d[0][1] = half_at(b, 0); }
};

// ---- 256-value "K" super-blocks ----------------------------------------------------------------
// Their scales are small integers times f16 super-scales at fixed offsets. scale_ints() gives the
// integers as bytes: NSC scales (one per slice, or one per 16-value half with TWO_SCALES: index
// 2s + h), then the mins the same way (index NSC + ...):
//     d[s][h] = d * out[sc_index(s, h)],   m[s][h] = -dmin * out[NSC + mn_index(s, h)]
// scales() is the same for all of them; SIMD paths convert the integers of several rows at once.
struct FmtK : FmtBase {
    static constexpr int VALUES = 256, SLICES = 8, D_AT = -1;
    static constexpr int SD_AT = 0, SDMIN_AT = -1;  // f16 d and dmin of the super-block (-1: none)
};
template <class F>
constexpr int nsc() { return F::TWO_SCALES ? 2 * F::SLICES : F::SLICES; }
template <class F>
constexpr int sc_index(int s, int h) { return F::TWO_SCALES ? 2 * s + h : s; }
template <class F>
constexpr int mn_index(int s, int h) { return nsc<F>() + (F::TWO_MINS ? 2 * s + h : s); }
template <class F, float (*HALF)(const uint8_t *, int) = half_at>  // HALF: an ISA's f16 load, same bits
inline void k_scales(const uint8_t *b, BlockScales<8> &s) {
    int8_t v[32] = {};
    F::scale_ints(b, v);
    const float d = HALF(b, F::SD_AT), dmin = F::SDMIN_AT >= 0 ? HALF(b, F::SDMIN_AT) : 0.0f;
    for (int j = 0; j < 8; j++)
        for (int h = 0; h < 2; h++) {
            s.d[j][h] = d * (float)v[sc_index<F>(j, h)];
            if (F::HAS_MIN) s.m[j][h] = -dmin * (float)v[mn_index<F>(j, h)];
        }
}
// Q4_K / Q5_K: 8 6-bit scales and 8 6-bit mins packed in 12 bytes at 4, one per 32-value slice:
// values j < 4 in the low 6 bits of bytes j (scale) and j + 4 (min); j >= 4 split between the low
// or high nibble of byte j + 4 and the top 2 bits of byte j - 4 (scale) or j (min).
inline void k4_scale_ints(const uint8_t *b, int8_t *out) {
    uint32_t lo, hi, ex;  // bytes 0..3, 4..7, 8..11 of the packed scales: four values per word at once
    __builtin_memcpy(&lo, b + 4, 4);
    __builtin_memcpy(&hi, b + 8, 4);
    __builtin_memcpy(&ex, b + 12, 4);
    const uint32_t v[4] = {lo & 0x3F3F3F3Fu, (ex & 0x0F0F0F0Fu) | (((lo >> 6) & 0x03030303u) << 4),  // scales
                           hi & 0x3F3F3F3Fu, ((ex >> 4) & 0x0F0F0F0Fu) | (((hi >> 6) & 0x03030303u) << 4)};  // mins
    __builtin_memcpy(out, v, 16);
}
struct FmtQ4_K : FmtK {  // d, dmin, scales[12], qs[128]: slice s = nibble s%2 of bytes 32*(s/2)..
    static constexpr int DTYPE = TV_Q4_K, BYTES = 144, SDMIN_AT = 2;
    static constexpr Low LOW = LOW_NIB32;
    static constexpr bool HAS_MIN = true;
    static constexpr SliceSrc src(int s) { return {16 + 32 * (s / 2), 4 * (s % 2), 0, 0}; }
    static void scale_ints(const uint8_t *b, int8_t *out) { k4_scale_ints(b, out); }
    static void scales(const uint8_t *b, BlockScales<8> &s) { k_scales<FmtQ4_K>(b, s); }
};
struct FmtQ5_K : FmtK {  // d, dmin, scales[12], qh[32], qs[128]: Q4_K plus bit s of qh[j]
    static constexpr int DTYPE = TV_Q5_K, BYTES = 176, HIGH_MASK = 1, SDMIN_AT = 2;
    static constexpr Low LOW = LOW_NIB32;
    static constexpr High HIGH = HIGH_BYTES;
    static constexpr bool HAS_MIN = true;
    static constexpr SliceSrc src(int s) { return {48 + 32 * (s / 2), 4 * (s % 2), 16, s}; }
    static void scale_ints(const uint8_t *b, int8_t *out) { k4_scale_ints(b, out); }
    static void scales(const uint8_t *b, BlockScales<8> &s) { k_scales<FmtQ5_K>(b, s); }
};
// Q6_K: ql[128], qh[64], int8 scales[16], f16 d; 16-value sub-blocks: w = d * sc * (q - 32).
// Slice s = 4h + k: low nibble k/2 of ql[64h + 32(k%2) + j], high 2 bits at 2k of qh[32h + j].
struct FmtQ6_K : FmtK {
    static constexpr int DTYPE = TV_Q6_K, BYTES = 210, HIGH_MASK = 3, OFFSET = 32, SD_AT = 208;
    static constexpr Low LOW = LOW_NIB32;
    static constexpr High HIGH = HIGH_BYTES;
    static constexpr bool TWO_SCALES = true;
    static constexpr SliceSrc src(int s) { return {64 * (s / 4) + 32 * (s % 2), 4 * ((s % 4) / 2), 128 + 32 * (s / 4), 2 * (s % 4)}; }
    static void scale_ints(const uint8_t *b, int8_t *out) { __builtin_memcpy(out, b + 192, 16); }
    static void scales(const uint8_t *b, BlockScales<8> &s) { k_scales<FmtQ6_K>(b, s); }
};
// Q3_K: hmask[32], qs[64], 12 bytes of 6-bit scales, f16 d; w = d * (sc - 32) * (q - 4), where q
// is 2 bits at 2(s%4) of qs[32(s/4) + j] plus bit s of hmask[j] as bit 2.
struct FmtQ3_K : FmtK {
    static constexpr int DTYPE = TV_Q3_K, BYTES = 110, LOW_BITS = 2, HIGH_MASK = 1, OFFSET = 4, SD_AT = 108;
    static constexpr Low LOW = LOW_BIT2;
    static constexpr High HIGH = HIGH_BYTES;
    static constexpr bool TWO_SCALES = true;
    static constexpr SliceSrc src(int s) { return {32 + 32 * (s / 4), 2 * (s % 4), 0, s}; }
    static void scale_ints(const uint8_t *b, int8_t *sc) {
        const uint8_t *p = b + 96;  // 16 scales: low 4 bits in p[0..7] (two per byte), high 2 in p[8..11]
        for (int i = 0; i < 16; i++)
            sc[i] = (int8_t)((((p[i % 8] >> (4 * (i / 8))) & 15) | (((p[8 + i % 4] >> (2 * (i / 4))) & 3) << 4)) - 32);
    }
    static void scales(const uint8_t *b, BlockScales<8> &s) { k_scales<FmtQ3_K>(b, s); }
};
// Q2_K: scales[16] (4-bit scale, 4-bit min per 16 values), qs[64], f16 d, f16 dmin;
// w = d * sc * q - dmin * mn, q = 2 bits at 2(s%4) of qs[32(s/4) + j].
struct FmtQ2_K : FmtK {
    static constexpr int DTYPE = TV_Q2_K, BYTES = 84, LOW_BITS = 2, SD_AT = 80, SDMIN_AT = 82;
    static constexpr Low LOW = LOW_BIT2;
    static constexpr bool HAS_MIN = true, TWO_SCALES = true, TWO_MINS = true;
    static constexpr SliceSrc src(int s) { return {16 + 32 * (s / 4), 2 * (s % 4), 0, 0}; }
    static void scale_ints(const uint8_t *b, int8_t *out) {
        for (int i = 0; i < 16; i++) out[i] = (int8_t)(b[i] & 15), out[16 + i] = (int8_t)(b[i] >> 4);
    }
    static void scales(const uint8_t *b, BlockScales<8> &s) { k_scales<FmtQ2_K>(b, s); }
};

// Every quantized format, for dispatchers: X(Fmt).
#define TV_QUANT_FORMATS(X) X(FmtQ4_0) X(FmtQ4_1) X(FmtQ5_0) X(FmtQ5_1) X(FmtQ8_0) X(FmtIQ4_NL) \
    X(FmtQ2_K) X(FmtQ3_K) X(FmtQ4_K) X(FmtQ5_K) X(FmtQ6_K)

// fn(F()) for the format whose DTYPE is dtype, and its result; false for any other dtype.
template <class Fn>
inline bool with_format(int dtype, Fn &&fn) {
    switch (dtype) {
#define TV_FORMAT_CASE(F) \
    case F::DTYPE: return fn(F());
        TV_QUANT_FORMATS(TV_FORMAT_CASE)
#undef TV_FORMAT_CASE
        default: return false;
    }
}

// The reference unpacking of slice s (the scalar kernels and the dequantizer use it; SIMD paths
// implement the same shapes with vector ops).
template <class F>
inline void unpack_slice(const uint8_t *blk, int s, int8_t q[32]) {
    const SliceSrc src = F::src(s);
    const uint8_t *lo = blk + src.lo, *hi = blk + src.hi;
    uint8_t v[32];  // one simple loop per step: each vectorizes
    if constexpr (F::LOW == LOW_NIB16) {
        for (int j = 0; j < 16; j++) v[j] = lo[j] & 15;
        for (int j = 0; j < 16; j++) v[j + 16] = lo[j] >> 4;
    } else if constexpr (F::LOW == LOW_NIB32 || F::LOW == LOW_BIT2) {
        const int mask = F::LOW == LOW_NIB32 ? 15 : 3;
        for (int j = 0; j < 32; j++) v[j] = (uint8_t)((lo[j] >> src.lo_shift) & mask);
    } else {
        for (int j = 0; j < 32; j++) v[j] = lo[j];
    }
    if constexpr (F::HIGH == HIGH_MASK32) {
        const uint32_t m = (uint32_t)hi[0] | (uint32_t)hi[1] << 8 | (uint32_t)hi[2] << 16 | (uint32_t)hi[3] << 24;
        for (int j = 0; j < 32; j++) v[j] |= (uint8_t)(((m >> j) & 1) << F::LOW_BITS);
    } else if constexpr (F::HIGH == HIGH_BYTES) {
        for (int j = 0; j < 32; j++) v[j] |= (uint8_t)(((hi[j] >> src.hi_shift) & F::HIGH_MASK) << F::LOW_BITS);
    }
    if constexpr (F::HAS_TABLE)
        for (int j = 0; j < 32; j++) q[j] = F::TABLE[v[j]];
    else
        for (int j = 0; j < 32; j++) q[j] = (int8_t)(v[j] - F::OFFSET);
}

}  // namespace tv
