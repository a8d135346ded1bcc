// Random weights in every block format, and a double-precision reference built on dequantization.
#pragma once

#include <cstring>
#include <vector>

#include "fp16.h"
#include "test.h"
#include "tinyvllm.h"

namespace tvtest {

struct HostTensor {
    int32_t dtype;
    int64_t rows, cols;
    std::vector<uint8_t> bytes;
    tv_tensor desc() const { return tv_tensor{dtype, rows, cols, bytes.data(), bytes.size()}; }
    std::vector<float> dequantized() const {
        std::vector<float> out((size_t)(rows * cols));
        tv_tensor d = desc();
        tv_dequantize_rows(&d, 0, rows, out.data());
        return out;
    }
};

inline void put_f16(uint8_t *p, float v) {
    const uint16_t h = tv::fp32_to_fp16(v);
    std::memcpy(p, &h, 2);
}

// Where a format keeps its f16 scale (d) and min (m) fields, written from the GGML spec here on
// purpose (not from formats.h), and how much to shrink them so weights stay O(scale * 8).
struct QuantFields {
    int block_bytes, d_at, m_at;  // m_at < 0: no min field
    float d_div, m_div;
    bool min_sub;  // the min is subtracted (K-quants: w = d*sc*q - dmin*m)
};
inline QuantFields quant_fields(int32_t dtype) {
    switch (dtype) {
        case TV_Q4_0: return {18, 0, -1, 1, 1, false};
        case TV_IQ4_NL: return {18, 0, -1, 16, 1, false};
        case TV_Q4_1: return {20, 0, 2, 1, 1, false};
        case TV_Q5_0: return {22, 0, -1, 2, 1, false};
        case TV_Q5_1: return {24, 0, 2, 2, 1, false};
        case TV_Q8_0: return {34, 0, -1, 16, 1, false};
        case TV_Q2_K: return {84, 80, 82, 5, 15, true};
        case TV_Q3_K: return {110, 108, -1, 16, 1, false};
        case TV_Q4_K: return {144, 0, 2, 60, 60, true};
        case TV_Q5_K: return {176, 0, 2, 120, 60, true};
        case TV_Q6_K: return {210, 208, -1, 512, 1, false};
        default: return {1, 0, -1, 1, 1, false};
    }
}

// Values per block of a quantized dtype (a row's length must be a multiple of it).
inline int64_t block_values(int32_t dtype) {
    return dtype == TV_Q2_K || dtype == TV_Q3_K || dtype == TV_Q4_K || dtype == TV_Q5_K || dtype == TV_Q6_K ? 256 : 32;
}

// Random contents with scales of about `scale` so values are O(scale * 8) for 4-bit formats.
inline HostTensor random_tensor(int32_t dtype, int64_t rows, int64_t cols, float scale = 0.02f) {
    HostTensor t{dtype, rows, cols, {}};
    t.bytes.resize(tv_row_bytes(dtype, cols) * (size_t)rows);
    uint8_t *p = t.bytes.data();
    switch (dtype) {
        case TV_F32:
            for (int64_t i = 0; i < rows * cols; i++) {
                float v = uniform(-1, 1) * scale * 8;
                std::memcpy(p + 4 * i, &v, 4);
            }
            break;
        case TV_F16:
            for (int64_t i = 0; i < rows * cols; i++) put_f16(p + 2 * i, uniform(-1, 1) * scale * 8);
            break;
        default: {
            // Quantized: random bytes are valid bits for every format; only the f16 scale fields
            // need sane values (magnitudes so a weight is about scale * 8, as above).
            const QuantFields f = quant_fields(dtype);
            for (auto &byte : t.bytes) byte = (uint8_t)randint(0, 255);
            for (size_t b = 0; b < t.bytes.size() / (size_t)f.block_bytes; b++, p += f.block_bytes) {
                put_f16(p + f.d_at, uniform(0.2f, 1.0f) * scale / f.d_div * (f.m_at < 0 && randint(0, 1) ? -1 : 1));
                if (f.m_at >= 0) put_f16(p + f.m_at, (f.min_sub ? 1 : -1) * uniform(0.0f, 10.0f) * scale / f.m_div);
            }
        }
    }
    return t;
}

inline std::vector<float> random_vec(size_t n, float lo = -1, float hi = 1) {
    std::vector<float> v(n);
    for (auto &x : v) x = uniform(lo, hi);
    return v;
}

}  // namespace tvtest
