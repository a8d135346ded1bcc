// AVX-512 (F/BW/VL) + VNNI kernels, per-function target attributes so the library still loads
// on CPUs without them (kernels.cpp only picks this table when the CPU reports all features).
//
// A weight block is widened to 32 int16 lanes (value order 0..31, the same order as ActBlock.qs),
// so one _mm512_dpwssd_epi32 forms the block's exact integer dot as 16 int32 partial sums.
// On Zen 4 a 512-bit op costs two 256-bit slots, so the win over AVX2 comes from doing less
// per block, not from wider lanes: the quantized matmul (QuantGemm below) forms each block's
// exact integer dot first and does the float work (convert, scale, accumulate) once per block
// for 8 outputs at a time (8 weight rows in decode, 8 activation rows in the panel path).
#include "attn_block.h"
#include "kernels.h"
#include "tinyvllm.h"

#if defined(__x86_64__)

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#define TV_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")))

namespace tv {
namespace {

TV_AVX512 inline float half(const uint8_t *p) { return _cvtsh_ss(load_u16(p)); }

// A weight block as int16: lo = values 0..15, hi = values 16..31 (GGML's nibble order). 256-bit
// halves on purpose: Zen 4 runs 512-bit ops as two 256-bit halves, and a ymm pair needs no
// cross-lane shuffle to widen 16 bytes, so the ymm form of VNNI does the same work in fewer slots.
struct W16 {
    __m256i lo, hi;
};

TV_AVX512 inline W16 nibbles16(const uint8_t *qs) {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i *>(qs)), f = _mm_set1_epi8(0x0F);
    return {_mm256_cvtepu8_epi16(_mm_and_si128(q, f)), _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(q, 4), f))};
}

// A block's 16 pairs (value j, value j + 16) as int16 halves of 16 dwords, j = 0..15.
TV_AVX512 inline __m512i nibble_pairs(const uint8_t *qs) {
    const __m512i t = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(qs)));
    return _mm512_ternarylogic_epi32(t, _mm512_slli_epi32(t, 12), _mm512_set1_epi32(0x000F000F), 0xA8);  // (t | t << 12) & mask
}

struct FmtQ4_0 {
    static constexpr size_t BYTES = 18;
    static constexpr bool HAS_MIN = false;
    TV_AVX512 static __m512i pairs(const uint8_t *w) { return _mm512_sub_epi16(nibble_pairs(w + 2), _mm512_set1_epi16(8)); }
    TV_AVX512 static W16 weights(const uint8_t *w) {
        const W16 n = nibbles16(w + 2);
        const __m256i eight = _mm256_set1_epi16(8);
        return {_mm256_sub_epi16(n.lo, eight), _mm256_sub_epi16(n.hi, eight)};
    }
};
struct FmtQ4_1 {
    static constexpr size_t BYTES = 20;
    static constexpr bool HAS_MIN = true;
    TV_AVX512 static W16 weights(const uint8_t *w) { return nibbles16(w + 4); }
    TV_AVX512 static __m512i pairs(const uint8_t *w) { return nibble_pairs(w + 4); }
};
struct FmtQ8_0 {
    static constexpr size_t BYTES = 34;
    static constexpr bool HAS_MIN = false;
    TV_AVX512 static __m512i pairs(const uint8_t *w) {
        const __m512i lo = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(w + 2)));
        const __m512i hi = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(w + 18)));
        return _mm512_mask_blend_epi16(0xAAAAAAAA, lo, _mm512_slli_epi32(hi, 16));
    }
    TV_AVX512 static W16 weights(const uint8_t *w) {
        return {_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(w + 2))),
                _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(w + 18)))};
    }
};

// The block's exact integer dot as 8 int32 lanes: two chained dpwssd (|sum| < 2^31 by far).
TV_AVX512 inline __m256i dot8(__m256i wlo, __m256i whi, const int16_t *x) {
    const __m256i s = _mm256_dpwssd_epi32(_mm256_setzero_si256(), wlo, _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x)));
    return _mm256_dpwssd_epi32(s, whi, _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x + 16)));
}

