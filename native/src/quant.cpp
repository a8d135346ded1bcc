// Block formats: sizes, dequantization (the reference every kernel is tested against) and the
// per-row activation quantizer shared by all kernel paths (so paths see identical int16 inputs).
#include "quant.h"

#include <cmath>
#include <cstring>

#include "fp16.h"
#include "tinyvllm.h"

namespace tv {

bool dtype_known(int dtype) {
    return dtype == TV_F32 || dtype == TV_F16 || dtype == TV_Q4_0 || dtype == TV_Q4_1 || dtype == TV_Q8_0;
}

bool dtype_quantized(int dtype) { return dtype == TV_Q4_0 || dtype == TV_Q4_1 || dtype == TV_Q8_0; }

const char *dtype_name(int dtype) {
    switch (dtype) {
        case TV_F32: return "F32";
        case TV_F16: return "F16";
        case TV_Q4_0: return "Q4_0";
        case TV_Q4_1: return "Q4_1";
        case TV_Q8_0: return "Q8_0";
        default: return "unknown";
    }
}

size_t row_bytes(int dtype, int64_t cols) {
    if (cols <= 0 || cols > (int64_t(1) << 40)) return 0;
    const size_t n = (size_t)cols;
    switch (dtype) {
        case TV_F32: return n * 4;
        case TV_F16: return n * 2;
        case TV_Q4_0: return n % QK ? 0 : n / QK * Q4_0_BYTES;
        case TV_Q4_1: return n % QK ? 0 : n / QK * Q4_1_BYTES;
        case TV_Q8_0: return n % QK ? 0 : n / QK * Q8_0_BYTES;
        default: return 0;
    }
}

void dequantize_row(int dtype, const void *row, float *out, int64_t cols) {
    const uint8_t *p = static_cast<const uint8_t *>(row);
    const int64_t nb = cols / QK;
    switch (dtype) {
        case TV_F32:
            std::memcpy(out, row, (size_t)cols * 4);
            return;
        case TV_F16:
            for (int64_t i = 0; i < cols; i++) out[i] = fp16_to_fp32(load_u16(p + 2 * i));
            return;
        case TV_Q4_0:
            for (int64_t b = 0; b < nb; b++, p += Q4_0_BYTES, out += QK) {
                const float d = fp16_to_fp32(load_u16(p));
                const uint8_t *qs = p + 2;
                for (int j = 0; j < 16; j++) {
                    out[j] = (float)((qs[j] & 0xF) - 8) * d;
                    out[j + 16] = (float)((qs[j] >> 4) - 8) * d;
                }
            }
            return;
        case TV_Q4_1:
            for (int64_t b = 0; b < nb; b++, p += Q4_1_BYTES, out += QK) {
                const float d = fp16_to_fp32(load_u16(p)), m = fp16_to_fp32(load_u16(p + 2));
                const uint8_t *qs = p + 4;
                for (int j = 0; j < 16; j++) {
                    out[j] = (float)(qs[j] & 0xF) * d + m;
                    out[j + 16] = (float)(qs[j] >> 4) * d + m;
                }
            }
            return;
        case TV_Q8_0:
            for (int64_t b = 0; b < nb; b++, p += Q8_0_BYTES, out += QK) {
                const float d = fp16_to_fp32(load_u16(p));
                const int8_t *qs = reinterpret_cast<const int8_t *>(p + 2);
                for (int j = 0; j < QK; j++) out[j] = (float)qs[j] * d;
            }
            return;
        default:
            return;
    }
}

void quantize_row_act(const float *x, ActBlock *out, int64_t cols) {
    const float qmax = (float)ACT_MAX;
    for (int64_t b = 0; b < cols / QK; b++, x += QK) {
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) {
            const float a = std::fabs(x[j]);
            amax = a > amax ? a : amax;  // not std::fmax: that is a libm call here
        }
        const float d = amax / qmax, id = d > 0.0f ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            // |v| <= ACT_MAX by construction (unless inf/nan, or a rounding hair above): round to
            // nearest-even by adding and removing 1.5 * 2^23 (what nearbyint does in the default
            // rounding mode, without its libm call; the loop vectorizes).
            const float v = x[j] * id;
            float r = (v + 12582912.0f) - 12582912.0f;
            if (!(std::fabs(v) <= qmax)) r = v > 0.0f ? qmax : (v < 0.0f ? -qmax : 0.0f);
            const int q = (int)r;
            out[b].qs[j] = (int16_t)q;
            sum += q;
        }
        out[b].d = d;
        out[b].s = d * (float)sum;
    }
}

}  // namespace tv
