// Dtype facts, dequantization (the reference every kernel is tested against, through the same
// format traits) and the per-row activation quantizer shared by all kernel paths (so paths see
// identical int16 inputs).
#include "quant.h"

#include <cmath>
#include <cstring>
#include <string>

#include "formats.h"
#include "tinyvllm.h"

namespace tv {

namespace {

struct DtypeInfo {
    const char *name;
    int values, bytes;  // per block; 0 for unknown ids
};

constexpr DtypeInfo info(int dtype) {
#define TV_INFO(F) \
    if (dtype == F::DTYPE) return {#F + 3, F::VALUES, F::BYTES};
    TV_QUANT_FORMATS(TV_INFO)
#undef TV_INFO
    if (dtype == TV_F32) return {"F32", 1, 4};
    if (dtype == TV_F16) return {"F16", 1, 2};
    return {"unknown", 0, 0};
}

template <class F>
void dequantize_fmt(const uint8_t *p, float *out, int64_t cols) {
    BlockScales<F::SLICES> sc{};  // m stays 0 for formats without a min
    int8_t q[QK];
    for (int64_t b = 0; b < cols / F::VALUES; b++, p += F::BYTES) {
        F::scales(p, sc);
        for (int s = 0; s < F::SLICES; s++, out += QK) {
            unpack_slice<F>(p, s, q);
            for (int j = 0; j < QK; j++) out[j] = sc.d[s][j / 16] * (float)q[j] + sc.m[s][j / 16];
        }
    }
}

}  // namespace

bool dtype_known(int dtype) { return info(dtype).values > 0; }

bool dtype_quantized(int dtype) { return info(dtype).values >= QK; }

const char *dtype_name(int dtype) { return info(dtype).name; }

const char *dtype_names_supported() {
#define TV_NAME(F) +", " + std::string(#F + 3)
    static const std::string names = std::string("F32, F16") TV_QUANT_FORMATS(TV_NAME);
#undef TV_NAME
    return names.c_str();
}

size_t row_bytes(int dtype, int64_t cols) {
    const DtypeInfo d = info(dtype);
    if (d.values == 0 || cols <= 0 || cols > (int64_t(1) << 40) || cols % d.values) return 0;
    return (size_t)(cols / d.values) * (size_t)d.bytes;
}

void dequantize_row(int dtype, const void *row, float *out, int64_t cols) {
    const uint8_t *p = static_cast<const uint8_t *>(row);
    if (dtype == TV_F32) std::memcpy(out, row, (size_t)cols * 4);
    if (dtype == TV_F16)
        for (int64_t i = 0; i < cols; i++) out[i] = fp16_to_fp32(load_u16(p + 2 * i));
    with_format(dtype, [&](auto f) { return dequantize_fmt<decltype(f)>(p, out, cols), true; });
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
