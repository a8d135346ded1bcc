// AArch64 kernels: "neon" (ARMv8.0 Advanced SIMD, every aarch64 CPU: Cortex-A53/A57/A72, Jetson
// Nano, Pi 3/4) and "neon_dotprod" (ARMv8.2 SDOT/UDOT: Cortex-A55/A76/A78, Jetson Orin, Pi 5,
// Apple M*). The dotprod functions carry a per-function target attribute instead of a global
// -march flag, so one binary runs everywhere and the table is handed out only when the CPU
// reports FEAT_DotProd (SDOT is SIGILL on a Cortex-A72).
//
// Integer block dot, neon: weights widened to int16, vmlal_s16 against the int16 activations
// into int32 lanes (exact: |w| <= 128, |x| <= 32767, 8 terms per lane).
//
// Integer block dot, dotprod: SDOT is int8 x int8, activations are int16. Each x is split as
//     x = 256 * hi + lo + 128,   hi = x >> 8 (its high byte, signed),  lo = (x & 255) - 128
// hi and lo both lie in [-128, 127] for every int16 x (-32768 and 32767 included; the plain
// split x = 256*hi + lo with both halves signed only reaches +32639, hence the +128 offset), so
//     w.x = 256 * sdot(w, hi) + sdot(w, lo) + 128 * sum(w)
// where sum(w) is one more SDOT against ones, computed once per weight block and shared by all
// activation rows. Q4_1's weights are unsigned (0..15), so it takes lo = x & 255 with UDOT and
// needs no correction. Both halves are one UZP1/UZP2 of the int16 bytes (little endian).
// Per-lane bounds: 256 * 8 * 128 * 128 + 8 * 128 * 128 + 128 * 8 * 128 < 2^31.
#include "attn_block.h"
#include "kernels.h"
#include "ops.h"
#include "tinyvllm.h"

#if defined(__aarch64__)

#include <arm_neon.h>

#include <cmath>
#include <cstring>

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


void axpy_f16(float a, const uint16_t *v, float *y, int64_t n) {
    const float32x4_t va = vdupq_n_f32(a);
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_f32(vld1q_f32(y + i), va, load_h4(v + i)));
    for (; i < n; i++) y[i] = std::fma(a, fp16_to_fp32(v[i]), y[i]);
}

// ---- weight blocks as int8: a = values 0..15, b = values 16..31 (GGML nibble order) ----------

struct W8 {
    int8x16_t a, b;
};
inline W8 nibbles(const uint8_t *qs) {
    const uint8x16_t q = vld1q_u8(qs);
    return {vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0x0F))), vreinterpretq_s8_u8(vshrq_n_u8(q, 4))};
}
struct FmtQ4_0 {
    static constexpr size_t BYTES = 18, QS = 2;
    static constexpr bool HAS_MIN = false, UNSIGNED = false;
    static W8 weights(const uint8_t *w) {
        const W8 n = nibbles(w + QS);
        return {vsubq_s8(n.a, vdupq_n_s8(8)), vsubq_s8(n.b, vdupq_n_s8(8))};
    }
};
struct FmtQ4_1 {
    static constexpr size_t BYTES = 20, QS = 4;
    static constexpr bool HAS_MIN = true, UNSIGNED = true;  // 0..15: UDOT-able
    static W8 weights(const uint8_t *w) { return nibbles(w + QS); }
};
struct FmtQ8_0 {
    static constexpr size_t BYTES = 34, QS = 2;
    static constexpr bool HAS_MIN = false, UNSIGNED = false;
    static W8 weights(const uint8_t *w) {
        return {vld1q_s8(reinterpret_cast<const int8_t *>(w + QS)), vld1q_s8(reinterpret_cast<const int8_t *>(w + QS + 16))};
    }
};

// ---- neon: int16 multiply-accumulate ---------------------------------------------------------

