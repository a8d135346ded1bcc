// Portable kernels: integer dots per 32-value slice (or 16-value half; exact in int32: |w| <= 128,
// |x| <= 32767, 32 terms), scaled in float. They define the numbers the SIMD paths must reproduce
// up to float summation order, and run every format a SIMD path has no kernel of its own for.
#include <cstring>

#include "attn_block.h"
#include "formats.h"
#include "kernels.h"
#include "ops.h"

namespace tv {
namespace {

template <class F>
float dot_row(const uint8_t *w, const ActBlock *x, int64_t nb) {
    float acc = 0.0f, macc = 0.0f;
    BlockScales<F::SLICES> sc{};  // m stays 0 for formats without a min
    int8_t q[QK];
    for (int64_t b = 0; b < nb; b += F::SLICES, w += F::BYTES) {
        F::scales(w, sc);
        for (int s = 0; s < F::SLICES; s++) {
            const ActBlock &xb = x[b + s];
            // the slice's integer dot (per 16-value half when the halves have their own scales);
            // simple loops into one accumulator vectorize well
            int lo = 0, hi = 0;
            int &h1 = F::TWO_SCALES ? hi : lo;
            const SliceSrc src = F::src(s);
            if constexpr (F::HIGH == HIGH_NONE && !F::HAS_TABLE && F::LOW == LOW_NIB16) {
                const uint8_t *qs = w + src.lo;  // straight from the bytes: no unpacked copy
                for (int j = 0; j < 16; j++) lo += ((qs[j] & 15) - F::OFFSET) * xb.qs[j];
                for (int j = 0; j < 16; j++) h1 += ((qs[j] >> 4) - F::OFFSET) * xb.qs[j + 16];
            } else if constexpr (F::HIGH == HIGH_NONE && !F::HAS_TABLE && F::LOW == LOW_I8 && !F::TWO_SCALES) {
                const int8_t *qs = reinterpret_cast<const int8_t *>(w + src.lo);
                for (int j = 0; j < QK; j++) lo += qs[j] * xb.qs[j];
            } else {
                unpack_slice<F>(w, s, q);
                for (int j = 0; j < 16; j++) lo += q[j] * xb.qs[j];
                for (int j = 16; j < QK; j++) h1 += q[j] * xb.qs[j];
            }
            if (F::TWO_SCALES) acc += sc.d[s][0] * xb.d * (float)lo + sc.d[s][1] * xb.d * (float)hi;
            else acc += sc.d[s][0] * xb.d * (float)lo;
            if (F::TWO_MINS) {  // sum_j m_h * x_j per half: m_h * d_x * sum(q_x)
                int slo = 0, shi = 0;
                for (int j = 0; j < 16; j++) slo += xb.qs[j], shi += xb.qs[j + 16];
                macc += sc.m[s][0] * xb.d * (float)slo + sc.m[s][1] * xb.d * (float)shi;
            } else if (F::HAS_MIN) {
                macc += sc.m[s][0] * xb.s;  // sum_j m * x_j = m * d_x * sum(q_x)
            }
        }
    }
    return acc + macc;
}

template <class F>
void rows(const uint8_t *w, const ActBlock *x, int64_t nb, int nx, float *out, int64_t out_stride) {
    for (int i = 0; i < nx; i++) out[i * out_stride] = dot_row<F>(w, x + i * nb, nb);
}

// 8 independent partial sums: lets the compiler vectorize without -ffast-math.
float dot_f32(const float *w, const float *x, int64_t n) {
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) acc[l] += w[i + l] * x[i + l];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; i < n; i++) s += w[i] * x[i];
    return s;
}

float dot_f16(const uint16_t *w, const float *x, int64_t n) {
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) acc[l] += fp16_to_fp32(w[i + l]) * x[i + l];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; i < n; i++) s += fp16_to_fp32(w[i]) * x[i];
    return s;
}

void conv_row(const uint8_t *src, bool f16, float *dst, int hd) {  // hd: any count
    if (f16)
        for (int i = 0; i < hd; i++) dst[i] = fp16_to_fp32(load_u16(src + 2 * i));
    else
        std::memcpy(dst, src, sizeof(float) * hd);
}
TV_DEFINE_ATTN_BLOCK(, attn_block, conv_row, exp_in_place_libm)

}  // namespace

Kernels make_kernels(const char *name, decltype(Kernels::dot_f32) dot_f32_, decltype(Kernels::dot_f16) dot_f16_,
                     decltype(Kernels::attn_block) attn_block_, decltype(Kernels::quantize_act) quantize_act,
                     decltype(Kernels::silu_mul) silu_mul, decltype(Kernels::gelu_mul) gelu_mul) {
    Kernels k{name, {}, nullptr, dot_f32_, dot_f16_, attn_block_, quantize_act, silu_mul, gelu_mul};
#define TV_ROWS(F) k.rows[F::DTYPE] = rows<F>;
    TV_QUANT_FORMATS(TV_ROWS)
#undef TV_ROWS
    return k;
}

const Kernels kernels_scalar = make_kernels("scalar", dot_f32, dot_f16, attn_block, quantize_row_act, swiglu, gelu_tanh_mul);

}  // namespace tv
