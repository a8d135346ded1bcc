#include "ops.h"

#include <cmath>

namespace tv {

void rmsnorm(const float *x, const float *w, float *out, int64_t n, float eps) {
    double ss = 0.0;  // double: cheap at these sizes and immune to large activations
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    const float scale = (float)(1.0 / std::sqrt(ss / (double)n + (double)eps));
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * scale * w[i];
}

void rope_angles(int32_t pos, const float *inv_freq, int half, float *cos_out, float *sin_out) {
    for (int i = 0; i < half; i++) {
        const double a = (double)pos * (double)inv_freq[i];
        cos_out[i] = (float)std::cos(a);
        sin_out[i] = (float)std::sin(a);
    }
}

void rope_apply(float *x, int n_heads, int head_dim, bool interleaved, const float *c, const float *s, int rot) {
    const int half = (rot > 0 ? rot : head_dim) / 2;
    for (int h = 0; h < n_heads; h++, x += head_dim) {
        for (int i = 0; i < half; i++) {
            float *a = interleaved ? x + 2 * i : x + i;
            float *b = interleaved ? x + 2 * i + 1 : x + i + half;
            const float x0 = *a, x1 = *b;
            *a = x0 * c[i] - x1 * s[i];
            *b = x0 * s[i] + x1 * c[i];
        }
    }
}

void swiglu(float *g, const float *u, int64_t n) {
    for (int64_t i = 0; i < n; i++) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

void gelu_tanh_mul(float *g, const float *u, int64_t n) {
    const float c = 0.7978845608028654f;  // sqrt(2 / pi)
    for (int64_t i = 0; i < n; i++) {
        const float x = g[i];
        g[i] = 0.5f * x * (1.0f + std::tanh(c * (x + 0.044715f * x * x * x))) * u[i];
    }
}

void softcap(float *x, int64_t n, float cap) {
    for (int64_t i = 0; i < n; i++) x[i] = cap * std::tanh(x[i] / cap);
}

}  // namespace tv
