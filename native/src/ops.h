// Small per-token operations of the decoder blocks.
#pragma once

#include <cstdint>

namespace tv {

// out[i] = x[i] * w[i] / sqrt(mean(x^2) + eps), for n values (out may alias x).
void rmsnorm(const float *x, const float *w, float *out, int64_t n, float eps);

// cos/sin of pos * inv_freq[i] for i < half (computed in double: positions reach 1e4+ rad).
void rope_angles(int32_t pos, const float *inv_freq, int half, float *cos_out, float *sin_out);

// Rotate the first rot values (0: all head_dim) of every head of x (n_heads * head_dim values) in place;
// the rest pass through (partial RoPE). interleaved: pairs (x[2i], x[2i+1]); otherwise halves
// (x[i], x[i + rot/2]); angle i.
void rope_apply(float *x, int n_heads, int head_dim, bool interleaved, const float *cos_t, const float *sin_t,
                int rot = 0);

// g[i] = silu(g[i]) * u[i]
void swiglu(float *g, const float *u, int64_t n);

// g[i] = gelu(g[i]) * u[i], GELU's tanh approximation (Gemma's gelu_pytorch_tanh, ggml_gelu).
void gelu_tanh_mul(float *g, const float *u, int64_t n);

// x[i] = cap * tanh(x[i] / cap): Gemma's final-logit soft capping.
void softcap(float *x, int64_t n, float cap);

}  // namespace tv
