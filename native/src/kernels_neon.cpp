// AArch64 kernels: "neon" (ARMv8.0 Advanced SIMD, every aarch64 CPU: Cortex-A53/A57/A72, Jetson
// Nano, Pi 3/4) and "neon_dotprod" (ARMv8.2 SDOT/UDOT: Cortex-A55/A76/A78, Jetson Orin, Pi 5,
// Apple M*). The dotprod functions carry a per-function target attribute instead of a global
// -march flag, so one binary runs everywhere and the table is handed out only when the CPU
// reports FEAT_DotProd (SDOT is SIGILL on a Cortex-A72).
//
// Every format runs through the formats.h traits: unpack<F, S>() turns slice S of a block into 32
// int8 weights (each shape once, as vector ops), then one of two integer dots per slice and
// activation row, then the slice's float work (per 16-value half for TWO_SCALES formats).
//
// Integer slice dot, neon: weights widened to int16, vmlal_s16 against the int16 activations
// into int32 lanes (exact: |w| <= 128, |x| <= 32768, 8 terms per lane).
//
// Integer slice dot, dotprod: SDOT is int8 x int8, activations are int16. Each x is split as
//     x = 256 * hi + lo + 128,   hi = x >> 8 (its high byte, signed),  lo = (x & 255) - 128
// hi and lo both lie in [-128, 127] for every int16 x (-32768 and 32767 included; the plain
// split x = 256*hi + lo with both halves signed only reaches +32639, hence the +128 offset), so
//     w.x = 256 * sdot(w, hi) + sdot(w, lo) + 128 * sum(w)
// where sum(w) is one more SDOT against ones, computed once per weight slice and shared by all
// activation rows. Formats whose weights are all >= 0 (Q4_1, Q5_1, Q4_K, Q5_K, Q2_K: at most 31)
// take lo = x & 255 with UDOT instead and need no correction. Both halves are one UZP1/UZP2 of the int16 bytes (little endian).
// Per-lane bounds: 256 * 8 * 128 * 128 + 8 * 128 * 128 + 128 * 8 * 128 < 2^31.
#include "attn_block.h"
#include "formats.h"
#include "kernels.h"
#include "ops.h"
#include "tinyvllm.h"

#if defined(__aarch64__)

#include <arm_neon.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "fp16.h"

#if defined(__APPLE__)
#include <sys/sysctl.h>
#elif defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)  // old kernel headers
#endif
#endif

// How to get SDOT into single functions. Whole-TU dotprod (-march=...+dotprod, or Apple arm64,
// whose default target is an M1): nothing to do. GCC >= 8 and clang >= 16 accept a per-function
// target; older clangs declare vdotq_* only for a whole-TU target, and GCC 7 (Jetson Nano's JetPack
// 4) has no dotprod at all: those build the "neon" path only.
#if defined(__ARM_FEATURE_DOTPROD)
#define TV_HAVE_DOTPROD 1
#define TV_DOTPROD
#elif defined(__clang__) && __clang_major__ >= 16
#define TV_HAVE_DOTPROD 1
#define TV_DOTPROD __attribute__((target("dotprod")))
#elif !defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 8
#define TV_HAVE_DOTPROD 1
#define TV_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#else
#define TV_HAVE_DOTPROD 0
#endif
#define TV_NOATTR

