// AVX-512 (F/BW/VL) + VNNI kernels, per-function target attributes so the library still loads
// on CPUs without them (kernels.cpp only picks this table when the CPU reports all features).
//
// Weights are read through the format traits (formats.h, unpacked by x86_common.h): a 32-value
// slice becomes 32 int16 lanes in ActBlock.qs order, so VNNI (vpdpwssd) forms its exact integer
// dot. On Zen 4 a 512-bit op costs two 256-bit slots, so the win over AVX2 comes from doing less
// per slice, not from wider lanes: the quantized matmul (QuantGemm below) forms each slice's
// exact integer dot first and does the float work (convert, scale, accumulate) once per slice
// for 8 outputs at a time (8 weight rows in decode, 8 activation rows in the panel path).
#include "attn_block.h"
#include "kernels.h"
#include "tinyvllm.h"
#include "x86_common.h"

#if defined(__x86_64__)

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#define TV_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")))

namespace tv {
namespace {

// 16 int16 weights against 16 int16 activations as 8 int32 lanes (|sum| < 2^31 by far).
TV_AVX512 inline __m256i dot_half(__m256i w, const int16_t *x) {
    return _mm256_dpwssd_epi32(_mm256_setzero_si256(), w, _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x)));
}
// A whole slice: two chained dpwssd.
TV_AVX512 inline __m256i dot8(__m256i wlo, __m256i whi, const int16_t *x) {
    return _mm256_dpwssd_epi32(dot_half(wlo, x), whi, _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x + 16)));
}

// A format read as if it had no high bits and no offset (the rest of its traits unchanged).
template <class F>
struct LowBitsOnly : F {
    static constexpr High HIGH = HIGH_NONE;
    static constexpr int OFFSET = 0;
};

// unpack<F> with AVX-512BW's mask registers for a 32-bit high-bit mask (Q5_0, Q5_1): q = low +
// top * h - OFFSET is linear, so the bits select int16 lanes: Q5_1 (no offset) adds top where h = 1,
// Q5_0 (OFFSET == top) subtracts it where h = 0. One masked op per half instead of the AVX2 path's
// byte expansion and offset.
template <class F>
TV_AVX512 inline W16 unpack512(const uint8_t *blk, int s) {
    if constexpr (F::HIGH == HIGH_MASK32) {
        constexpr int top = 1 << F::LOW_BITS;
        static_assert(!F::HAS_TABLE && (F::OFFSET == 0 || F::OFFSET == top), "a shape this function knows");
        W16 u = unpack<LowBitsOnly<F>>(blk, s);
        uint32_t bits;
        std::memcpy(&bits, blk + F::src(s).hi, 4);
        if (F::OFFSET) bits = ~bits;
        const __m256i t = _mm256_set1_epi16(top);
        if constexpr (F::OFFSET == 0) {
            u.lo = _mm256_mask_add_epi16(u.lo, (__mmask16)bits, u.lo, t);
            u.hi = _mm256_mask_add_epi16(u.hi, (__mmask16)(bits >> 16), u.hi, t);
        } else {
            u.lo = _mm256_mask_sub_epi16(u.lo, (__mmask16)bits, u.lo, t);
            u.hi = _mm256_mask_sub_epi16(u.hi, (__mmask16)(bits >> 16), u.hi, t);
        }
        return u;
    } else {
        return unpack<F>(blk, s);
    }
}

TV_AVX512 inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

// ---- QuantGemm: the tiled matmul --------------------------------------------------------------
// Every output, whatever path computes it, is the same float sequence:
//     acc = 0; per slice: acc = fma(float(idot), d_w * d_x, acc)
//                         [TWO_SCALES: idot of values 0..15 with d_w[0], then 16..31 with d_w[1]]
//                         [HAS_MIN: acc = fma(m_w, s_x, acc)]
// where idot is the slice's exact integer dot (so the order of its int32 partial sums does not
// matter). Rows of a batch therefore get the same bits whichever path (and tile) ran them.
//   - m < GEMM_MIN (decode): 8 weight rows at a time, unpacked in registers, their slice dots
//     reduced into one 8-lane vector (lane = weight row);
//   - m >= GEMM_MIN: 8 weight rows unpacked once into an L1 panel of int16 pairs, then run
//     against tiles of 8 (m <= 8: ymm) or 16 (zmm) activation rows (lane = activation row): per
//     pair one broadcast weight dword meets the tile in one vpdpwssd, float work once per slice.
// Pairs are neighbours (values 2j, 2j + 1): dwords 0..7 hold values 0..15, 8..15 values 16..31.
// Per-half mins (Q2_K) are not run here: the driver falls back to the scalar rows for them.