TV_AVX512 inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

TV_AVX512 inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

// ---- Kernels-table entry points (one weight row against <= MAX_NX ActBlock rows) -------------
// Straightforward per-block code; the matmul driver uses QuantGemm instead when this path is active.
template <class Fmt>
TV_AVX512 void rows(const uint8_t *w, const ActBlock *x, int64_t nb, int nx, float *out, int64_t out_stride) {
    __m256 acc[MAX_NX];
    float macc[MAX_NX];
    for (int i = 0; i < nx; i++) acc[i] = _mm256_setzero_ps(), macc[i] = 0.0f;
    for (int64_t b = 0; b < nb; b++, w += Fmt::BYTES) {
        const W16 wv = Fmt::weights(w);
        const float dw = half(w);
        for (int i = 0; i < nx; i++) {
            const ActBlock &xb = x[i * nb + b];
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot8(wv.lo, wv.hi, xb.qs)), _mm256_set1_ps(dw * xb.d), acc[i]);
            if (Fmt::HAS_MIN) macc[i] = std::fma(half(w + 2), xb.s, macc[i]);
        }
    }
    for (int i = 0; i < nx; i++) out[i * out_stride] = hsum8(acc[i]) + macc[i];
}

// ---- QuantGemm: the tiled matmul --------------------------------------------------------------
// Every output, whatever path computes it, is the same float sequence:
//     acc = 0; for each block b: acc = fma(float(idot_b), d_w * d_x, acc) [; acc = fma(m_b, s_b, acc)]
// where idot_b is the block's exact integer dot (so the order of its int32 partial sums does not
// matter). Rows of a batch therefore get the same bits whichever path (and tile) ran them.
//   - m < GEMM_MIN (decode): 8 weight rows at a time, unpacked in registers, their block dots
//     reduced into one 8-lane vector (lane = weight row), scales fetched with one gather;
//   - m >= GEMM_MIN: 8 weight rows unpacked once into an L1 panel of int16 pairs, then run
//     against tiles of 8 (m <= 8: ymm) or 16 (zmm) activation rows (lane = activation row): per
//     pair one broadcast weight dword meets the tile in one vpdpwssd, float work once per block.
// Pairs are (value j, value j + 16), j = 0..15: one dword per pair, int16 halves.

constexpr int GEMM_MIN = 4;  // activation rows from which the panel path runs
constexpr int NW = 8;        // weight rows per group

// 64 bytes, 64-aligned: one block of int16 (std::vector<__m512i> would drop the vector attributes).
struct alignas(64) Blk16 {
    int16_t v[QK];
};

struct Prep {
    std::vector<Blk16> qs;       // [m][nb] (decode path)
    std::vector<float> d, s;     // [m][nb]
    int64_t tw = 8;              // panel path: activation rows per tile (8: ymm lanes, 16: zmm)
    std::vector<int32_t> xt;     // [tile][nb][16 pairs][tw rows], padded rows 0
    std::vector<float> xd, xs;   // [tile][nb][tw]
};