namespace tv {
namespace {

// Block scales: one FCVT (ACLE __fp16 is baseline on aarch64) instead of the portable bit twiddling.
inline float half(const uint8_t *b, int off = 0) {
    __fp16 h;
    std::memcpy(&h, b + off, 2);
    return (float)h;
}

// ---- float dots (both paths) ----------------------------------------------------------------

// FCVTL (half -> float) is baseline ARMv8 Advanced SIMD: no +fp16 extension needed.
inline float32x4_t load4(const uint16_t *p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
inline float32x4_t load4(const float *p) { return vld1q_f32(p); }
inline float to_f32(uint16_t v) { return fp16_to_fp32(v); }
inline float to_f32(float v) { return v; }

template <class T>  // float or f16 weights
float dot(const T *w, const float *x, int64_t n) {
    float32x4_t a0 = vdupq_n_f32(0), a1 = a0, a2 = a0, a3 = a0;  // 4 chains hide FMA latency
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = vfmaq_f32(a0, load4(w + i), vld1q_f32(x + i));
        a1 = vfmaq_f32(a1, load4(w + i + 4), vld1q_f32(x + i + 4));
        a2 = vfmaq_f32(a2, load4(w + i + 8), vld1q_f32(x + i + 8));
        a3 = vfmaq_f32(a3, load4(w + i + 12), vld1q_f32(x + i + 12));
    }
    for (; i + 4 <= n; i += 4) a0 = vfmaq_f32(a0, load4(w + i), vld1q_f32(x + i));
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
    for (; i < n; i++) s = std::fma(to_f32(w[i]), x[i], s);
    return s;
}

// ---- weight slices (formats.h shapes) as int8: a = values 0..15, b = values 16..31 ------------

#define TV_INLINE inline __attribute__((always_inline))

struct W8 {
    int8x16_t a, b;
};

// Weights that are all >= 0 (no offset, no code book, not raw int8): the dotprod path takes UDOT
// on the unsigned low bytes of x and needs no 128 * sum(w) correction (Q4_1, Q5_1, Q4_K, Q5_K, Q2_K).
template <class F>
constexpr bool kUnsigned = F::OFFSET == 0 && !F::HAS_TABLE && F::LOW != LOW_I8;

// v >> N, v << N with N a compile-time count that may be 0 (the _n intrinsics take 1..7/8 only).
template <int N>
TV_INLINE uint8x16_t shr(uint8x16_t v) {
    if constexpr (N == 0) return v;
    else return vshrq_n_u8(v, N);
}
template <int N>
TV_INLINE uint8x16_t shl(uint8x16_t v) {
    if constexpr (N == 0) return v;
    else return vshlq_n_u8(v, N);
}
// (v & (M << SH)) moved to bit LB, i.e. ((v >> SH) & M) << LB in one mask and at most one shift.
template <int SH, int M, int LB>
TV_INLINE uint8x16_t field(uint8x16_t v) {
    const uint8x16_t t = vandq_u8(v, vdupq_n_u8((uint8_t)(M << SH)));
    if constexpr (LB >= SH) return shl<LB - SH>(t);
    else return shr<SH - LB>(t);
}

// Slice S of a block, the vector form of unpack_slice<F> (S is a template argument so every byte
// offset and shift of F::src(S) is an immediate).
template <class F, int S>
TV_INLINE W8 unpack(const uint8_t *blk) {
    constexpr SliceSrc src = F::src(S);
    const uint8_t *lo = blk + src.lo;
    uint8x16_t a, b;
    if constexpr (F::LOW == LOW_I8) {
        a = vld1q_u8(lo), b = vld1q_u8(lo + 16);
    } else if constexpr (F::LOW == LOW_NIB16) {
        const uint8x16_t v = vld1q_u8(lo);
        a = vandq_u8(v, vdupq_n_u8(15)), b = vshrq_n_u8(v, 4);
    } else {  // LOW_NIB32 / LOW_BIT2: bits [shift, shift + width) of 32 bytes
        constexpr int WIDTH = F::LOW == LOW_NIB32 ? 4 : 2;
        a = shr<src.lo_shift>(vld1q_u8(lo)), b = shr<src.lo_shift>(vld1q_u8(lo + 16));
        if constexpr (src.lo_shift + WIDTH < 8) {
            const uint8x16_t m = vdupq_n_u8((1 << WIDTH) - 1);
            a = vandq_u8(a, m), b = vandq_u8(b, m);
        }
    }
    if constexpr (F::HIGH == HIGH_MASK32) {  // bit j of a little-endian u32 -> byte j
        uint32_t bits;
        std::memcpy(&bits, blk + src.hi, 4);
        const uint8x16_t bytes = vreinterpretq_u8_u32(vdupq_n_u32(bits));
        static constexpr uint8_t IDX[32] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3};
        static constexpr uint8_t BIT[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
        const uint8x16_t bit = vld1q_u8(BIT), one = vdupq_n_u8(1 << F::LOW_BITS);
        a = vorrq_u8(a, vandq_u8(vtstq_u8(vqtbl1q_u8(bytes, vld1q_u8(IDX)), bit), one));
        b = vorrq_u8(b, vandq_u8(vtstq_u8(vqtbl1q_u8(bytes, vld1q_u8(IDX + 16)), bit), one));
    } else if constexpr (F::HIGH == HIGH_BYTES) {
        const uint8_t *hi = blk + src.hi;
        a = vorrq_u8(a, field<src.hi_shift, F::HIGH_MASK, F::LOW_BITS>(vld1q_u8(hi)));
        b = vorrq_u8(b, field<src.hi_shift, F::HIGH_MASK, F::LOW_BITS>(vld1q_u8(hi + 16)));
    }
    if constexpr (F::HAS_TABLE) {
        const int8x16_t t = vld1q_s8(F::TABLE);
        return {vqtbl1q_s8(t, a), vqtbl1q_s8(t, b)};
    } else if constexpr (F::OFFSET != 0) {
        const int8x16_t off = vdupq_n_s8((int8_t)F::OFFSET);
        return {vsubq_s8(vreinterpretq_s8_u8(a), off), vsubq_s8(vreinterpretq_s8_u8(b), off)};
    } else {
        return {vreinterpretq_s8_u8(a), vreinterpretq_s8_u8(b)};
    }
}

// A block's float scales. 32-value formats with d (and m) at fixed offsets read them with FCVT
// (as fast as before the traits); K super-blocks convert F::scale_ints, once per block of a
// weight row (shared by its NX activation rows).
template <class F>
TV_INLINE BlockScales<F::SLICES> scales(const uint8_t *w) {
    BlockScales<F::SLICES> s;
    if constexpr (F::D_AT < 0) {
        k_scales<F, half>(w, s);  // F::scales with FCVT for the f16 super-scales: the same bits
    } else {
        s.d[0][0] = half(w + F::D_AT);
        if constexpr (F::HAS_MIN) s.m[0][0] = half(w + F::M_AT);
    }
    return s;
}
// {h0, h0, h1, h1}: per-half values in the lane layout of a TWO_SCALES integer dot
TV_INLINE float32x4_t halves(const float *h) { return vcombine_f32(vdup_n_f32(h[0]), vdup_n_f32(h[1])); }

// Sum of x per 16-value half, lanes {a, a, b, b} (Q2_K's per-half mins: sum_j m_h x_j).
TV_INLINE int32x4_t xsum_halves(const int16_t *x) {
    const int32x4_t a = vpadalq_s16(vpaddlq_s16(vld1q_s16(x)), vld1q_s16(x + 8));
    const int32x4_t b = vpadalq_s16(vpaddlq_s16(vld1q_s16(x + 16)), vld1q_s16(x + 24));
    return vpaddq_s32(a, b);
}

// Both Dots return an exact int32x4 per slice and activation row: for TWO_SCALES formats lanes
// {a, a, b, b} (each half's dot split over two lanes), otherwise four lanes summing to the dot.

// ---- neon: int16 multiply-accumulate ---------------------------------------------------------

struct NeonDot {
    struct Prep {  // weights widened once per slice, shared by the NX activation rows
        int16x8_t w[4];
    };
    template <class F>
    TV_INLINE static Prep prep(const W8 &w) {
        return {{vmovl_s8(vget_low_s8(w.a)), vmovl_high_s8(w.a), vmovl_s8(vget_low_s8(w.b)), vmovl_high_s8(w.b)}};
    }
    struct X {  // an activation slice, loaded once for several weight rows
        int16x8_t v[4];
    };
    TV_INLINE static X load_x(const int16_t *x) { return {{vld1q_s16(x), vld1q_s16(x + 8), vld1q_s16(x + 16), vld1q_s16(x + 24)}}; }
    template <class F>
    TV_INLINE static int32x4_t dot_x(const Prep &p, const X &x) {
        if constexpr (F::TWO_SCALES) {
            int32x4_t h[2];
            for (int k = 0; k < 2; k++) {
                int32x4_t a0 = vmull_s16(vget_low_s16(p.w[2 * k]), vget_low_s16(x.v[2 * k])), a1 = vmull_high_s16(p.w[2 * k], x.v[2 * k]);
                a0 = vmlal_s16(a0, vget_low_s16(p.w[2 * k + 1]), vget_low_s16(x.v[2 * k + 1]));
                a1 = vmlal_high_s16(a1, p.w[2 * k + 1], x.v[2 * k + 1]);
                h[k] = vaddq_s32(a0, a1);
            }
            return vpaddq_s32(h[0], h[1]);
        } else {
            int32x4_t a0 = vmull_s16(vget_low_s16(p.w[0]), vget_low_s16(x.v[0])), a1 = vmull_high_s16(p.w[0], x.v[0]);
            for (int k = 1; k < 4; k++) {
                a0 = vmlal_s16(a0, vget_low_s16(p.w[k]), vget_low_s16(x.v[k]));
                a1 = vmlal_high_s16(a1, p.w[k], x.v[k]);
            }
            return vaddq_s32(a0, a1);
        }
    }
};

#if TV_HAVE_DOTPROD
// ---- dotprod: SDOT on the split activations (see the header comment) -------------------------

struct DotprodDot {
    struct Prep {
        W8 w;
        int32x4_t corr;  // 128 * sum(w), in the lane layout of dot_x() (zero for unsigned weights)
    };
    template <class F>
    TV_DOTPROD TV_INLINE static Prep prep(const W8 &w) {
        if constexpr (kUnsigned<F>) {
            return {w, vdupq_n_s32(0)};
        } else {
            const int8x16_t ones = vdupq_n_s8(1);
            const int32x4_t z = vdupq_n_s32(0);
            if constexpr (F::TWO_SCALES)
                return {w, vshlq_n_s32(vpaddq_s32(vdotq_s32(z, w.a, ones), vdotq_s32(z, w.b, ones)), 7)};
            else
                return {w, vshlq_n_s32(vdotq_s32(vdotq_s32(z, w.a, ones), w.b, ones), 7)};
        }
    }
    // sdot / udot over both halves: one chain, or two kept apart (lanes {a, a, b, b}) for TWO_SCALES
    template <class F>
    TV_DOTPROD TV_INLINE static int32x4_t sdot2(int8x16_t wa, int8x16_t xa, int8x16_t wb, int8x16_t xb) {
        const int32x4_t z = vdupq_n_s32(0);
        if constexpr (F::TWO_SCALES) return vpaddq_s32(vdotq_s32(z, wa, xa), vdotq_s32(z, wb, xb));
        else return vdotq_s32(vdotq_s32(z, wa, xa), wb, xb);
    }
    template <class F>
    TV_DOTPROD TV_INLINE static int32x4_t udot2(uint8x16_t wa, uint8x16_t xa, uint8x16_t wb, uint8x16_t xb) {
        const uint32x4_t z = vdupq_n_u32(0);
        if constexpr (F::TWO_SCALES) return vreinterpretq_s32_u32(vpaddq_u32(vdotq_u32(z, wa, xa), vdotq_u32(z, wb, xb)));
        else return vreinterpretq_s32_u32(vdotq_u32(vdotq_u32(z, wa, xa), wb, xb));
    }
    struct X {  // an activation slice split into high and low bytes once, for several weight rows
        int8x16_t ha, hb, la, lb;  // la / lb: x & 255 (unflipped)
    };
    TV_DOTPROD TV_INLINE static X load_x(const int16_t *x) {
        const int8_t *xb = reinterpret_cast<const int8_t *>(x);
        const int8x16_t xa0 = vld1q_s8(xb), xa1 = vld1q_s8(xb + 16), xb0 = vld1q_s8(xb + 32), xb1 = vld1q_s8(xb + 48);
        return {vuzp2q_s8(xa0, xa1), vuzp2q_s8(xb0, xb1), vuzp1q_s8(xa0, xa1), vuzp1q_s8(xb0, xb1)};
    }
    template <class F>
    TV_DOTPROD TV_INLINE static int32x4_t dot_x(const Prep &p, const X &x) {
        const int32x4_t hi = sdot2<F>(p.w.a, x.ha, p.w.b, x.hb);
        int32x4_t lo;
        if constexpr (kUnsigned<F>) {
            lo = udot2<F>(vreinterpretq_u8_s8(p.w.a), vreinterpretq_u8_s8(x.la), vreinterpretq_u8_s8(p.w.b),
                          vreinterpretq_u8_s8(x.lb));
        } else {
            const int8x16_t flip = vdupq_n_s8(-128);
            lo = vaddq_s32(sdot2<F>(p.w.a, veorq_s8(x.la, flip), p.w.b, veorq_s8(x.lb, flip)), p.corr);
        }
        return vaddq_s32(vshlq_n_s32(hi, 8), lo);
    }
};
#endif

// The row kernels, per Dot, for the one case the QuantGemm below leaves to rows[]: per-half mins
// (Q2_K). One slice against NX activation rows: the weights are unpacked once, then per row an
// exact integer dot per half and the float work of that slice. A row's float operations are the
// same for every NX (explicit FMAs, fixed order), so results are batch invariant. Slices alternate
// between two accumulator sets (even / odd) to hide the FMA latency.
#define TV_ROWS(ATTR, Dot)                                                                               \
    template <class F, int NX, int S>                                                                    \
    ATTR TV_INLINE void slice_##Dot(const uint8_t *w, const ActBlock *x, int64_t nb,                      \
                                    const BlockScales<F::SLICES> &sc, float32x4_t *acc) {                \
        static_assert(F::TWO_SCALES && F::TWO_MINS, "the QuantGemm runs every other format");             \
        const auto p = Dot::template prep<F>(unpack<F, S>(w));                                           \
        const float32x4_t dv = halves(sc.d[S]), mv = halves(sc.m[S]);                                  \
        for (int i = 0; i < NX; i++) {                                                                   \
            const ActBlock &xb = x[i * nb + S];                                                          \
            const float32x4_t isum = vcvtq_f32_s32(Dot::template dot_x<F>(p, Dot::load_x(xb.qs)));       \
            acc[i] = vfmaq_f32(acc[i], isum, vmulq_n_f32(dv, xb.d));                                     \
            acc[i] = vfmaq_f32(acc[i], vcvtq_f32_s32(xsum_halves(xb.qs)), vmulq_n_f32(mv, xb.d));        \
        }                                                                                                \
    }                                                                                                    \
    template <class F, int NX, int... S>                                                                 \
    ATTR TV_INLINE void block_##Dot(const uint8_t *w, const ActBlock *x, int64_t nb, float32x4_t *acc0,  \
                                    float32x4_t *acc1, std::integer_sequence<int, S...>) {               \
        const auto sc = scales<F>(w);                                                                    \
        (slice_##Dot<F, NX, S>(w, x, nb, sc, S % 2 ? acc1 : acc0), ...);                                 \
    }                                                                                                    \
    template <class F, int NX>                                                                           \
    ATTR void rows_nx_##Dot(const uint8_t *w, const ActBlock *x, int64_t nb, float *out, int64_t out_stride) { \
        float32x4_t acc0[NX], acc1[NX];                                                                  \
        for (int i = 0; i < NX; i++) acc0[i] = acc1[i] = vdupq_n_f32(0);                                 \
        for (int64_t b = 0; b < nb; b += F::SLICES, w += F::BYTES)                                       \
            block_##Dot<F, NX>(w, x + b, nb, acc0, acc1, std::make_integer_sequence<int, F::SLICES>());  \
        for (int i = 0; i < NX; i++) out[i * out_stride] = vaddvq_f32(vaddq_f32(acc0[i], acc1[i]));     \
    }                                                                                                    \
    template <class F>                                                                                   \
    ATTR void rows_##Dot(const uint8_t *w, const ActBlock *x, int64_t nb, int nx, float *out, int64_t out_stride) { \
        switch (nx) {                                                                                    \
            case 1: rows_nx_##Dot<F, 1>(w, x, nb, out, out_stride); break;                               \
            case 2: rows_nx_##Dot<F, 2>(w, x, nb, out, out_stride); break;                               \
            case 3: rows_nx_##Dot<F, 3>(w, x, nb, out, out_stride); break;                               \
            default: rows_nx_##Dot<F, 4>(w, x, nb, out, out_stride); break;                              \
        }                                                                                                \
    }