constexpr int GEMM_MIN = 4;  // activation rows from which the panel path runs
constexpr int NW = 8;        // weight rows per group

// 64 bytes, 64-aligned: one slice of int16 (std::vector<__m512i> would drop the vector attributes).
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

// One tile of the panel path's activation layout (rows [t * tw, t * tw + tw), zero-padded).
TV_AVX512 void prepare_tile(Prep &p, const ActBlock *x, int64_t m, int64_t nb, int64_t t) {
    const int64_t tw = p.tw;
    for (int64_t b = 0; b < nb; b++) {
        int32_t *xt = p.xt.data() + ((t * nb + b) * 16) * tw;
        float *xd = p.xd.data() + (t * nb + b) * tw, *xs = p.xs.data() + (t * nb + b) * tw;
        for (int i = 0; i < tw; i++) {
            const int64_t row = t * tw + i;
            int32_t pairs[16] = {};  // the activations' int16 pairs, in memory order
            if (row < m) {
                const ActBlock &a = x[row * nb + b];
                std::memcpy(pairs, a.qs, sizeof pairs);
                xd[i] = a.d, xs[i] = a.s;
            } else {
                xd[i] = xs[i] = 0.0f;
            }
            for (int j = 0; j < 16; j++) xt[j * tw + i] = pairs[j];
        }
    }
}

TV_AVX512 const void *prepare(const ActBlock *x, int64_t m, int64_t nb, ThreadPool &pool) {
    thread_local Prep p;  // the calling thread's; workers fill tiles of it, then only read it
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
    // tiles are disjoint: a prefill's prep (2% of it) runs on every thread instead of one
    // (through a pointer: inside the lambda `p` would name each worker's own thread_local)
    Prep *mine = &p;
    if (tiles > 1) pool.run(tiles, [&](int64_t t, int) { prepare_tile(*mine, x, m, nb, t); });
    else prepare_tile(p, x, m, nb, 0);
    return &p;
}

TV_AVX512 inline void store_lanes(__m256 v, float *y, int64_t stride, int n) {
    alignas(32) float t[8];
    _mm256_store_ps(t, v);
    for (int i = 0; i < n; i++) y[i * stride] = t[i];
}