struct NeonDot {
    struct Prep {  // weights widened once per block, shared by the NX activation rows
        int16x8_t w[4];
    };
    static Prep prep(const W8 &w) {
        return {{vmovl_s8(vget_low_s8(w.a)), vmovl_high_s8(w.a), vmovl_s8(vget_low_s8(w.b)), vmovl_high_s8(w.b)}};
    }
    template <bool UNSIGNED>
    static int32x4_t dot(const Prep &p, const int16_t *x) {
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
};

#if TV_HAVE_DOTPROD
// ---- dotprod: SDOT on the split activations (see the header comment) -------------------------

struct DotprodDot {
    struct Prep {
        W8 w;
        int32x4_t corr;  // 128 * sum(w) per lane (zero for unsigned weights)
    };
    template <bool UNSIGNED>
    TV_DOTPROD static Prep prep_t(const W8 &w) {
        if (UNSIGNED) return {w, vdupq_n_s32(0)};
        const int8x16_t ones = vdupq_n_s8(1);
        return {w, vshlq_n_s32(vdotq_s32(vdotq_s32(vdupq_n_s32(0), w.a, ones), w.b, ones), 7)};
    }
    template <bool UNSIGNED>
    TV_DOTPROD static int32x4_t dot(const Prep &p, const int16_t *x) {
        const int8_t *xb = reinterpret_cast<const int8_t *>(x);  // bytes lo0 hi0 lo1 hi1 ...
        const int8x16_t xa0 = vld1q_s8(xb), xa1 = vld1q_s8(xb + 16);  // values 0..15
        const int8x16_t xb0 = vld1q_s8(xb + 32), xb1 = vld1q_s8(xb + 48);  // values 16..31
        const int8x16_t ha = vuzp2q_s8(xa0, xa1), hb = vuzp2q_s8(xb0, xb1);  // x >> 8
        int32x4_t hi = vdotq_s32(vdotq_s32(vdupq_n_s32(0), p.w.a, ha), p.w.b, hb);
        int32x4_t lo;
        if (UNSIGNED) {  // x & 255 as uint8 against 0..15 weights
            const uint8x16_t la = vreinterpretq_u8_s8(vuzp1q_s8(xa0, xa1)), lb = vreinterpretq_u8_s8(vuzp1q_s8(xb0, xb1));
            lo = vreinterpretq_s32_u32(vdotq_u32(vdotq_u32(vdupq_n_u32(0), vreinterpretq_u8_s8(p.w.a), la),
                                                 vreinterpretq_u8_s8(p.w.b), lb));
        } else {  // (x & 255) - 128: flipping bit 7 of the low byte
            const int8x16_t flip = vdupq_n_s8(-128);
            const int8x16_t la = veorq_s8(vuzp1q_s8(xa0, xa1), flip), lb = veorq_s8(vuzp1q_s8(xb0, xb1), flip);
            lo = vaddq_s32(vdotq_s32(vdotq_s32(vdupq_n_s32(0), p.w.a, la), p.w.b, lb), p.corr);
        }
        return vaddq_s32(vshlq_n_s32(hi, 8), lo);
    }
};
#endif

// One weight block against NX activation rows; a row's float operations are the same for every
// NX (explicit FMAs, fixed order), so results are batch invariant.
#define TV_BLOCK_STEP(ATTR, Dot, Prep_expr)                                                              \
    template <class Fmt, int NX>                                                                         \
    ATTR inline void step_##Dot(const uint8_t *w, const ActBlock *x, int64_t nb, float32x4_t *acc, float *macc) { \
        const auto p = Prep_expr;                                                                        \
        const float dw = half(w);                                                                        \
        for (int i = 0; i < NX; i++) {                                                                   \
            const ActBlock &xb = x[i * nb];                                                              \
            const int32x4_t isum = Dot::template dot<Fmt::UNSIGNED>(p, xb.qs);                           \
            acc[i] = vfmaq_f32(acc[i], vcvtq_f32_s32(isum), vdupq_n_f32(dw * xb.d));                     \
            if (Fmt::HAS_MIN) macc[i] = std::fma(half(w + 2), xb.s, macc[i]);                            \
        }                                                                                                \
    }