TV_AVX512 const void *prepare(const ActBlock *x, int64_t m, int64_t nb) {
    thread_local Prep p;  // the calling thread's; workers only read it during the matmul
    const size_t n = (size_t)(m * nb);
    if (m < GEMM_MIN) {
        if (p.qs.size() < n) p.qs.resize(n), p.d.resize(n), p.s.resize(n);
        for (size_t i = 0; i < n; i++) {
            _mm512_store_si512(p.qs[i].v, _mm512_loadu_si512(x[i].qs));
            p.d[i] = x[i].d;
            p.s[i] = x[i].s;
        }
        return &p;
    }
    const int64_t tw = p.tw = m <= 8 ? 8 : 16, tiles = (m + tw - 1) / tw;
    if (p.xt.size() < (size_t)(tiles * nb * 16 * tw)) p.xt.resize((size_t)(tiles * nb * 16 * tw));
    if (p.xd.size() < (size_t)(tiles * nb * tw)) p.xd.resize((size_t)(tiles * nb * tw)), p.xs.resize(p.xd.size());
    alignas(64) int32_t tmp[16];
    for (int64_t t = 0; t < tiles; t++)
        for (int64_t b = 0; b < nb; b++) {
            int32_t *xt = p.xt.data() + ((t * nb + b) * 16) * tw;
            float *xd = p.xd.data() + (t * nb + b) * tw, *xs = p.xs.data() + (t * nb + b) * tw;
            for (int i = 0; i < tw; i++) {
                const int64_t row = t * tw + i;
                if (row < m) {
                    const ActBlock &a = x[row * nb + b];
                    const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(a.qs)));
                    const __m512i hi = _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(a.qs + 16)));
                    _mm512_store_si512(tmp, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
                    xd[i] = a.d, xs[i] = a.s;
                } else {
                    std::memset(tmp, 0, sizeof tmp);
                    xd[i] = xs[i] = 0.0f;
                }
                for (int j = 0; j < 16; j++) xt[j * tw + i] = tmp[j];
            }
        }
    return &p;
}

TV_AVX512 inline void store_lanes(__m256 v, float *y, int64_t stride, int n) {
    alignas(32) float t[8];
    _mm256_store_ps(t, v);
    for (int i = 0; i < n; i++) y[i * stride] = t[i];
}

// fp16 d (and Q4_1's m right after it) of block o of 8 rows in one gather.
template <class Fmt>
TV_AVX512 inline void scales8(const uint8_t *w0, __m256i voff, __m256 &dw, __m256 &mn) {
    const __m256i g = _mm256_i32gather_epi32(reinterpret_cast<const int *>(w0), voff, 1);
    dw = _mm256_cvtph_ps(_mm256_cvtepi32_epi16(g));
    mn = Fmt::HAS_MIN ? _mm256_cvtph_ps(_mm256_cvtepi32_epi16(_mm256_srli_epi32(g, 16))) : dw;
}

// Decode: weight rows [g0, g0 + 8) (clamped to r1 - 1; extra lanes are not stored) x NR rows.
template <class Fmt, int NR>
TV_AVX512 void gemv8(const uint8_t *w, size_t row_bytes, int64_t g0, int64_t r1, const Prep &x, int64_t nb, float *y,
                     int64_t ldy) {
    const uint8_t *wr[NW];
    alignas(32) int32_t off[NW];
    for (int r = 0; r < NW; r++) {
        wr[r] = w + (size_t)std::min(g0 + r, r1 - 1) * row_bytes;
        off[r] = (int32_t)(wr[r] - wr[0]);
    }
    const __m256i voff = _mm256_load_si256(reinterpret_cast<const __m256i *>(off));
    constexpr int PF_LINES = (NW * Fmt::BYTES + 63) / 64;
    const uint8_t *next = w + (size_t)(g0 + NW) * row_bytes;
    __m256 acc[NR];
    for (int i = 0; i < NR; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const size_t o = (size_t)b * Fmt::BYTES;
        __m256i h[NR][4];
        for (int p = 0; p < 4; p++) {
            const W16 a = Fmt::weights(wr[2 * p] + o), c = Fmt::weights(wr[2 * p + 1] + o);
            for (int i = 0; i < NR; i++) {
                const int16_t *xq = x.qs[(size_t)(i * nb + b)].v;
                h[i][p] = _mm256_hadd_epi32(dot8(a.lo, a.hi, xq), dot8(c.lo, c.hi, xq));
            }
        }
        __m256 dw, mn;
        scales8<Fmt>(wr[0] + o, voff, dw, mn);
        // 8 interleaved row streams defeat the hardware prefetcher: fetch the next group (the 8
        // rows are contiguous) a few lines per block, so it is in cache when its turn comes
        for (int c = 0; c < PF_LINES; c++) _mm_prefetch(reinterpret_cast<const char *>(next + (b * PF_LINES + c) * 64), _MM_HINT_T0);
        for (int i = 0; i < NR; i++) {
            const __m256i A = _mm256_hadd_epi32(h[i][0], h[i][1]), B = _mm256_hadd_epi32(h[i][2], h[i][3]);
            const __m256i dot = _mm256_add_epi32(_mm256_permute2x128_si256(A, B, 0x20), _mm256_permute2x128_si256(A, B, 0x31));
            const size_t xb = (size_t)(i * nb + b);
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(dw, _mm256_set1_ps(x.d[xb])), acc[i]);
            if (Fmt::HAS_MIN) acc[i] = _mm256_fmadd_ps(mn, _mm256_set1_ps(x.s[xb]), acc[i]);
        }
    }
    const int nw = (int)std::min<int64_t>(NW, r1 - g0);
    for (int i = 0; i < NR; i++) store_lanes(acc[i], y + i * ldy + g0, 1, nw);
}