// The scales of one stored block of each of a group's 8 rows, lanes = rows: fixed f16 fields
// (F::D_AT, the min right after it) in one gather; K formats' integer scales transposed from the
// rows' bytes, times their gathered super-scales. Same products as F::scales: the same bits.
template <class F>
struct GroupScales {
    alignas(32) float d[F::SLICES][2][NW], m[F::SLICES][NW];
};
// f16 at byte `at` of each row's block (rows at w0 + voff); `second`: also the f16 right after it.
// A 4-byte gather that would end past the block reads the 2 bytes before instead.
template <int AT, int BYTES>
TV_AVX512 inline __m256 gather_half(const uint8_t *w0, __m256i voff, __m256 *second = nullptr) {
    if constexpr (AT + 4 <= BYTES) {
        const __m256i v = _mm256_i32gather_epi32(reinterpret_cast<const int *>(w0 + AT), voff, 1);
        if (second) *second = _mm256_cvtph_ps(_mm256_cvtepi32_epi16(_mm256_srli_epi32(v, 16)));
        return _mm256_cvtph_ps(_mm256_cvtepi32_epi16(v));
    } else {
        const __m256i v = _mm256_i32gather_epi32(reinterpret_cast<const int *>(w0 + AT - 2), voff, 1);
        return _mm256_cvtph_ps(_mm256_cvtepi32_epi16(_mm256_srli_epi32(v, 16)));
    }
}
template <class F>
TV_AVX512 inline void group_scales(const uint8_t *w0, const int32_t *off, __m256i voff, GroupScales<F> &g) {
    if constexpr (F::D_AT >= 0) {
        static_assert(F::SLICES == 1 && (!F::HAS_MIN || F::M_AT == F::D_AT + 2), "one gather reads d and m");
        __m256 m;
        const __m256 d = gather_half<F::D_AT, F::BYTES>(w0, voff, &m);
        _mm256_store_ps(g.d[0][0], d);
        _mm256_store_ps(g.d[0][1], d);
        if (F::HAS_MIN) _mm256_store_ps(g.m[0], m);
    } else {
        static_assert(nsc<F>() + (F::HAS_MIN ? F::SLICES : 0) <= 16 && !F::TWO_MINS, "one 16-byte row of integers");
        alignas(16) int8_t v[NW][32];
        __m128i rows[NW], cols[NW];
        for (int r = 0; r < NW; r++) {
            F::scale_ints(w0 + off[r], v[r]);
            rows[r] = _mm_load_si128(reinterpret_cast<const __m128i *>(v[r]));
        }
        transpose8x16(rows, cols);  // integer c of every row: cols[c / 2], low (c even) or high 8 bytes
        auto col = [&](int c) TV_AVX512 { return int8_lanes(c % 2 ? _mm_srli_si128(cols[c / 2], 8) : cols[c / 2]); };
        const __m256 d = gather_half<F::SD_AT, F::BYTES>(w0, voff);
        for (int s = 0; s < F::SLICES; s++) {
            _mm256_store_ps(g.d[s][0], _mm256_mul_ps(d, col(sc_index<F>(s, 0))));
            _mm256_store_ps(g.d[s][1], _mm256_mul_ps(d, col(sc_index<F>(s, 1))));
        }
        if constexpr (F::HAS_MIN) {
            const __m256 nd = _mm256_sub_ps(_mm256_setzero_ps(), gather_half<F::SDMIN_AT, F::BYTES>(w0, voff));
            for (int s = 0; s < F::SLICES; s++) _mm256_store_ps(g.m[s], _mm256_mul_ps(nd, col(mn_index<F>(s, 0))));
        }
    }
}

// Row offsets of a group: rows past r1 repeat the last one (computed, never stored).
TV_AVX512 inline __m256i group_offsets(int64_t g0, int64_t r1, size_t row_bytes, int32_t *off) {
    for (int r = 0; r < NW; r++) off[r] = (int32_t)((size_t)(std::min(g0 + r, r1 - 1) - g0) * row_bytes);
    return _mm256_loadu_si256(reinterpret_cast<const __m256i *>(off));
}

// 4 x (two rows' 8-lane dots, hadd-ed) -> one vector, lane r = row r's whole dot.
TV_AVX512 inline __m256i reduce8(const __m256i h[4]) {
    const __m256i A = _mm256_hadd_epi32(h[0], h[1]), B = _mm256_hadd_epi32(h[2], h[3]);
    return _mm256_add_epi32(_mm256_permute2x128_si256(A, B, 0x20), _mm256_permute2x128_si256(A, B, 0x31));
}

