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

// Random contents with scales of about `scale` so values are O(scale * 8) for 4-bit formats.
inline HostTensor random_tensor(int32_t dtype, int64_t rows, int64_t cols, float scale = 0.02f) {
    HostTensor t{dtype, rows, cols, {}};
    t.bytes.resize(tv_row_bytes(dtype, cols) * (size_t)rows);
    uint8_t *p = t.bytes.data();
    const size_t nblocks = (size_t)(rows * cols / 32);
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
        case TV_Q4_0:
            for (size_t b = 0; b < nblocks; b++, p += 18) {
                put_f16(p, uniform(0.2f, 1.0f) * scale * (randint(0, 1) ? 1 : -1));
                for (int j = 0; j < 16; j++) p[2 + j] = (uint8_t)randint(0, 255);
            }
            break;
        case TV_Q4_1:
            for (size_t b = 0; b < nblocks; b++, p += 20) {
                put_f16(p, uniform(0.2f, 1.0f) * scale);
                put_f16(p + 2, -uniform(0.0f, 10.0f) * scale);
                for (int j = 0; j < 16; j++) p[4 + j] = (uint8_t)randint(0, 255);
            }
            break;
        case TV_Q8_0:
            for (size_t b = 0; b < nblocks; b++, p += 34) {
                put_f16(p, uniform(0.2f, 1.0f) * scale / 16 * (randint(0, 1) ? 1 : -1));
                for (int j = 0; j < 32; j++) p[2 + j] = (uint8_t)randint(0, 255);  // full int8 range, -128 too
            }
            break;
    }
    return t;
}

inline std::vector<float> random_vec(size_t n, float lo = -1, float hi = 1) {
    std::vector<float> v(n);
    for (auto &x : v) x = uniform(lo, hi);
    return v;
}

}  // namespace tvtest