TV_ROWS(TV_NOATTR, NeonDot)

// ---- QuantGemm: the tiled matmul, shaped like the x86 ones (kernels_avx512.cpp, kernels_avx2.cpp) --
// Every output is the same float sequence on both NEON paths and every tile:
//     acc = 0; per slice: acc = fma(float(idot), d_w * d_x, acc)
//                         [TWO_SCALES: idot of values 0..15 with d_w[0], then 16..31 with d_w[1]]
//                         [HAS_MIN: acc = fma(m_w, s_x, acc)]
// with idot the slice's exact integer dot, so a token's row gets the same bits from the decode and
// the panel kernel, whatever its batch.
//   - m < GEMM_MIN (decode): NW = 4 weight rows at a time, each slice's dots (Dot::dot_x above)
//     reduced into one 4-lane vector (lane = weight row): float work once per slice for 4 rows;
//   - m >= GEMM_MIN: NW weight rows unpacked once into an L1 panel of int8 weights, then run against
//     tiles of TW = 4 activation rows (lane = activation row): the weight is the by-element operand,
//     so one instruction meets the whole tile (neon: SMLAL by lane, 4 rows x 1 value; dotprod:
//     SDOT by lane, 4 rows x 4 values, twice for the split int16 activations); float work once per
//     slice and weight row for the 4 activation rows. Per-half mins (Q2_K) keep rows[].
// The kernels stay out of line (called once per group or tile) so benchmarks/neon_instruction_mix.py
// finds them by name in the compiled code.
#define TV_NOINLINE __attribute__((noinline))
constexpr int GEMM_MIN = 4;
constexpr int NW = 4;  // weight rows per group (decode lanes, panel rows)
constexpr int TW = 4;  // activation rows per panel tile (vector lanes)