// A panel: NW weight rows as int16 pairs [nb][NW][16] plus their scales [nb][NW].
struct Panel {
    std::vector<Blk16> w;  // one Blk16 = one block's 16 pair dwords
    std::vector<float> d, mn;
};

// 8 (ymm) or 16 (zmm) activation rows as vector lanes, for micro().
struct Lanes8 {
    using I = __m256i;
    using F = __m256;
    TV_AVX512 static I zero_i() { return _mm256_setzero_si256(); }
    TV_AVX512 static F zero_f() { return _mm256_setzero_ps(); }
    TV_AVX512 static I load_i(const int32_t *p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)); }
    TV_AVX512 static F load_f(const float *p) { return _mm256_loadu_ps(p); }
    TV_AVX512 static I dot(I acc, int32_t w, I x) { return _mm256_dpwssd_epi32(acc, _mm256_set1_epi32(w), x); }
    // acc + float(id) * (d * dx)
    TV_AVX512 static F scale(F acc, I id, float d, F dx) { return _mm256_fmadd_ps(_mm256_cvtepi32_ps(id), _mm256_mul_ps(_mm256_set1_ps(d), dx), acc); }
    TV_AVX512 static F fma1(float a, F b, F acc) { return _mm256_fmadd_ps(_mm256_set1_ps(a), b, acc); }
    TV_AVX512 static void store(F v, float *t) { _mm256_storeu_ps(t, v); }
};
struct Lanes16 {
    using I = __m512i;
    using F = __m512;
    TV_AVX512 static I zero_i() { return _mm512_setzero_si512(); }
    TV_AVX512 static F zero_f() { return _mm512_setzero_ps(); }
    TV_AVX512 static I load_i(const int32_t *p) { return _mm512_loadu_si512(p); }
    TV_AVX512 static F load_f(const float *p) { return _mm512_loadu_ps(p); }
    TV_AVX512 static I dot(I acc, int32_t w, I x) { return _mm512_dpwssd_epi32(acc, _mm512_set1_epi32(w), x); }
    TV_AVX512 static F scale(F acc, I id, float d, F dx) { return _mm512_fmadd_ps(_mm512_cvtepi32_ps(id), _mm512_mul_ps(_mm512_set1_ps(d), dx), acc); }
    TV_AVX512 static F fma1(float a, F b, F acc) { return _mm512_fmadd_ps(_mm512_set1_ps(a), b, acc); }
    TV_AVX512 static void store(F v, float *t) { _mm512_storeu_ps(t, v); }
};

