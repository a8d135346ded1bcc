// The inner loops every matmul and attention call goes through, as a table of function pointers
// chosen once at runtime: "scalar" (portable C++), "avx2", "avx512vnni", "avx512amx", "neon", "neon_dotprod".
// TINYVLLM_KERNEL=<name> in the environment forces a path (tests compare paths with it).
#pragma once

#include <cstdint>
#include <vector>

#include "quant.h"
#include "threadpool.h"

namespace tv {

constexpr int MAX_NX = 4;

// One quantized weight row (nb activation blocks of 32 values, GGML layout; formats.h) against
// nx <= MAX_NX activation rows in int16 ActBlocks (row i at x + i * nb): out[i * out_stride] = dot.
// The weight blocks are unpacked once for all nx rows. Each row's result does not depend on nx
// (same summation order), so a token's logits do not depend on what else is in its batch.
using RowsFn = void (*)(const uint8_t *w, const ActBlock *x, int64_t nb, int nx, float *out, int64_t out_stride);

struct QuantGemm;

struct Kernels {
    const char *name;
    RowsFn rows[DTYPE_SLOTS];  // by dtype id, every quantized format (formats.h); nullptr otherwise
    // Optional whole-matmul kernel for quantized weights (nullptr: the driver loops rows[]).
    const QuantGemm *gemm;
    // Float dots for F32/F16 weights and for attention over the KV cache.
    float (*dot_f32)(const float *w, const float *x, int64_t n);
    float (*dot_f16)(const uint16_t *w, const float *x, int64_t n);
    // One KV block against R query vectors with the online-softmax update (see attn_block.h):
    // q [R][hd], n_valid[r] keys of the block visible to query r; straight from the cache (fp16 or
    // fp32): keys transposed, row d (bs values) at k + d * bs * elt, value s at v + s * ld bytes; running m/l [R],
    // acc [R][hd]; work: 2 * bs * hd + bs floats of scratch.
    void (*attn_block)(const float *q, int R, int hd, const int *n_valid, const uint8_t *k, const uint8_t *v, size_t ld,
                       bool f16, int bs, float scale, float *m, float *l, float *acc, float *work);
    // Per-token ops of every matmul input (prefill spends ~15% in them at scalar speed):
    // quantize_act gives quantize_row_act's exact bits (every path must reproduce them); silu_mul
    // (g = silu(g) * u) and gelu_mul need float accuracy only (a path may use its own exp).
    void (*quantize_act)(const float *x, ActBlock *out, int64_t cols);
    void (*silu_mul)(float *g, const float *u, int64_t n);
    // g = gelu(g) * u, GELU's tanh approximation (Gemma).
    void (*gelu_mul)(float *g, const float *u, int64_t n);
};

// e^x = 2^n * (1 + r + r^2 * P(r)), n = round(x / ln 2), r = x - n ln 2 (ln 2 split in two for
// precision): Cephes' expf polynomial P, highest power first, shared by the x86 paths' vector exps.
constexpr float EXP_LN2_HI = 0.693359375f, EXP_LN2_LO = -2.12194440e-4f;
constexpr float EXP_POLY[6] = {1.9875691500E-4f, 1.3981999507E-3f, 8.3334519073E-3f,
                               4.1665795894E-2f, 1.6666665459E-1f, 5.0000001201E-1f};

extern const Kernels kernels_scalar;
// nullptr when not compiled in (non-x86 builds).
const Kernels *kernels_avx2_table();
bool cpu_has_avx2();
const Kernels *kernels_avx512_table();  // "avx512vnni": AVX-512 F/BW/VL + VNNI
bool cpu_has_avx512vnni();
const Kernels *kernels_amx_table();  // "avx512amx": avx512vnni with its prefill matmul on AMX int8 tiles
bool cpu_has_amx();                  // CPU, OS and this process's AMX permission (kernels_amx.cpp)
// aarch64 (kernels_neon.cpp): "neon" (ARMv8.0 Advanced SIMD) and "neon_dotprod" (ARMv8.2 SDOT);
// nullptr when not compiled in or, for dotprod, when the CPU lacks FEAT_DotProd.
const Kernels *kernels_neon_table();
const Kernels *kernels_neon_dotprod_table();

// A whole-matmul kernel for quantized weights, for paths that tile past MAX_NX rows (unpack a
// weight row once, reuse it for every activation row). prepare() runs once per matmul from the
// calling thread, which owns its result until its next prepare (pool threads may help fill it);
// run() computes y[i * ldy + r] for rows r in [r0, r1) and all m activation rows, from any pool
// thread, and returns false (touching nothing) for a dtype it does not handle (the driver then
// uses rows[]). Its kernels run rows_per_group weight rows at a time: the driver's chunks are
// multiples of it.
struct QuantGemm {
    int rows_per_group;
    const void *(*prepare)(const ActBlock *x, int64_t m, int64_t nb, ThreadPool &pool);
    bool (*run)(int dtype, const uint8_t *w, size_t row_bytes, int64_t r0, int64_t r1, const void *prep, int64_t m,
                int64_t nb, float *y, int64_t ldy);
};

// A table named `name` with the scalar rows[] for every format and the given per-path kernels: a path
// starts from it and overrides the rows (or sets a gemm) it has of its own (safe during static
// initialization).
Kernels make_kernels(const char *name, decltype(Kernels::dot_f32) dot_f32, decltype(Kernels::dot_f16) dot_f16,
                     decltype(Kernels::attn_block) attn_block, decltype(Kernels::quantize_act) quantize_act,
                     decltype(Kernels::silu_mul) silu_mul, decltype(Kernels::gelu_mul) gelu_mul);

// The active table (first call picks: env var, else the best the CPU supports).
const Kernels &kernels();
// Force a path by name (one of the names above, or "auto"); false when unknown or unsupported here.
bool select_kernels(const char *name);
// Names of the paths this build and CPU can run, "scalar" first (tests loop over all of them).
std::vector<const char *> available_kernels();

}  // namespace tv