struct GemmPrep {
    const ActBlock *x = nullptr;  // decode: the blocks as they are
    std::vector<int16_t> x16;     // neon panel: [tile][nb][32 values][TW rows]
    std::vector<int8_t> xh, xl;   // dotprod panel: high / low bytes [tile][nb][8 quads][TW rows][4]
    std::vector<float> xd, xs;    // [tile][nb][TW], padded rows 0
    int64_t m = 0;                // the shape a late run_dup worker may still read p as
    StaleReaders readers;         // last: waits for late run_dup workers at thread exit
};

template <bool DP>
void prepare_tile(GemmPrep &p, const ActBlock *x, int64_t m, int64_t nb, int64_t t) {
    for (int64_t b = 0; b < nb; b++) {
        const size_t tb = (size_t)(t * nb + b);
        for (int i = 0; i < TW; i++) {
            const int64_t row = t * TW + i;
            const ActBlock *a = row < m ? &x[row * nb + b] : nullptr;
            p.xd[tb * TW + i] = a ? a->d : 0.0f;
            p.xs[tb * TW + i] = a ? a->s : 0.0f;
            for (int j = 0; j < QK; j++) {
                const int16_t v = a ? a->qs[j] : 0;
                if constexpr (DP) {
                    const size_t at = tb * 128 + (size_t)(j / 4) * 16 + i * 4 + j % 4;
                    p.xh[at] = (int8_t)(v >> 8);
                    p.xl[at] = (int8_t)(uint8_t)(v & 255);  // unflipped: signed formats flip bit 7 in micro
                } else {
                    p.x16[tb * 128 + (size_t)j * TW + i] = v;
                }
            }
        }
    }
}