// Panel (the group's NW weight rows) x one tile of TW activation rows (the vector lanes): per
// pair, one weight dword broadcast meets TW rows in one vpdpwssd; float work once per block.
template <class L, bool HAS_MIN>
TV_AVX512 void micro(const Panel &P, const Prep &x, int64_t t, int64_t nb, int nw, int ni, float *y, int64_t ldy) {
    constexpr int TW = sizeof(typename L::F) / 4;
    typename L::F acc[NW];
    for (int r = 0; r < NW; r++) acc[r] = L::zero_f();
    const int32_t *pw = reinterpret_cast<const int32_t *>(P.w.data()), *xt = x.xt.data() + t * nb * 16 * TW;
    const float *xd = x.xd.data() + t * nb * TW, *xs = x.xs.data() + t * nb * TW;
    for (int64_t b = 0; b < nb; b++, pw += NW * 16, xt += 16 * TW) {
        typename L::I id[NW];
        for (int r = 0; r < NW; r++) id[r] = L::zero_i();
#pragma GCC unroll 16
        for (int j = 0; j < 16; j++) {
            const typename L::I xv = L::load_i(xt + j * TW);
            for (int r = 0; r < NW; r++) id[r] = L::dot(id[r], pw[r * 16 + j], xv);
        }
        const typename L::F dx = L::load_f(xd + b * TW);
        const float *pd = P.d.data() + b * NW, *pm = P.mn.data() + b * NW;
        for (int r = 0; r < NW; r++) acc[r] = L::scale(acc[r], id[r], pd[r], dx);
        if (HAS_MIN) {
            const typename L::F sx = L::load_f(xs + b * TW);
            for (int r = 0; r < NW; r++) acc[r] = L::fma1(pm[r], sx, acc[r]);
        }
    }
    alignas(64) float tmp[TW];
    for (int r = 0; r < nw; r++) {
        L::store(acc[r], tmp);
        for (int i = 0; i < ni; i++) y[(t * TW + i) * ldy + r] = tmp[i];
    }
}

template <class Fmt>
TV_AVX512 void gemm_rows(const uint8_t *w, size_t row_bytes, int64_t r0, int64_t r1, const Prep &x, int64_t m,
                         int64_t nb, float *y, int64_t ldy) {
    if (m < GEMM_MIN) {
        for (int64_t g0 = r0; g0 < r1; g0 += NW) switch (m) {
                case 1: gemv8<Fmt, 1>(w, row_bytes, g0, r1, x, nb, y, ldy); break;
                case 2: gemv8<Fmt, 2>(w, row_bytes, g0, r1, x, nb, y, ldy); break;
                default: gemv8<Fmt, 3>(w, row_bytes, g0, r1, x, nb, y, ldy); break;
            }
        return;
    }
    static thread_local Panel P;
    if (P.w.size() < (size_t)(nb * NW)) P.w.resize((size_t)(nb * NW)), P.d.resize((size_t)(nb * NW)), P.mn.resize((size_t)(nb * NW));
    for (int64_t g0 = r0; g0 < r1; g0 += NW) {
        const int nw = (int)std::min<int64_t>(NW, r1 - g0);
        alignas(32) int32_t off[NW];  // rows past r1 repeat the last one (computed, never stored)
        for (int r = 0; r < NW; r++) off[r] = (int32_t)((size_t)std::min(r, nw - 1) * row_bytes);
        const __m256i voff = _mm256_load_si256(reinterpret_cast<const __m256i *>(off));
        const uint8_t *w0 = w + (size_t)g0 * row_bytes, *next = w0 + NW * row_bytes;
        constexpr int PF_LINES = (NW * Fmt::BYTES + 63) / 64;  // see gemv8
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *wb = w0 + b * Fmt::BYTES;
            for (int c = 0; c < PF_LINES; c++) _mm_prefetch(reinterpret_cast<const char *>(next + (b * PF_LINES + c) * 64), _MM_HINT_T1);
            for (int r = 0; r < NW; r++) _mm512_store_si512(P.w[(size_t)(b * NW + r)].v, Fmt::pairs(wb + off[r]));
            __m256 dw, mn;
            scales8<Fmt>(wb, voff, dw, mn);
            _mm256_storeu_ps(P.d.data() + b * NW, dw);
            if (Fmt::HAS_MIN) _mm256_storeu_ps(P.mn.data() + b * NW, mn);
        }
        const int64_t tw = x.tw;
        for (int64_t t = 0; t * tw < m; t++) {
            const int ni = (int)std::min<int64_t>(tw, m - t * tw);
            if (tw == 8) micro<Lanes8, Fmt::HAS_MIN>(P, x, t, nb, nw, ni, y + g0, ldy);
            else micro<Lanes16, Fmt::HAS_MIN>(P, x, t, nb, nw, ni, y + g0, ldy);
        }
    }
}

