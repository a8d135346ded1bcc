// y[m, n] = sum_k x[m, k] * W[n, k] for every weight dtype, multi-threaded over output rows.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "quant.h"
#include "threadpool.h"
#include "tinyvllm.h"

namespace tv {

// A validated, borrowed weight matrix.
struct Weight {
    int dtype = -1;
    int64_t rows = 0, cols = 0;
    const uint8_t *data = nullptr;
    size_t row_bytes = 0;
    bool set() const { return data != nullptr; }
    const uint8_t *row(int64_t r) const { return data + (size_t)r * row_bytes; }
};

// A caller-described tensor (tv_model_set_tensor, tv_matmul, ...) as a Weight, after checking it:
// a known dtype, rows and cols > 0, cols a whole number of the dtype's blocks, nbytes matching,
// data not null. Throws InvalidArgument; `what` starts every message.
Weight check_weight(const char *what, const tv_tensor *t);

// Quantize m rows of k activations (k % 32 == 0) to int16 blocks into buf (grown, never shrunk).
const ActBlock *quantize_acts(const float *x, int64_t m, int64_t k, std::vector<ActBlock> &buf);

// xq: x already quantized by quantize_acts (required for quantized weights, ignored otherwise),
// so one activation quantization can feed several matmuls (q/k/v, gate/up).
void matmul(const Weight &w, const float *x, const ActBlock *xq, int64_t m, float *y, ThreadPool &pool);

// Several weights against the same activations (q/k/v, gate/up) in ONE parallel region: chunks of
// all of them go to the pool together, so a decode step pays one wake-up/join instead of three.
// All ws[j] must have the same cols; y[j] is [m, ws[j]->rows].
void matmul_multi(const Weight *const *ws, float *const *ys, int count, const float *x, const ActBlock *xq, int64_t m,
                  ThreadPool &pool);

// Decode-sized matmuls (m <= 64 on more than one thread) run as ThreadPool::run_dup jobs of tasks of
// about DUP_ITEM_BYTES of weights, each computing at most DUP_ITEM_FLOATS outputs into the pool's
// per-thread scratch: an owner reserves ThreadPool::reserve_scratch(DUP_ITEM_FLOATS) up front
// (runner/native_runner.py's workspace_bytes pays size() x 4 x DUP_ITEM_FLOATS bytes).
constexpr int64_t DUP_ITEM_BYTES = 32 * 1024;
constexpr int64_t DUP_ITEM_FLOATS = 4096;

// Convenience: quantizes x itself when w needs it.
void matmul(const Weight &w, const float *x, int64_t m, float *y, ThreadPool &pool, std::vector<ActBlock> &buf);

}  // namespace tv