template <bool DP>
const void *gemm_prepare(const ActBlock *x, int64_t m, int64_t nb, ThreadPool &pool) {
    thread_local GemmPrep p;  // the calling thread's; workers fill tiles of it, then only read it
    if (p.m != m) ThreadPool::quiesce_all(), p.m = m;  // as x86_gemm.h's prepare
    p.x = x;
    if (m < GEMM_MIN) return &p;
    const int64_t tiles = (m + TW - 1) / TW;
    const size_t n = (size_t)(tiles * nb);
    if ((DP ? p.xh.size() : p.x16.size()) < n * 128 || p.xd.size() < n * TW) ThreadPool::quiesce_all();
    if (DP && p.xh.size() < n * 128) p.xh.resize(n * 128), p.xl.resize(n * 128);
    if (!DP && p.x16.size() < n * 128) p.x16.resize(n * 128);
    if (p.xd.size() < n * TW) p.xd.resize(n * TW), p.xs.resize(n * TW);
    GemmPrep *mine = &p;  // inside the lambda `p` would name each worker's own thread_local
    pool.run(tiles, [&](int64_t t, int) { prepare_tile<DP>(*mine, x, m, nb, t); });  // one tile: inline
    return &p;
}

// Row offsets of a group: rows past r1 repeat the last one (computed, never stored).
inline void group_offsets(int64_t g0, int64_t r1, size_t row_bytes, size_t *off) {
    for (int r = 0; r < NW; r++) off[r] = (size_t)(std::min(g0 + r, r1 - 1) - g0) * row_bytes;
}

// The 4 rows' partial-lane dots as one vector, lane r = row r (TWO_SCALES: *second = the 16..31 half).
TV_INLINE int32x4_t reduce4(const int32x4_t d[NW], bool two, int32x4_t *second) {
    const int32x4_t a = vpaddq_s32(d[0], d[1]), b = vpaddq_s32(d[2], d[3]);
    if (!two) return vpaddq_s32(a, b);
    *second = vuzp2q_s32(a, b);  // lanes {a, a, b, b} -> pairs summed -> {r0a, r0b, r1a, r1b}
    return vuzp1q_s32(a, b);
}

// A panel: NW weight rows as int8 [nb][NW][32], their scales [nb][NW], and (dotprod, signed
// weights) 128 * sum(w) per half [nb][NW][2].
struct Panel {
    std::vector<int8_t> w;
    std::vector<float> d, d2, mn;
    std::vector<int32_t> corr;
};

template <class F, int... S>
TV_INLINE void fill_block(Panel &P, const uint8_t *w0, const size_t *off, int64_t b0, std::integer_sequence<int, S...>) {
    BlockScales<F::SLICES> sc[NW];
    for (int r = 0; r < NW; r++) sc[r] = scales<F>(w0 + off[r]);
    auto slice = [&](auto s_) {
        constexpr int s = decltype(s_)::value;
        const size_t b = (size_t)(b0 + s);
        for (int r = 0; r < NW; r++) {
            const W8 u = unpack<F, s>(w0 + off[r]);
            vst1q_s8(P.w.data() + (b * NW + r) * 32, u.a);
            vst1q_s8(P.w.data() + (b * NW + r) * 32 + 16, u.b);
            P.d[b * NW + r] = sc[r].d[s][0];
            P.d2[b * NW + r] = F::TWO_SCALES ? sc[r].d[s][1] : 0.0f;
            P.mn[b * NW + r] = F::HAS_MIN ? sc[r].m[s][0] : 0.0f;
            P.corr[(b * NW + r) * 2] = 128 * (int32_t)vaddlvq_s8(u.a);
            P.corr[(b * NW + r) * 2 + 1] = 128 * (int32_t)vaddlvq_s8(u.b);
        }
    };
    (slice(std::integral_constant<int, S>()), ...);
}

// The group's weights [g0, g0 + NW) into the panel (rows past r1 repeat the last).
template <class F>
void fill_panel(Panel &P, const uint8_t *w, size_t row_bytes, int64_t g0, int64_t r1, int64_t nb) {
    const size_t np = (size_t)(nb * NW);
    if (P.d.size() < np) P.w.resize(np * 32), P.d.resize(np), P.d2.resize(np), P.mn.resize(np), P.corr.resize(2 * np);
    size_t off[NW];
    group_offsets(g0, r1, row_bytes, off);
    const uint8_t *w0 = w + (size_t)g0 * row_bytes;
    for (int64_t b0 = 0; b0 < nb; b0 += F::SLICES, w0 += F::BYTES)
        fill_block<F>(P, w0, off, b0, std::make_integer_sequence<int, F::SLICES>());
}

// acc[r] = fma(float(id[r]), d[r] * dx, acc[r]) for the panel's rows (lanes = activation rows).
TV_INLINE void fold(float32x4_t *acc, const int32x4_t *id, const float *d, float32x4_t dx) {
    for (int r = 0; r < NW; r++) acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(id[r]), vmulq_n_f32(dx, d[r]));
}
template <class F>
TV_INLINE void fold_min(float32x4_t *acc, const float *mn, const float *xs) {
    if constexpr (F::HAS_MIN) {
        const float32x4_t sx = vld1q_f32(xs);
        for (int r = 0; r < NW; r++) acc[r] = vfmaq_f32(acc[r], sx, vdupq_n_f32(mn[r]));
    }
}
TV_INLINE void store_tile(const float32x4_t *acc, int nw, int ni, int64_t row0, float *y, int64_t ldy) {
    float t[TW];
    for (int r = 0; r < nw; r++) {
        vst1q_f32(t, acc[r]);
        for (int i = 0; i < ni; i++) y[(row0 + i) * ldy + r] = t[i];
    }
}