// Decode: weight rows [g0, g0 + 8) (clamped to r1 - 1; extra lanes are not stored) x NR rows.
template <class F, int NR>
TV_AVX512 void gemv8(const uint8_t *w, size_t row_bytes, int64_t g0, int64_t r1, const Prep &x, int64_t nb, float *y,
                     int64_t ldy) {
    alignas(32) int32_t off[NW];
    const __m256i voff = group_offsets(g0, r1, row_bytes, off);
    const uint8_t *w0 = w + (size_t)g0 * row_bytes;
    constexpr int PF_LINES = (NW * F::BYTES / F::SLICES + 63) / 64;  // per slice
    const uint8_t *next = w + (size_t)(g0 + NW) * row_bytes;
    __m256 acc[NR];
    for (int i = 0; i < NR; i++) acc[i] = _mm256_setzero_ps();
    GroupScales<F> gs;
    for (int64_t b0 = 0; b0 < nb; b0 += F::SLICES) {
        const size_t o = (size_t)(b0 / F::SLICES) * F::BYTES;
        if constexpr (F::D_AT < 0) group_scales<F>(w0 + o, off, voff, gs);
        for (int s = 0; s < F::SLICES; s++) {
            const int64_t b = b0 + s;
            // 8 interleaved row streams defeat the hardware prefetcher: fetch the next group (the 8
            // rows are contiguous) a few lines per slice, so it is in cache when its turn comes (a
            // burst of a whole K block's lines fills the miss buffers and stalls)
            for (int c = 0; c < PF_LINES; c++)
                _mm_prefetch(reinterpret_cast<const char *>(next + (b * PF_LINES + c) * 64), _MM_HINT_T0);
            __m256i h[NR][4], h2[NR][4];
            for (int p = 0; p < 4; p++) {
                const W16 a = unpack512<F>(w0 + off[2 * p] + o, s), c = unpack512<F>(w0 + off[2 * p + 1] + o, s);
                for (int i = 0; i < NR; i++) {
                    const int16_t *xq = x.qs[(size_t)(i * nb + b)].v;
                    if constexpr (F::TWO_SCALES) {
                        h[i][p] = _mm256_hadd_epi32(dot_half(a.lo, xq), dot_half(c.lo, xq));
                        h2[i][p] = _mm256_hadd_epi32(dot_half(a.hi, xq + 16), dot_half(c.hi, xq + 16));
                    } else {
                        h[i][p] = _mm256_hadd_epi32(dot8(a.lo, a.hi, xq), dot8(c.lo, c.hi, xq));
                    }
                }
            }
            __m256 d0, d1, mn;  // the 8 rows' scales of this slice (one gather for fixed f16 fields)
            if constexpr (F::D_AT >= 0) {
                d0 = d1 = gather_half<F::D_AT, F::BYTES>(w0 + o, voff, &mn);
            } else {
                d0 = _mm256_load_ps(gs.d[s][0]), d1 = _mm256_load_ps(gs.d[s][1]), mn = _mm256_load_ps(gs.m[s]);
            }
            for (int i = 0; i < NR; i++) {
                const size_t xb = (size_t)(i * nb + b);
                const __m256 dx = _mm256_set1_ps(x.d[xb]);
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(reduce8(h[i])), _mm256_mul_ps(d0, dx), acc[i]);
                if constexpr (F::TWO_SCALES)
                    acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(reduce8(h2[i])), _mm256_mul_ps(d1, dx), acc[i]);
                if constexpr (F::HAS_MIN) acc[i] = _mm256_fmadd_ps(mn, _mm256_set1_ps(x.s[xb]), acc[i]);
            }
        }
    }
    const int nw = (int)std::min<int64_t>(NW, r1 - g0);
    for (int i = 0; i < NR; i++) store_lanes(acc[i], y + i * ldy + g0, 1, nw);
}

// Decode, one weight row at a time (one memory stream): each slice's exact integer dot reduced to a
// scalar, then the same fma sequence as every other path (so the same bits). Q8_0's slices are so
// cheap to unpack that gemv8's 8 interleaved streams cost more than they save (14 vs 17-21 GB/s
// streamed, 2 threads); for every other format gemv8 is faster (measured: row decode 10-45% slower).
template <class F, int NR>
TV_AVX512 void gemv_row(const uint8_t *w, const Prep &x, int64_t nb, float *y, int64_t ldy) {
    float acc[NR] = {};
    BlockScales<F::SLICES> sc{};
    for (int64_t b0 = 0; b0 < nb; b0 += F::SLICES, w += F::BYTES) {
        block_scales<F>(w, sc);
        for (int s = 0; s < F::SLICES; s++) {
            const W16 u = unpack512<F>(w, s);
            for (int i = 0; i < NR; i++) {
                const size_t xb = (size_t)(i * nb + b0 + s);
                const int16_t *xq = x.qs[xb].v;
                if constexpr (F::TWO_SCALES) {
                    acc[i] = std::fma((float)hsum_i32(dot_half(u.lo, xq)), sc.d[s][0] * x.d[xb], acc[i]);
                    acc[i] = std::fma((float)hsum_i32(dot_half(u.hi, xq + 16)), sc.d[s][1] * x.d[xb], acc[i]);
                } else {
                    acc[i] = std::fma((float)hsum_i32(dot8(u.lo, u.hi, xq)), sc.d[s][0] * x.d[xb], acc[i]);
                }
                if constexpr (F::HAS_MIN) acc[i] = std::fma(sc.m[s][0], x.s[xb], acc[i]);
            }
        }
    }
    for (int i = 0; i < NR; i++) y[i * ldy] = acc[i];
}

