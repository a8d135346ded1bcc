// The attention inner step, written once as plain loops and instantiated by every kernel path
// inside its own target attribute (kernels_*.cpp), so the compiler vectorizes it for that ISA:
// one KV block (up to bs keys, keys transposed, converted to fp32) against R query vectors, with the online-softmax
// update (running max m, running sum l, rescaled fp32 accumulator acc).
// Scores run with lanes over keys (for each d: score[s] += q[d] * kt[d][s]): every score is the
// same fixed sum over d and every acc element a sequential sum over keys: a query's result depends only on its own data
// and n_valid, never on R or on which other queries share the call. That keeps attention batch-invariant (prefill tiles == decode bit for bit).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace tv {

// x[i] = exp(x[i]) for i < n, in place: the path's vector exp, or libm's.
using ExpInPlace = void (*)(float *x, int n);

inline void exp_in_place_libm(float *x, int n) {
    for (int i = 0; i < n; i++) x[i] = std::exp(x[i]);
}

__attribute__((always_inline)) inline void attn_block_generic(ExpInPlace exp_n, const float *__restrict q, int R, int hd,
                                                              const int *__restrict n_valid,
                                                              const float *__restrict kt, const float *__restrict vf,
                                                              int bs, float scale, float *__restrict m,
                                                              float *__restrict l, float *__restrict acc,
                                                              float *__restrict sc) {
    for (int r = 0; r < R; r++) {
        const int n = n_valid[r];
        if (n <= 0) continue;
        const float *__restrict qr = q + (int64_t)r * hd;
        float *__restrict a = acc + (int64_t)r * hd;
        if (bs == 16) {
            // the usual block: 16 scores live in registers, in 4 chains over d (one chain through
            // memory is a store-to-load latency per d)
            float c0[16] = {}, c1[16] = {}, c2[16] = {}, c3[16] = {};
            int d = 0;
            for (; d + 4 <= hd; d += 4) {
                const float *__restrict kd = kt + (int64_t)d * 16;
                for (int s = 0; s < 16; s++) {
                    c0[s] += qr[d] * kd[s];
                    c1[s] += qr[d + 1] * kd[16 + s];
                    c2[s] += qr[d + 2] * kd[32 + s];
                    c3[s] += qr[d + 3] * kd[48 + s];
                }
            }
            for (; d < hd; d++)
                for (int s = 0; s < 16; s++) c0[s] += qr[d] * kt[(int64_t)d * 16 + s];
            for (int s = 0; s < 16; s++) sc[s] = (c0[s] + c1[s]) + (c2[s] + c3[s]);
        } else {
            for (int s = 0; s < bs; s++) sc[s] = 0.0f;
            for (int d = 0; d < hd; d++) {
                const float qd = qr[d];
                const float *__restrict kd = kt + (int64_t)d * bs;
                for (int s = 0; s < bs; s++) sc[s] += qd * kd[s];
            }
        }
        float bmax = -std::numeric_limits<float>::infinity();
        for (int s = 0; s < n; s++) {
            sc[s] *= scale;
            bmax = bmax > sc[s] ? bmax : sc[s];
        }
        float mr = m[r], lr = l[r];
        if (bmax > mr) {  // new running max: rescale what was accumulated so far
            const float rr = std::exp(mr - bmax);  // exp(-inf) = 0 on the first block
            lr *= rr;
            for (int i = 0; i < hd; i++) a[i] *= rr;
            mr = bmax;
        }
        for (int s = 0; s < n; s++) sc[s] -= mr;
        exp_n(sc, n);
        for (int s = 0; s < n; s++) lr += sc[s];
        // acc += p[s] * v[s] over the keys, 16 dims at a time so they stay in registers across keys
        // (each element still sums its keys in order)
        int i0 = 0;
        for (; i0 + 16 <= hd; i0 += 16) {
            float t[16];
            for (int i = 0; i < 16; i++) t[i] = a[i0 + i];
            for (int s = 0; s < n; s++) {
                const float p = sc[s];
                const float *__restrict v = vf + (int64_t)s * hd + i0;
                for (int i = 0; i < 16; i++) t[i] += p * v[i];
            }
            for (int i = 0; i < 16; i++) a[i0 + i] = t[i];
        }
        for (int s = 0; s < n && i0 < hd; s++) {
            const float p = sc[s];
            const float *__restrict v = vf + (int64_t)s * hd;
            for (int i = i0; i < hd; i++) a[i] += p * v[i];
        }
        m[r] = mr;
        l[r] = lr;
    }
}

// Raw cache data in: the block's keys of one kv head transposed, row d (bs values) at
// k + d * bs * elt, value s at v + s * ld (bytes); fp16 or fp32. `conv` turns n contiguous values
// into fp32 (the path's vector conversion); work holds 2 * bs * hd + bs floats.
using AttnRowConv = void (*)(const uint8_t *src, bool f16, float *dst, int n);

__attribute__((always_inline)) inline void attn_block_rows(AttnRowConv conv, ExpInPlace exp_n, const float *q, int R, int hd,
                                                           const int *n_valid, const uint8_t *k, const uint8_t *v,
                                                           size_t ld, bool f16, int bs, float scale, float *m, float *l,
                                                           float *acc, float *work) {
    int nmax = 0;
    for (int r = 0; r < R; r++) nmax = nmax > n_valid[r] ? nmax : n_valid[r];
    if (nmax <= 0) return;
    float *kt = work, *vf = work + (size_t)bs * hd, *sc = vf + (size_t)bs * hd;
    const size_t row = (size_t)bs * (f16 ? 2 : 4);
    for (int d = 0; d < hd; d++) {
        conv(k + d * row, f16, kt + (size_t)d * bs, nmax);
        for (int s = nmax; s < bs; s++) kt[(size_t)d * bs + s] = 0.0f;  // past every query: finite, unused
    }
    for (int s = 0; s < nmax; s++) conv(v + s * ld, f16, vf + (size_t)s * hd, hd);
    attn_block_generic(exp_n, q, R, hd, n_valid, kt, vf, bs, scale, m, l, acc, sc);
}

}  // namespace tv

// Defines `ATTR void NAME(...)` (the Kernels::attn_block signature) over the generic body (inlined,
// so vectorized for ATTR), converting rows with CONV and exponentiating scores with EXPN.
#define TV_DEFINE_ATTN_BLOCK(ATTR, NAME, CONV, EXPN)                                                          \
    ATTR void NAME(const float *q, int R, int hd, const int *n_valid, const uint8_t *k, const uint8_t *v, size_t ld, \
                   bool f16, int bs, float scale, float *m, float *l, float *acc, float *work) {                  \
        attn_block_rows(CONV, EXPN, q, R, hd, n_valid, k, v, ld, f16, bs, scale, m, l, acc, work);                  \
    }