// neon: per weight value j, SMLAL by lane: the 4 rows' x_j times w_r[j], for the panel's 4 rows.
template <int J>
TV_INLINE void mlal_lane(int32x4_t *id, const int16x8_t *wv, int16x4_t xj) {
    for (int r = 0; r < NW; r++) id[r] = vmlal_laneq_s16(id[r], xj, wv[r], J);
}
template <int... J>
TV_INLINE void mlal8(int32x4_t *id, const int8_t *pw, int g, const int16_t *xt, std::integer_sequence<int, J...>) {
    int16x8_t wv[NW];  // values 8g..8g+7 of each panel row, widened
    for (int r = 0; r < NW; r++) wv[r] = vmovl_s8(vld1_s8(pw + r * 32 + 8 * g));
    (mlal_lane<J>(id, wv, vld1_s16(xt + (8 * g + J) * TW)), ...);
}
template <class F>
TV_NOINLINE void micro_neon(const Panel &P, const GemmPrep &x, int64_t t, int64_t nb, int nw, int ni, float *y, int64_t ldy) {
    float32x4_t acc[NW];
    for (int r = 0; r < NW; r++) acc[r] = vdupq_n_f32(0);
    constexpr auto eight = std::make_integer_sequence<int, 8>();
    for (int64_t b = 0; b < nb; b++) {
        const size_t tb = (size_t)(t * nb + b);
        const int8_t *pw = P.w.data() + (size_t)b * NW * 32;
        const int16_t *xt = x.x16.data() + tb * 128;
        const float32x4_t dx = vld1q_f32(x.xd.data() + tb * TW);
        int32x4_t id[NW];
        for (int r = 0; r < NW; r++) id[r] = vdupq_n_s32(0);
        mlal8(id, pw, 0, xt, eight), mlal8(id, pw, 1, xt, eight);
        if constexpr (F::TWO_SCALES) {  // the first half's dots with its own scale
            fold(acc, id, P.d.data() + b * NW, dx);
            for (int r = 0; r < NW; r++) id[r] = vdupq_n_s32(0);
        }
        mlal8(id, pw, 2, xt, eight), mlal8(id, pw, 3, xt, eight);
        fold(acc, id, (F::TWO_SCALES ? P.d2 : P.d).data() + b * NW, dx);
        fold_min<F>(acc, P.mn.data() + b * NW, x.xs.data() + tb * TW);
    }
    store_tile(acc, nw, ni, t * TW, y, ldy);
}

#if TV_HAVE_DOTPROD
// dotprod: per quad q of 4 weight values, SDOT by lane: the 4 rows' x[4q..4q+3] (high bytes, then
// low bytes) against w_r[4q..4q+3]; idot = 256 * hi + lo (+ 128 * sum(w) for signed weights).
template <class F, int Q>
TV_DOTPROD TV_INLINE void sdot_quad(int32x4_t *hi, int32x4_t *lo, const int8x16_t *wv, const int8_t *xh,
                                    const int8_t *xl) {
    const int8x16_t h = vld1q_s8(xh + 16 * Q);
    const int8x16_t l = vld1q_s8(xl + 16 * Q);
    for (int r = 0; r < NW; r++) {
        const int8x16_t w = wv[2 * r + Q / 4];
        hi[r] = vdotq_laneq_s32(hi[r], h, w, Q % 4);
        if constexpr (kUnsigned<F>)
            lo[r] = vreinterpretq_s32_u32(vdotq_laneq_u32(vreinterpretq_u32_s32(lo[r]), vreinterpretq_u8_s8(l),
                                                          vreinterpretq_u8_s8(w), Q % 4));
        else
            lo[r] = vdotq_laneq_s32(lo[r], veorq_s8(l, vdupq_n_s8(-128)), w, Q % 4);
    }
}
template <class F, int... Q>
TV_DOTPROD TV_INLINE void sdot_half(int32x4_t *id, const int8x16_t *wv, const int8_t *xh, const int8_t *xl,
                                    const int32_t *corr, int h, std::integer_sequence<int, Q...>) {
    int32x4_t hi[NW], lo[NW];
    for (int r = 0; r < NW; r++) hi[r] = lo[r] = vdupq_n_s32(0);
    (sdot_quad<F, Q>(hi, lo, wv, xh, xl), ...);
    for (int r = 0; r < NW; r++) {
        int32x4_t v = vaddq_s32(id[r], vaddq_s32(vshlq_n_s32(hi[r], 8), lo[r]));
        if constexpr (!kUnsigned<F>) v = vaddq_s32(v, vdupq_n_s32(corr[2 * r + h]));
        id[r] = v;
    }
}
template <class F>
TV_DOTPROD TV_NOINLINE void micro_dotprod(const Panel &P, const GemmPrep &x, int64_t t, int64_t nb, int nw, int ni, float *y,
                              int64_t ldy) {
    float32x4_t acc[NW];
    for (int r = 0; r < NW; r++) acc[r] = vdupq_n_f32(0);
    constexpr auto q0 = std::integer_sequence<int, 0, 1, 2, 3>();
    constexpr auto q1 = std::integer_sequence<int, 4, 5, 6, 7>();
    for (int64_t b = 0; b < nb; b++) {
        const size_t tb = (size_t)(t * nb + b);
        const int8_t *pw = P.w.data() + (size_t)b * NW * 32, *xh = x.xh.data() + tb * 128, *xl = x.xl.data() + tb * 128;
        const int32_t *corr = P.corr.data() + (size_t)b * NW * 2;
        const float32x4_t dx = vld1q_f32(x.xd.data() + tb * TW);
        int8x16_t wv[2 * NW];
        for (int r = 0; r < 2 * NW; r++) wv[r] = vld1q_s8(pw + 16 * r);
        int32x4_t id[NW];
        for (int r = 0; r < NW; r++) id[r] = vdupq_n_s32(0);
        sdot_half<F>(id, wv, xh, xl, corr, 0, q0);
        if constexpr (F::TWO_SCALES) {  // the first half's dots with its own scale
            fold(acc, id, P.d.data() + b * NW, dx);
            for (int r = 0; r < NW; r++) id[r] = vdupq_n_s32(0);
        }
        sdot_half<F>(id, wv, xh, xl, corr, 1, q1);
        fold(acc, id, (F::TWO_SCALES ? P.d2 : P.d).data() + b * NW, dx);
        fold_min<F>(acc, P.mn.data() + b * NW, x.xs.data() + tb * TW);
    }
    store_tile(acc, nw, ni, t * TW, y, ldy);
}
#endif