// A panel: NW weight rows as int16 pairs [nb][NW][16] plus their scales [nb][NW].
struct Panel {
    std::vector<Blk16> w;  // one Blk16 = one slice's 16 pair dwords
    std::vector<float> d, d2, mn;
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
// pair, one weight dword broadcast meets TW rows in one vpdpwssd; float work once per slice.
template <class L, class Fmt>
TV_AVX512 void micro(const Panel &P, const Prep &x, int64_t t, int64_t nb, int nw, int ni, float *y, int64_t ldy) {
    constexpr int TW = sizeof(typename L::F) / 4;
    typename L::F acc[NW];
    for (int r = 0; r < NW; r++) acc[r] = L::zero_f();
    const int32_t *pw = reinterpret_cast<const int32_t *>(P.w.data()), *xt = x.xt.data() + t * nb * 16 * TW;
    const float *xd = x.xd.data() + t * nb * TW, *xs = x.xs.data() + t * nb * TW;
    for (int64_t b = 0; b < nb; b++, pw += NW * 16, xt += 16 * TW) {
        typename L::I id[NW], id2[NW];
        for (int r = 0; r < NW; r++) id[r] = L::zero_i(), id2[r] = L::zero_i();
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            const typename L::I xv = L::load_i(xt + j * TW);
            for (int r = 0; r < NW; r++) id[r] = L::dot(id[r], pw[r * 16 + j], xv);
        }
#pragma GCC unroll 8
        for (int j = 8; j < 16; j++) {  // values 16..31: their own sum when they have their own scale
            const typename L::I xv = L::load_i(xt + j * TW);
            for (int r = 0; r < NW; r++) {
                if constexpr (Fmt::TWO_SCALES) id2[r] = L::dot(id2[r], pw[r * 16 + j], xv);
                else id[r] = L::dot(id[r], pw[r * 16 + j], xv);
            }
        }
        const typename L::F dx = L::load_f(xd + b * TW);
        const float *pd = P.d.data() + b * NW, *pd2 = P.d2.data() + b * NW, *pm = P.mn.data() + b * NW;
        for (int r = 0; r < NW; r++) acc[r] = L::scale(acc[r], id[r], pd[r], dx);
        if constexpr (Fmt::TWO_SCALES)
            for (int r = 0; r < NW; r++) acc[r] = L::scale(acc[r], id2[r], pd2[r], dx);
        if constexpr (Fmt::HAS_MIN) {
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

template <class F>
TV_AVX512 void gemm_rows(const uint8_t *w, size_t row_bytes, int64_t r0, int64_t r1, const Prep &x, int64_t m,
                         int64_t nb, float *y, int64_t ldy) {
    if constexpr (F::LOW == LOW_I8) {  // see gemv_row; every other format streams faster in gemv8
        if (m < GEMM_MIN) {
            for (int64_t r = r0; r < r1; r++) switch (m) {
                    case 1: gemv_row<F, 1>(w + (size_t)r * row_bytes, x, nb, y + r, ldy); break;
                    case 2: gemv_row<F, 2>(w + (size_t)r * row_bytes, x, nb, y + r, ldy); break;
                    default: gemv_row<F, 3>(w + (size_t)r * row_bytes, x, nb, y + r, ldy); break;
                }
            return;
        }
    }
    if (m < GEMM_MIN) {
        for (int64_t g0 = r0; g0 < r1; g0 += NW) switch (m) {
                case 1: gemv8<F, 1>(w, row_bytes, g0, r1, x, nb, y, ldy); break;
                case 2: gemv8<F, 2>(w, row_bytes, g0, r1, x, nb, y, ldy); break;
                default: gemv8<F, 3>(w, row_bytes, g0, r1, x, nb, y, ldy); break;
            }
        return;
    }
    static thread_local Panel P;
    const size_t np = (size_t)(nb * NW);
    if (P.w.size() < np) P.w.resize(np), P.d.resize(np), P.d2.resize(np), P.mn.resize(np);
    GroupScales<F> gs;
    for (int64_t g0 = r0; g0 < r1; g0 += NW) {
        const int nw = (int)std::min<int64_t>(NW, r1 - g0);
        alignas(32) int32_t off[NW];
        const __m256i voff = group_offsets(g0, r1, row_bytes, off);
        const uint8_t *w0 = w + (size_t)g0 * row_bytes, *next = w0 + NW * row_bytes;
        constexpr int PF_LINES = (NW * F::BYTES / F::SLICES + 63) / 64;  // per slice: see gemv8
        for (int64_t b0 = 0; b0 < nb; b0 += F::SLICES) {
            const size_t o = (size_t)(b0 / F::SLICES) * F::BYTES;
            group_scales<F>(w0 + o, off, voff, gs);
            for (int s = 0; s < F::SLICES; s++) {
                const int64_t b = b0 + s;
                for (int c = 0; c < PF_LINES; c++)
                    _mm_prefetch(reinterpret_cast<const char *>(next + (b * PF_LINES + c) * 64), _MM_HINT_T1);
                for (int r = 0; r < NW; r++) {
                    const W16 u = unpack512<F>(w0 + off[r] + o, s);
                    _mm512_store_si512(P.w[(size_t)(b * NW + r)].v, _mm512_inserti64x4(_mm512_castsi256_si512(u.lo), u.hi, 1));
                }
                std::memcpy(P.d.data() + b * NW, gs.d[s][0], sizeof(float) * NW);
                if (F::TWO_SCALES) std::memcpy(P.d2.data() + b * NW, gs.d[s][1], sizeof(float) * NW);
                if (F::HAS_MIN) std::memcpy(P.mn.data() + b * NW, gs.m[s], sizeof(float) * NW);
            }
        }
        const int64_t tw = x.tw;
        for (int64_t t = 0; t * tw < m; t++) {
            const int ni = (int)std::min<int64_t>(tw, m - t * tw);
            if (tw == 8) micro<Lanes8, F>(P, x, t, nb, nw, ni, y + g0, ldy);
            else micro<Lanes16, F>(P, x, t, nb, nw, ni, y + g0, ldy);
        }
    }
}

TV_AVX512 bool gemm_run(int dtype, const uint8_t *w, size_t row_bytes, int64_t r0, int64_t r1, const void *prep,
                        int64_t m, int64_t nb, float *y, int64_t ldy) {
    const Prep &x = *static_cast<const Prep *>(prep);
    switch (dtype) {
#define TV_GEMM(F)                                                           \
    case F::DTYPE:                                                           \
        if constexpr (F::TWO_MINS) return false;                             \
        else return gemm_rows<F>(w, row_bytes, r0, r1, x, m, nb, y, ldy), true;
        TV_QUANT_FORMATS(TV_GEMM)
#undef TV_GEMM
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

// exp512 over a row of scores (the generic attention path: head sizes other than 64).
TV_AVX512 void exp_in_place(float *x, int n) {
    for (int i = 0; i < n; i += 16) {
        const __mmask16 k = tail_mask(n - i);
        _mm512_mask_storeu_ps(x + i, k, exp512(_mm512_maskz_loadu_ps(k, x + i)));
    }
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
        return attn_block_rows(conv_row, exp_in_place, q, R, hd, n_valid, k, v, ld, f16, bs, scale, m, l, acc, work);
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

// gelu(x) * u = x * u / (1 + exp(-2y)), y = sqrt(2/pi) (x + 0.044715 x^3): 0.5 (1 + tanh(y)) is
// the logistic function of 2y, so one exp512 serves (a few ulp from libm's tanh form).
TV_AVX512 void gelu_mul(float *g, const float *u, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f), c = _mm512_set1_ps(-2.0f * 0.7978845608028654f),
                 c3 = _mm512_set1_ps(0.044715f);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = tail_mask(n - i);
        const __m512 x = _mm512_maskz_loadu_ps(k, g + i);
        const __m512 e = exp512(_mm512_mul_ps(c, _mm512_fmadd_ps(_mm512_mul_ps(c3, x), _mm512_mul_ps(x, x), x)));
        _mm512_mask_storeu_ps(g + i, k, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), _mm512_maskz_loadu_ps(k, u + i)));
    }
}

const QuantGemm gemm = {NW, prepare, gemm_run};
Kernels make_table() {
    Kernels k = make_kernels("avx512vnni", dot_f32, dot_f16, attn_block, quantize_act, silu_mul, gelu_mul);
    k.gemm = &gemm;  // every format but per-half mins; those keep the scalar rows
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
