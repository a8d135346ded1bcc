// Portable kernels: integer dots per block (exact in int32: |w| <= 128, |x| <= 32767, 32 terms),
// scaled in float. They define the numbers the
// SIMD paths must reproduce up to float summation order.
#include <cstring>

#include "fp16.h"
#include "attn_block.h"
#include "kernels.h"
#include "ops.h"

namespace tv {
namespace {

float dot_q4_0(const uint8_t *w, const ActBlock *x, int64_t nb) {
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++, w += Q4_0_BYTES) {
        const uint8_t *qs = w + 2;
        int isum = 0;  // two simple loops (low nibbles, high nibbles) vectorize well
        for (int j = 0; j < 16; j++) isum += ((qs[j] & 0xF) - 8) * x[b].qs[j];
        for (int j = 0; j < 16; j++) isum += ((qs[j] >> 4) - 8) * x[b].qs[j + 16];
        acc += fp16_to_fp32(load_u16(w)) * x[b].d * (float)isum;
    }
    return acc;
}

float dot_q4_1(const uint8_t *w, const ActBlock *x, int64_t nb) {
    float acc = 0.0f, macc = 0.0f;
    for (int64_t b = 0; b < nb; b++, w += Q4_1_BYTES) {
        const uint8_t *qs = w + 4;
        int isum = 0;
        for (int j = 0; j < 16; j++) isum += (qs[j] & 0xF) * x[b].qs[j];
        for (int j = 0; j < 16; j++) isum += (qs[j] >> 4) * x[b].qs[j + 16];
        acc += fp16_to_fp32(load_u16(w)) * x[b].d * (float)isum;
        macc += fp16_to_fp32(load_u16(w + 2)) * x[b].s;  // sum_j m * x_j = m * d_x * sum(q_x)
    }
    return acc + macc;
}

float dot_q8_0(const uint8_t *w, const ActBlock *x, int64_t nb) {
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++, w += Q8_0_BYTES) {
        const int8_t *qs = reinterpret_cast<const int8_t *>(w + 2);
        int isum = 0;
        for (int j = 0; j < QK; j++) isum += qs[j] * x[b].qs[j];
        acc += fp16_to_fp32(load_u16(w)) * x[b].d * (float)isum;
    }
    return acc;
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

void axpy_f32(float a, const float *v, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * v[i];
}

void axpy_f16(float a, const uint16_t *v, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * fp16_to_fp32(v[i]);
}

template <float (*DOT)(const uint8_t *, const ActBlock *, int64_t)>
void rows(const uint8_t *w, const ActBlock *x, int64_t nb, int nx, float *out, int64_t out_stride) {
    for (int i = 0; i < nx; i++) out[i * out_stride] = DOT(w, x + i * nb, nb);
}

}  // namespace

namespace {
void conv_row(const uint8_t *src, bool f16, float *dst, int hd) {  // hd: any count
    if (f16)
        for (int i = 0; i < hd; i++) dst[i] = fp16_to_fp32(load_u16(src + 2 * i));
    else
        std::memcpy(dst, src, sizeof(float) * hd);
}
TV_DEFINE_ATTN_BLOCK(, attn_block, conv_row)
}  // namespace

const Kernels kernels_scalar = {"scalar", rows<dot_q4_0>, rows<dot_q4_1>, rows<dot_q8_0>, dot_f32, dot_f16, axpy_f32, axpy_f16, attn_block,
                                  quantize_row_act, swiglu};

}  // namespace tv