// The scales of one block of each of a group's 4 rows, lanes = rows (same products as F::scales:
// the same bits). K formats: the rows' scale integers transposed with zips and converted 4 rows
// at a time (per row in scalar code this was a third of the decode loop).
template <class F>
TV_INLINE void group_scales4(const uint8_t *w0, const size_t *off, float (*d)[2][NW], float (*mn)[NW]) {
    if constexpr (F::D_AT >= 0) {
        for (int r = 0; r < NW; r++) {
            const auto sc = scales<F>(w0 + off[r]);
            d[0][0][r] = d[0][1][r] = sc.d[0][0];
            mn[0][r] = F::HAS_MIN ? sc.m[0][0] : 0.0f;
        }
    } else {
        static_assert(nsc<F>() + (F::HAS_MIN ? F::SLICES : 0) <= 16 && !F::TWO_MINS, "one 16-byte row of integers");
        int8_t v[NW][32] = {};
        float sd[NW], smin[NW] = {};
        for (int r = 0; r < NW; r++) {
            F::scale_ints(w0 + off[r], v[r]);
            sd[r] = half(w0 + off[r] + F::SD_AT);
            if constexpr (F::HAS_MIN) smin[r] = -half(w0 + off[r] + F::SDMIN_AT);
        }
        const int8x16_t r0 = vld1q_s8(v[0]), r1 = vld1q_s8(v[1]), r2 = vld1q_s8(v[2]), r3 = vld1q_s8(v[3]);
        const int16x8_t a = vreinterpretq_s16_s8(vzip1q_s8(r0, r1)), b = vreinterpretq_s16_s8(vzip1q_s8(r2, r3));
        const int16x8_t c = vreinterpretq_s16_s8(vzip2q_s8(r0, r1)), e = vreinterpretq_s16_s8(vzip2q_s8(r2, r3));
        // t[k]: integers 4k..4k+3, each as 4 bytes (rows 0..3)
        const int8x16_t t[4] = {vreinterpretq_s8_s16(vzip1q_s16(a, b)), vreinterpretq_s8_s16(vzip2q_s16(a, b)),
                                vreinterpretq_s8_s16(vzip1q_s16(c, e)), vreinterpretq_s8_s16(vzip2q_s16(c, e))};
        float32x4_t f[16];  // integer i of the 4 rows as floats
        for (int k = 0; k < 4; k++) {
            const int16x8_t lo = vmovl_s8(vget_low_s8(t[k])), hi = vmovl_high_s8(t[k]);
            f[4 * k] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)));
            f[4 * k + 1] = vcvtq_f32_s32(vmovl_high_s16(lo));
            f[4 * k + 2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)));
            f[4 * k + 3] = vcvtq_f32_s32(vmovl_high_s16(hi));
        }
        const float32x4_t vd = vld1q_f32(sd), vm = vld1q_f32(smin);
        for (int s = 0; s < F::SLICES; s++) {
            vst1q_f32(d[s][0], vmulq_f32(vd, f[sc_index<F>(s, 0)]));
            vst1q_f32(d[s][1], vmulq_f32(vd, f[sc_index<F>(s, 1)]));
            vst1q_f32(mn[s], F::HAS_MIN ? vmulq_f32(vm, f[F::HAS_MIN ? mn_index<F>(s, 0) : 0]) : vdupq_n_f32(0));
        }
    }
}