TV_AVX512 bool gemm_run(int dtype, const uint8_t *w, size_t row_bytes, int64_t r0, int64_t r1, const void *prep,
                        int64_t m, int64_t nb, float *y, int64_t ldy) {
    const Prep &x = *static_cast<const Prep *>(prep);
    switch (dtype) {
        case TV_Q4_0: gemm_rows<FmtQ4_0>(w, row_bytes, r0, r1, x, m, nb, y, ldy); return true;
        case TV_Q4_1: gemm_rows<FmtQ4_1>(w, row_bytes, r0, r1, x, m, nb, y, ldy); return true;
        case TV_Q8_0: gemm_rows<FmtQ8_0>(w, row_bytes, r0, r1, x, m, nb, y, ldy); return true;
        default: return false;
    }
}

// ---- float dots ------------------------------------------------------------------------------

TV_AVX512 float dot_f32(const float *w, const float *x, int64_t n) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
    }
    for (; i < n; i += 16) {  // masked tail: no scalar loop
        const __mmask16 k = tail_mask(n - i);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, w + i), _mm512_maskz_loadu_ps(k, x + i), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

TV_AVX512 inline __m512 load_h16(__mmask16 k, const uint16_t *p) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p)); }

TV_AVX512 float dot_f16(const uint16_t *w, const float *x, int64_t n) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm512_fmadd_ps(load_h16(0xFFFF, w + i), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(load_h16(0xFFFF, w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
    }
    for (; i < n; i += 16) {
        const __mmask16 k = tail_mask(n - i);
        a0 = _mm512_fmadd_ps(load_h16(k, w + i), _mm512_maskz_loadu_ps(k, x + i), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}




// ---- attention block (hd == 64, bs <= 16; anything else goes to the generic loops) -------------
// Keys come transposed from the cache (row d = element d of the block's 16 keys) so scores run with lanes over keys: per
// query row, score[s] = sum over even d + sum over odd d, each chain sequential in d, whatever
// the other rows are. Up to 4 rows share each key/value load. Vector exp (Cephes polynomial).
TV_AVX512 inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), r);
    __m512 p = _mm512_set1_ps(EXP_POLY[0]);
    for (int i = 1; i < 6; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_POLY[i]));
    const __m512 r2 = _mm512_mul_ps(r, r);
    const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(y, n);
}

TV_AVX512 void conv_row(const uint8_t *src, bool f16, float *dst, int hd) {
    for (int i = 0; i < hd; i += 16) {
        const __mmask16 k = tail_mask(hd - i);
        _mm512_mask_storeu_ps(dst + i, k, f16 ? load_h16(k, reinterpret_cast<const uint16_t *>(src) + i)
                                              : _mm512_maskz_loadu_ps(k, reinterpret_cast<const float *>(src) + i));
    }
}

