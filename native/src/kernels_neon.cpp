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

#include <cmath>
#include <cstring>
#include <utility>

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
inline float half(const uint8_t *p) {
    __fp16 h;
    std::memcpy(&h, p, 2);
    return (float)h;
}

// ---- float dots (both paths) ----------------------------------------------------------------

float dot_f32(const float *w, const float *x, int64_t n) {
    float32x4_t a0 = vdupq_n_f32(0), a1 = a0, a2 = a0, a3 = a0;  // 4 chains hide FMA latency
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = vfmaq_f32(a0, vld1q_f32(w + i), vld1q_f32(x + i));
        a1 = vfmaq_f32(a1, vld1q_f32(w + i + 4), vld1q_f32(x + i + 4));
        a2 = vfmaq_f32(a2, vld1q_f32(w + i + 8), vld1q_f32(x + i + 8));
        a3 = vfmaq_f32(a3, vld1q_f32(w + i + 12), vld1q_f32(x + i + 12));
    }
    for (; i + 4 <= n; i += 4) a0 = vfmaq_f32(a0, vld1q_f32(w + i), vld1q_f32(x + i));
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
    for (; i < n; i++) s = std::fma(w[i], x[i], s);
    return s;
}

// FCVTL (half -> float) is baseline ARMv8 Advanced SIMD: no +fp16 extension needed.
inline float32x4_t load_h4(const uint16_t *p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }

