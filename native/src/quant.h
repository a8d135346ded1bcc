// Dtype facts (sizes, names, dequantization) and the activation format the integer matmul uses.
// The weight block layouts themselves are in formats.h.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tv {

constexpr int QK = 32;  // values per activation block (and per slice of every weight format)
constexpr int DTYPE_SLOTS = 32;  // dtype ids index tables: every GGML id we know is below this

// One activation block: each activation row is quantized once per matmul to int16 with a scale per
// 32 values, so every weight format runs an exact integer dot per block. int16, not int8: small
// LLaMAs have outlier dimensions (after RMSNorm) that leave the rest of a block with 2-3
// significant bits at int8, measurably moving logits (cosine 0.95 vs a float64 reference at some
// positions of SmolLM2-135M); at int16 the error is ~1e-5 and AVX2's madd_epi16 costs about the
// same as the int8 maddubs+madd pair. s = d * sum(qs) lets Q4_1's min term fold in.
constexpr int ACT_MAX = 32767;
struct ActBlock {
    float d;
    float s;
    int16_t qs[QK];
};

bool dtype_known(int dtype);
bool dtype_quantized(int dtype);
const char *dtype_name(int dtype);
// Comma-separated names of every dtype a weight may have (error messages).
const char *dtype_names_supported();
// Bytes of one row of `cols` values; 0 when the dtype is unknown or cols is not a whole number
// of blocks (or not positive).
size_t row_bytes(int dtype, int64_t cols);

void dequantize_row(int dtype, const void *row, float *out, int64_t cols);
// x[cols] -> cols/32 blocks; cols must be a multiple of 32.
void quantize_row_act(const float *x, ActBlock *out, int64_t cols);

// Little-endian half read from an unaligned byte pointer.
inline uint16_t load_u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

}  // namespace tv