TV_AVX512 void attn_block(const float *q, int R, int hd, const int *n_valid, const uint8_t *k, const uint8_t *v,
                          size_t ld, bool f16, int bs, float scale, float *m, float *l, float *acc, float *work) {
    if (hd != 64 || bs > 16 || ld > (1u << 24))
        return attn_block_rows(conv_row, q, R, hd, n_valid, k, v, ld, f16, bs, scale, m, l, acc, work);
    int nmax = 0;
    for (int r = 0; r < R; r++) nmax = std::max(nmax, n_valid[r]);
    if (nmax <= 0) return;
    alignas(64) float kt[64 * 16];
    alignas(64) float pa[4][16];
    alignas(64) float dummy[64];
    const __mmask16 gm = tail_mask(nmax);  // keys past every query load as 0
    for (int d = 0; d < 64; d++)
        _mm512_store_ps(kt + 16 * d, f16 ? load_h16(gm, reinterpret_cast<const uint16_t *>(k) + d * bs)
                                         : _mm512_maskz_loadu_ps(gm, reinterpret_cast<const float *>(k) + d * bs));
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int r0 = 0; r0 < R; r0 += 4) {
        const int nr = std::min(4, R - r0);
        const float *qr[4];
        float *ar[4];
        for (int j = 0; j < 4; j++) {
            qr[j] = q + (size_t)(j < nr ? r0 + j : r0) * 64;
            ar[j] = j < nr ? acc + (size_t)(r0 + j) * 64 : dummy;
        }
        __m512 se0 = _mm512_setzero_ps(), se1 = se0, se2 = se0, se3 = se0, so0 = se0, so1 = se0, so2 = se0, so3 = se0;
        for (int d = 0; d < 64; d += 2) {
            const __m512 k0 = _mm512_load_ps(kt + 16 * d), k1 = _mm512_load_ps(kt + 16 * (d + 1));
            se0 = _mm512_fmadd_ps(_mm512_set1_ps(qr[0][d]), k0, se0);
            so0 = _mm512_fmadd_ps(_mm512_set1_ps(qr[0][d + 1]), k1, so0);
            se1 = _mm512_fmadd_ps(_mm512_set1_ps(qr[1][d]), k0, se1);
            so1 = _mm512_fmadd_ps(_mm512_set1_ps(qr[1][d + 1]), k1, so1);
            se2 = _mm512_fmadd_ps(_mm512_set1_ps(qr[2][d]), k0, se2);
            so2 = _mm512_fmadd_ps(_mm512_set1_ps(qr[2][d + 1]), k1, so2);
            se3 = _mm512_fmadd_ps(_mm512_set1_ps(qr[3][d]), k0, se3);
            so3 = _mm512_fmadd_ps(_mm512_set1_ps(qr[3][d + 1]), k1, so3);
        }
        const __m512 sv[4] = {_mm512_add_ps(se0, so0), _mm512_add_ps(se1, so1), _mm512_add_ps(se2, so2),
                              _mm512_add_ps(se3, so3)};
        for (int j = 0; j < 4; j++) {
            const int n = j < nr ? n_valid[r0 + j] : 0;
            if (n <= 0) {
                _mm512_store_ps(pa[j], _mm512_setzero_ps());
                continue;
            }
            const int r = r0 + j;
            const __mmask16 mk = tail_mask(n);
            const __m512 s = _mm512_mul_ps(sv[j], vscale);
            const float bmax = _mm512_mask_reduce_max_ps(mk, s);
            float mr = m[r], lr = l[r];
            if (bmax > mr) {  // new running max: rescale what was accumulated so far
                const float rr = std::exp(mr - bmax);
                lr *= rr;
                const __m512 vr = _mm512_set1_ps(rr);
                for (int i = 0; i < 64; i += 16) _mm512_storeu_ps(ar[j] + i, _mm512_mul_ps(_mm512_loadu_ps(ar[j] + i), vr));
                mr = bmax;
            }
            const __m512 p = _mm512_maskz_mov_ps(mk, exp512(_mm512_sub_ps(s, _mm512_set1_ps(mr))));
            lr += _mm512_reduce_add_ps(p);
            m[r] = mr;
            l[r] = lr;
            _mm512_store_ps(pa[j], p);
        }
        __m512 a[4][4];
        for (int j = 0; j < 4; j++)
            for (int i = 0; i < 4; i++) a[j][i] = _mm512_loadu_ps(ar[j] + 16 * i);
        for (int s = 0; s < nmax; s++) {
            const uint8_t *vs = v + s * ld;
            __m512 v0, v1, v2, v3;
            if (f16) {
                v0 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(vs)));
                v1 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(vs + 32)));
                v2 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(vs + 64)));
                v3 = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(vs + 96)));
            } else {
                const float *vf = reinterpret_cast<const float *>(vs);
                v0 = _mm512_loadu_ps(vf), v1 = _mm512_loadu_ps(vf + 16), v2 = _mm512_loadu_ps(vf + 32),
                v3 = _mm512_loadu_ps(vf + 48);
            }
            for (int j = 0; j < 4; j++) {
                const __m512 p = _mm512_set1_ps(pa[j][s]);
                a[j][0] = _mm512_fmadd_ps(p, v0, a[j][0]);
                a[j][1] = _mm512_fmadd_ps(p, v1, a[j][1]);
                a[j][2] = _mm512_fmadd_ps(p, v2, a[j][2]);
                a[j][3] = _mm512_fmadd_ps(p, v3, a[j][3]);
            }
        }
        for (int j = 0; j < 4; j++)
            for (int i = 0; i < 4; i++) _mm512_storeu_ps(ar[j] + 16 * i, a[j][i]);
    }
    (void)work;
}