float dot_f16(const uint16_t *w, const float *x, int64_t n) {
    float32x4_t a0 = vdupq_n_f32(0), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = vfmaq_f32(a0, load_h4(w + i), vld1q_f32(x + i));
        a1 = vfmaq_f32(a1, load_h4(w + i + 4), vld1q_f32(x + i + 4));
        a2 = vfmaq_f32(a2, load_h4(w + i + 8), vld1q_f32(x + i + 8));
        a3 = vfmaq_f32(a3, load_h4(w + i + 12), vld1q_f32(x + i + 12));
    }
    for (; i + 4 <= n; i += 4) a0 = vfmaq_f32(a0, load_h4(w + i), vld1q_f32(x + i));
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
    for (; i < n; i++) s = std::fma(fp16_to_fp32(w[i]), x[i], s);
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
// (as fast as before the traits); K super-blocks go through F::scales, once per block of a
// weight row (shared by its NX activation rows).
template <class F>
struct Scales {
    BlockScales<F::SLICES> s;
    TV_INLINE explicit Scales(const uint8_t *w) {
        if constexpr (F::D_AT >= 0) {
            s.d[0][0] = half(w + F::D_AT);
            if constexpr (F::HAS_MIN) s.m[0][0] = half(w + F::M_AT);
        } else {
            F::scales(w, s);
        }
    }
    TV_INLINE float d(int sl) const { return s.d[sl][0]; }
    TV_INLINE float m(int sl) const { return s.m[sl][0]; }
    // {h0, h0, h1, h1}: per-half values in the lane layout of a TWO_SCALES integer dot
    TV_INLINE static float32x4_t halves(const float *h) { return vcombine_f32(vdup_n_f32(h[0]), vdup_n_f32(h[1])); }
};

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
    template <class F>
    TV_INLINE static int32x4_t dot(const Prep &p, const int16_t *x) {
        if constexpr (F::TWO_SCALES) {  // one chain pair per half, kept apart
            int32x4_t h[2];
            for (int k = 0; k < 2; k++) {
                const int16x8_t x0 = vld1q_s16(x + 16 * k), x1 = vld1q_s16(x + 16 * k + 8);
                int32x4_t a0 = vmull_s16(vget_low_s16(p.w[2 * k]), vget_low_s16(x0)), a1 = vmull_high_s16(p.w[2 * k], x0);
                a0 = vmlal_s16(a0, vget_low_s16(p.w[2 * k + 1]), vget_low_s16(x1));
                a1 = vmlal_high_s16(a1, p.w[2 * k + 1], x1);
                h[k] = vaddq_s32(a0, a1);
            }
            return vpaddq_s32(h[0], h[1]);
        } else {
            // two chains of 4 (low / high halves): in-order cores (A53/A55) do not overlap one chain of 8
            int16x8_t xv = vld1q_s16(x);
            int32x4_t a0 = vmull_s16(vget_low_s16(p.w[0]), vget_low_s16(xv)), a1 = vmull_high_s16(p.w[0], xv);
            for (int k = 1; k < 4; k++) {
                xv = vld1q_s16(x + 8 * k);
                a0 = vmlal_s16(a0, vget_low_s16(p.w[k]), vget_low_s16(xv));
                a1 = vmlal_high_s16(a1, p.w[k], xv);
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
        int32x4_t corr;  // 128 * sum(w), in the lane layout of dot() (zero for unsigned weights)
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
    template <class F>
    TV_DOTPROD TV_INLINE static int32x4_t dot(const Prep &p, const int16_t *x) {
        const int8_t *xb = reinterpret_cast<const int8_t *>(x);  // bytes lo0 hi0 lo1 hi1 ...
        const int8x16_t xa0 = vld1q_s8(xb), xa1 = vld1q_s8(xb + 16);  // values 0..15
        const int8x16_t xb0 = vld1q_s8(xb + 32), xb1 = vld1q_s8(xb + 48);  // values 16..31
        const int8x16_t ha = vuzp2q_s8(xa0, xa1), hb = vuzp2q_s8(xb0, xb1);  // x >> 8
        const int32x4_t hi = sdot2<F>(p.w.a, ha, p.w.b, hb);
        int32x4_t lo;
        if constexpr (kUnsigned<F>) {  // x & 255 as uint8 against weights >= 0
            lo = udot2<F>(vreinterpretq_u8_s8(p.w.a), vreinterpretq_u8_s8(vuzp1q_s8(xa0, xa1)),
                          vreinterpretq_u8_s8(p.w.b), vreinterpretq_u8_s8(vuzp1q_s8(xb0, xb1)));
        } else {  // (x & 255) - 128: flipping bit 7 of the low byte
            const int8x16_t flip = vdupq_n_s8(-128);
            lo = vaddq_s32(sdot2<F>(p.w.a, veorq_s8(vuzp1q_s8(xa0, xa1), flip), p.w.b, veorq_s8(vuzp1q_s8(xb0, xb1), flip)),
                           p.corr);
        }
        return vaddq_s32(vshlq_n_s32(hi, 8), lo);
    }
};
#endif

// The row kernels, per Dot. One slice against NX activation rows: the weights are unpacked once,
// then per row an exact integer dot and the float work of that slice. A row's float operations
// are the same for every NX (explicit FMAs, fixed order), so results are batch invariant.
// Slices alternate between two accumulator sets (even / odd) to hide the FMA latency; for
// 32-value blocks that is even / odd blocks, as rows_nx swaps the sets every other block.
#define TV_ROWS(ATTR, Dot)                                                                               \
    template <class F, int NX, int S>                                                                    \
    ATTR TV_INLINE void slice_##Dot(const uint8_t *w, const ActBlock *x, int64_t nb, const Scales<F> &sc, \
                                    float32x4_t *acc, float *macc) {                                     \
        const auto p = Dot::template prep<F>(unpack<F, S>(w));                                           \
        float32x4_t dv, mv;                                                                              \
        if constexpr (F::TWO_SCALES) dv = Scales<F>::halves(sc.s.d[S]);                                  \
        if constexpr (F::TWO_MINS) mv = Scales<F>::halves(sc.s.m[S]);                                    \
        for (int i = 0; i < NX; i++) {                                                                   \
            const ActBlock &xb = x[i * nb + S];                                                          \
            const float32x4_t isum = vcvtq_f32_s32(Dot::template dot<F>(p, xb.qs));                      \
            if constexpr (F::TWO_SCALES) acc[i] = vfmaq_f32(acc[i], isum, vmulq_n_f32(dv, xb.d));        \
            else acc[i] = vfmaq_f32(acc[i], isum, vdupq_n_f32(sc.d(S) * xb.d));                          \
            if constexpr (F::TWO_MINS)                                                                   \
                acc[i] = vfmaq_f32(acc[i], vcvtq_f32_s32(xsum_halves(xb.qs)), vmulq_n_f32(mv, xb.d));    \
            else if constexpr (F::HAS_MIN)                                                               \
                macc[i] = std::fma(sc.m(S), xb.s, macc[i]); /* sum_j m x_j = m * d_x * sum(q_x) */       \
        }                                                                                                \
    }                                                                                                    \
    template <class F, int NX, int... S>                                                                 \
    ATTR TV_INLINE void block_##Dot(const uint8_t *w, const ActBlock *x, int64_t nb, float32x4_t *acc0,  \
                                    float32x4_t *acc1, float *macc, std::integer_sequence<int, S...>) {  \
        const Scales<F> sc(w);                                                                           \
        (slice_##Dot<F, NX, S>(w, x, nb, sc, S % 2 ? acc1 : acc0, macc), ...);                           \
    }                                                                                                    \
    template <class F, int NX>                                                                           \
    ATTR void rows_nx_##Dot(const uint8_t *w, const ActBlock *x, int64_t nb, float *out, int64_t out_stride) { \
        constexpr auto slices = std::make_integer_sequence<int, F::SLICES>();                            \
        float32x4_t acc0[NX], acc1[NX];                                                                  \
        float macc[NX];                                                                                  \
        for (int i = 0; i < NX; i++) acc0[i] = acc1[i] = vdupq_n_f32(0), macc[i] = 0.0f;                \
        int64_t b = 0;                                                                                   \
        if constexpr (F::SLICES == 1) {                                                                  \
            for (; b + 2 <= nb; b += 2, w += 2 * F::BYTES) {                                             \
                block_##Dot<F, NX>(w, x + b, nb, acc0, acc1, macc, slices);                              \
                block_##Dot<F, NX>(w + F::BYTES, x + b + 1, nb, acc1, acc0, macc, slices);               \
            }                                                                                            \
            if (b < nb) block_##Dot<F, NX>(w, x + b, nb, acc0, acc1, macc, slices);                      \
        } else {                                                                                         \
            for (; b < nb; b += F::SLICES, w += F::BYTES) block_##Dot<F, NX>(w, x + b, nb, acc0, acc1, macc, slices); \
        }                                                                                                \
        for (int i = 0; i < NX; i++) out[i * out_stride] = vaddvq_f32(vaddq_f32(acc0[i], acc1[i])) + macc[i]; \
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
void conv_row(const uint8_t *src, bool f16, float *dst, int hd) {  // hd: any count
    if (f16) {
        const uint16_t *h = reinterpret_cast<const uint16_t *>(src);
        int i = 0;
        for (; i + 4 <= hd; i += 4) vst1q_f32(dst + i, load_h4(h + i));
        for (; i < hd; i++) dst[i] = fp16_to_fp32(h[i]);
    } else {
        std::memcpy(dst, src, sizeof(float) * hd);
    }
}
TV_DEFINE_ATTN_BLOCK(TV_NOATTR, attn_block, conv_row, exp_in_place_libm)
Kernels make_neon_table() {
    Kernels k = make_kernels("neon", dot_f32, dot_f16, attn_block, quantize_row_act, swiglu, gelu_tanh_mul);
#define TV_SET_ROWS(F) k.rows[F::DTYPE] = rows_NeonDot<F>;
    TV_QUANT_FORMATS(TV_SET_ROWS)
#undef TV_SET_ROWS
    return k;
}
const Kernels neon_table = make_neon_table();
#if TV_HAVE_DOTPROD
TV_ROWS(TV_DOTPROD, DotprodDot)
Kernels make_dotprod_table() {
    Kernels k = make_neon_table();
    k.name = "neon_dotprod";
#define TV_SET_ROWS(F) k.rows[F::DTYPE] = rows_DotprodDot<F>;
    TV_QUANT_FORMATS(TV_SET_ROWS)
#undef TV_SET_ROWS
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