// Decode (NR activation rows) and the driver, per Dot (ATTR: its target attribute).
#define TV_GEMM(ATTR, Dot, DP, MICRO)                                                                     \
    template <class F, int NR, int... S>                                                                  \
    ATTR TV_INLINE void gemv_block_##Dot(const uint8_t *w0, const size_t *off, const ActBlock *x, int64_t nb, \
                                          int64_t b0, float32x4_t *acc, std::integer_sequence<int, S...>) { \
        float d[F::SLICES][2][NW], mn[F::SLICES][NW];                                                     \
        group_scales4<F>(w0, off, d, mn);                                                                 \
        auto slice = [&](auto s_) ATTR {                                                                  \
            constexpr int s = decltype(s_)::value;                                                        \
            typename Dot::Prep p[NW];                                                                     \
            for (int r = 0; r < NW; r++) p[r] = Dot::template prep<F>(unpack<F, s>(w0 + off[r]));        \
            const float32x4_t d0 = vld1q_f32(d[s][0]), d1 = vld1q_f32(d[s][1]), mv = vld1q_f32(mn[s]);   \
            for (int i = 0; i < NR; i++) {                                                                \
                const ActBlock &xb = x[i * nb + b0 + s];                                                  \
                const typename Dot::X xv = Dot::load_x(xb.qs); /* once for the 4 weight rows */          \
                int32x4_t dots[NW], second = vdupq_n_s32(0);                                              \
                for (int r = 0; r < NW; r++) dots[r] = Dot::template dot_x<F>(p[r], xv);                  \
                const int32x4_t first = reduce4(dots, F::TWO_SCALES, &second);                            \
                acc[i] = vfmaq_f32(acc[i], vcvtq_f32_s32(first), vmulq_n_f32(d0, xb.d));                  \
                if constexpr (F::TWO_SCALES) acc[i] = vfmaq_f32(acc[i], vcvtq_f32_s32(second), vmulq_n_f32(d1, xb.d)); \
                if constexpr (F::HAS_MIN) acc[i] = vfmaq_f32(acc[i], mv, vdupq_n_f32(xb.s));              \
            }                                                                                             \
        };                                                                                                \
        (slice(std::integral_constant<int, S>()), ...);                                                   \
    }                                                                                                     \
    template <class F, int NR>                                                                            \
    ATTR TV_NOINLINE void gemv_##Dot(const uint8_t *w, size_t row_bytes, int64_t g0, int64_t r1, const ActBlock *x,  \
                         int64_t nb, float *y, int64_t ldy) {                                             \
        size_t off[NW];                                                                                   \
        group_offsets(g0, r1, row_bytes, off);                                                            \
        const uint8_t *w0 = w + (size_t)g0 * row_bytes;                                                   \
        float32x4_t acc[NR];                                                                              \
        for (int i = 0; i < NR; i++) acc[i] = vdupq_n_f32(0);                                             \
        for (int64_t b0 = 0; b0 < nb; b0 += F::SLICES, w0 += F::BYTES)                                    \
            gemv_block_##Dot<F, NR>(w0, off, x, nb, b0, acc, std::make_integer_sequence<int, F::SLICES>()); \
        const int nw = (int)std::min<int64_t>(NW, r1 - g0);                                               \
        for (int i = 0; i < NR; i++) {                                                                    \
            float t[NW];                                                                                  \
            vst1q_f32(t, acc[i]);                                                                         \
            for (int r = 0; r < nw; r++) y[i * ldy + g0 + r] = t[r];                                      \
        }                                                                                                 \
    }                                                                                                     \
    template <class F>                                                                                    \
    ATTR void gemm_rows_##Dot(const uint8_t *w, size_t row_bytes, int64_t r0, int64_t r1, const GemmPrep &x, \
                              int64_t m, int64_t nb, float *y, int64_t ldy) {                             \
        if (m < GEMM_MIN) {                                                                               \
            for (int64_t g0 = r0; g0 < r1; g0 += NW) switch (m) {                                         \
                    case 1: gemv_##Dot<F, 1>(w, row_bytes, g0, r1, x.x, nb, y, ldy); break;               \
                    case 2: gemv_##Dot<F, 2>(w, row_bytes, g0, r1, x.x, nb, y, ldy); break;               \
                    default: gemv_##Dot<F, 3>(w, row_bytes, g0, r1, x.x, nb, y, ldy); break;              \
                }                                                                                         \
            return;                                                                                       \
        }                                                                                                 \
        static thread_local Panel P;                                                                      \
        for (int64_t g0 = r0; g0 < r1; g0 += NW) {                                                        \
            const int nw = (int)std::min<int64_t>(NW, r1 - g0);                                           \
            fill_panel<F>(P, w, row_bytes, g0, r1, nb);                                                   \
            for (int64_t t = 0; t * TW < m; t++)                                                          \
                MICRO<F>(P, x, t, nb, nw, (int)std::min<int64_t>(TW, m - t * TW), y + g0, ldy);           \
        }                                                                                                 \
    }                                                                                                     \
    ATTR bool gemm_run_##Dot(int dtype, const uint8_t *w, size_t row_bytes, int64_t r0, int64_t r1,      \
                             const void *prep, int64_t m, int64_t nb, float *y, int64_t ldy) {            \
        const GemmPrep &x = *static_cast<const GemmPrep *>(prep);                                         \
        return with_format(dtype, [&](auto f) ATTR {                                                      \
            using F = decltype(f);                                                                        \
            if constexpr (F::TWO_MINS) return false;                                                      \
            else return gemm_rows_##Dot<F>(w, row_bytes, r0, r1, x, m, nb, y, ldy), true;                 \
        });                                                                                               \
    }                                                                                                     \
    const QuantGemm gemm_##Dot = {NW, gemm_prepare<DP>, gemm_run_##Dot};
TV_GEMM(TV_NOATTR, NeonDot, false, micro_neon)
void conv_row(const uint8_t *src, bool f16, float *dst, int hd) {  // hd: any count
    if (f16) {
        const uint16_t *h = reinterpret_cast<const uint16_t *>(src);
        int i = 0;
        for (; i + 4 <= hd; i += 4) vst1q_f32(dst + i, load4(h + i));
        for (; i < hd; i++) dst[i] = fp16_to_fp32(h[i]);
    } else {
        std::memcpy(dst, src, sizeof(float) * hd);
    }
}
TV_DEFINE_ATTN_BLOCK(TV_NOATTR, attn_block, conv_row, exp_in_place_libm)
Kernels make_neon_table() {
    Kernels k = make_kernels("neon", dot<float>, dot<uint16_t>, attn_block, quantize_row_act, swiglu, gelu_tanh_mul);
    k.rows[FmtQ2_K::DTYPE] = rows_NeonDot<FmtQ2_K>;  // per-half mins: the one format its QuantGemm leaves to rows[]
    k.gemm = &gemm_NeonDot;
    return k;
}
const Kernels neon_table = make_neon_table();
#if TV_HAVE_DOTPROD
TV_ROWS(TV_DOTPROD, DotprodDot)
TV_GEMM(TV_DOTPROD, DotprodDot, true, micro_dotprod)
Kernels make_dotprod_table() {
    Kernels k = make_neon_table();
    k.name = "neon_dotprod";
    k.rows[FmtQ2_K::DTYPE] = rows_DotprodDot<FmtQ2_K>;
    k.gemm = &gemm_DotprodDot;
    return k;
}
const Kernels dotprod_table = make_dotprod_table();
#endif

#if TV_HAVE_DOTPROD
bool cpu_has_dotprod() {
#if defined(__APPLE__)
    int v = 0;
    size_t len = sizeof(v);
    return sysctlbyname("hw.optional.arm.FEAT_DotProd", &v, &len, nullptr, 0) == 0 && v != 0;
#elif defined(__linux__)
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#else
    return false;  // no known way to ask: stay on the baseline path
#endif
}
#endif

}  // namespace

const Kernels *kernels_neon_table() { return &neon_table; }  // Advanced SIMD is mandatory on aarch64
const Kernels *kernels_neon_dotprod_table() {
#if TV_HAVE_DOTPROD
    static const bool ok = cpu_has_dotprod();
    return ok ? &dotprod_table : nullptr;
#else
    return nullptr;
#endif
}

}  // namespace tv

#else  // not aarch64 (32-bit ARM builds take the scalar path)

namespace tv {
const Kernels *kernels_neon_table() { return nullptr; }
const Kernels *kernels_neon_dotprod_table() { return nullptr; }
}  // namespace tv

#endif