// ---- per-token ops --------------------------------------------------------------------------

// quantize_row_act (quant.cpp) 16 lanes at a time, the same operations in the same order, so
// the same bits: amax over non-NaN values (max(a, acc) keeps acc when a is NaN, like the scalar
// `a > amax`), the scalar d and 1/d, then per value the product, the 1.5 * 2^23 rounding and
// the clamp of anything not within +-ACT_MAX (inf/NaN products) to +-ACT_MAX or 0.
TV_AVX512 void quantize_act(const float *x, ActBlock *out, int64_t cols) {
    const __m512 qmax = _mm512_set1_ps((float)ACT_MAX), magic = _mm512_set1_ps(12582912.0f), zero = _mm512_setzero_ps();
    for (int64_t b = 0; b < cols / QK; b++, x += QK) {
        const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
        const __m512 m = _mm512_max_ps(_mm512_abs_ps(x1), _mm512_max_ps(_mm512_abs_ps(x0), zero));
        const float amax = _mm512_reduce_max_ps(m), d = amax / (float)ACT_MAX, id = d > 0.0f ? 1.0f / d : 0.0f;
        const __m512 vid = _mm512_set1_ps(id);
        __m512i q[2];
        for (int h = 0; h < 2; h++) {
            const __m512 v = _mm512_mul_ps(h ? x1 : x0, vid);
            __m512 r = _mm512_sub_ps(_mm512_add_ps(v, magic), magic);
            const __mmask16 in = _mm512_cmp_ps_mask(_mm512_abs_ps(v), qmax, _CMP_LE_OQ);
            const __m512 sat = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ),
                                                    _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ), qmax),
                                                    _mm512_sub_ps(zero, qmax));
            r = _mm512_mask_blend_ps(in, sat, r);
            q[h] = _mm512_cvttps_epi32(r);
            _mm256_storeu_si256(reinterpret_cast<__m256i *>(out[b].qs + 16 * h), _mm512_cvtepi32_epi16(q[h]));
        }
        out[b].d = d;
        out[b].s = d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q[0], q[1]));
    }
}

// g = g / (1 + exp(-g)) * u with exp512 (a few ulp from libm's expf).
TV_AVX512 void silu_mul(float *g, const float *u, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = tail_mask(n - i);
        const __m512 x = _mm512_maskz_loadu_ps(k, g + i);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), x));
        _mm512_mask_storeu_ps(g + i, k, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), _mm512_maskz_loadu_ps(k, u + i)));
    }
}

const QuantGemm gemm = {NW, prepare, gemm_run};
Kernels make_table() {
    Kernels k = kernels_with_scalar_rows("avx512vnni");
    k.rows[TV_Q4_0] = rows<FmtQ4_0>;
    k.rows[TV_Q4_1] = rows<FmtQ4_1>;
    k.rows[TV_Q8_0] = rows<FmtQ8_0>;
    k.gemm = &gemm;
    k.dot_f32 = dot_f32;
    k.dot_f16 = dot_f16;
    k.attn_block = attn_block;
    k.quantize_act = quantize_act;
    k.silu_mul = silu_mul;
    return k;
}
const Kernels table = make_table();

}  // namespace

const Kernels *kernels_avx512_table() { return &table; }


bool cpu_has_avx512vnni() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

}  // namespace tv

#else  // not x86-64

namespace tv {
const Kernels *kernels_avx512_table() { return nullptr; }
bool cpu_has_avx512vnni() { return false; }
}  // namespace tv

#endif