TV_BLOCK_STEP(TV_NOATTR, NeonDot, NeonDot::prep(Fmt::weights(w)))
#if TV_HAVE_DOTPROD
TV_BLOCK_STEP(TV_DOTPROD, DotprodDot, DotprodDot::template prep_t<Fmt::UNSIGNED>(Fmt::weights(w)))
#endif

// Two accumulator sets (even / odd blocks) hide the FMA latency, for every NX alike.
#define TV_ROWS(ATTR, Dot)                                                                               \
    template <class Fmt, int NX>                                                                         \
    ATTR void rows_nx_##Dot(const uint8_t *w, const ActBlock *x, int64_t nb, float *out, int64_t out_stride) { \
        float32x4_t acc0[NX], acc1[NX];                                                                  \
        float macc[NX];                                                                                  \
        for (int i = 0; i < NX; i++) acc0[i] = acc1[i] = vdupq_n_f32(0), macc[i] = 0.0f;                \
        int64_t b = 0;                                                                                   \
        for (; b + 2 <= nb; b += 2, w += 2 * Fmt::BYTES) {                                               \
            step_##Dot<Fmt, NX>(w, x + b, nb, acc0, macc);                                               \
            step_##Dot<Fmt, NX>(w + Fmt::BYTES, x + b + 1, nb, acc1, macc);                              \
        }                                                                                                \
        if (b < nb) step_##Dot<Fmt, NX>(w, x + b, nb, acc0, macc);                                       \
        for (int i = 0; i < NX; i++) out[i * out_stride] = vaddvq_f32(vaddq_f32(acc0[i], acc1[i])) + macc[i]; \
    }                                                                                                    \
    template <class Fmt>                                                                                 \
    ATTR void rows_##Dot(const uint8_t *w, const ActBlock *x, int64_t nb, int nx, float *out, int64_t out_stride) { \
        switch (nx) {                                                                                    \
            case 1: rows_nx_##Dot<Fmt, 1>(w, x, nb, out, out_stride); break;                             \
            case 2: rows_nx_##Dot<Fmt, 2>(w, x, nb, out, out_stride); break;                             \
            case 3: rows_nx_##Dot<Fmt, 3>(w, x, nb, out, out_stride); break;                             \
            default: rows_nx_##Dot<Fmt, 4>(w, x, nb, out, out_stride); break;                            \
        }                                                                                                \
    }
TV_ROWS(TV_NOATTR, NeonDot)
void conv_row(const uint8_t *src, bool f16, float *dst, int hd) {  // hd: any count
    if (f16) {
        std::memset(dst, 0, sizeof(float) * hd);
        axpy_f16(1.0f, reinterpret_cast<const uint16_t *>(src), dst, hd);  // 1 * v + 0: exact
    } else {
        std::memcpy(dst, src, sizeof(float) * hd);
    }
}
TV_DEFINE_ATTN_BLOCK(TV_NOATTR, attn_block, conv_row)
Kernels make_neon_table() {
    Kernels k = kernels_with_scalar_rows("neon");
    k.rows[TV_Q4_0] = rows_NeonDot<FmtQ4_0>;
    k.rows[TV_Q4_1] = rows_NeonDot<FmtQ4_1>;
    k.rows[TV_Q8_0] = rows_NeonDot<FmtQ8_0>;
    k.dot_f32 = dot_f32;
    k.dot_f16 = dot_f16;
    k.attn_block = attn_block;
    k.quantize_act = quantize_row_act;
    k.silu_mul = swiglu;
    return k;
}
const Kernels neon_table = make_neon_table();
#if TV_HAVE_DOTPROD
TV_ROWS(TV_DOTPROD, DotprodDot)
Kernels make_dotprod_table() {
    Kernels k = make_neon_table();
    k.name = "neon_dotprod";
    k.rows[TV_Q4_0] = rows_DotprodDot<FmtQ4_0>;
    k.rows[TV_Q4_1] = rows_DotprodDot<FmtQ4_1>;
    k.rows[TV_Q8_0] = rows_DotprodDot<FmtQ8_0>;
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
