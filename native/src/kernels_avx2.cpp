// AVX2 + FMA + F16C kernels. Compiled with per-function target attributes (not -mavx2) so the
// library still loads and runs the scalar path on CPUs without AVX2.
//
// Integer slice dot: a weight slice (formats.h, unpacked by x86_common.h) is 2 x 16 int16 lanes
// (values 0..15 and 16..31), multiplied with the int16 activations by _mm256_madd_epi16 (pairs ->
// 8 x int32, exact: |w| <= 128, |x| <= 32767), converted to float and scaled by d_w * d_x with one
// FMA per slice (per half when the halves have their own scales).
#include "attn_block.h"
#include "kernels.h"
#include "ops.h"
#include "tinyvllm.h"
#include "x86_common.h"

#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#define TV_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace tv {
namespace {

// One slice against NX activation rows: unpacked once, one FMA per row (two when the slice's
// halves have their own scales).
template <class F, int NX>
TV_AVX2 inline void slice_step(const uint8_t *blk, int s, const BlockScales<F::SLICES> &sc, const ActBlock *x,
                               int64_t nb, __m256 *acc, float *macc) {
    const W16 wv = unpack<F>(blk, s);
    for (int i = 0; i < NX; i++) {
        const ActBlock &xb = x[i * nb];
        const __m256i lo = _mm256_madd_epi16(wv.lo, _mm256_loadu_si256(reinterpret_cast<const __m256i *>(xb.qs)));
        const __m256i hi = _mm256_madd_epi16(wv.hi, _mm256_loadu_si256(reinterpret_cast<const __m256i *>(xb.qs + 16)));
        if constexpr (F::TWO_SCALES) {
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_set1_ps(sc.d[s][0] * xb.d), acc[i]);
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_set1_ps(sc.d[s][1] * xb.d), acc[i]);
        } else {
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi)), _mm256_set1_ps(sc.d[s][0] * xb.d), acc[i]);
        }
        // explicit fma: contraction must not depend on NX (vectorized or not) for batch invariance
        if constexpr (F::HAS_MIN) macc[i] = std::fma(sc.m[s][0], xb.s, macc[i]);
    }
}

// Two accumulator sets (even / odd slices) hide the FMA latency; the same for every NX, so a
// row's result does not depend on how many rows ran with it.
template <class F, int NX>
TV_AVX2 void rows_nx(const uint8_t *w, const ActBlock *x, int64_t nb, float *out, int64_t out_stride) {
    __m256 acc[2][NX];
    float macc[NX];
    for (int i = 0; i < NX; i++) acc[0][i] = acc[1][i] = _mm256_setzero_ps(), macc[i] = 0.0f;
    BlockScales<F::SLICES> sc{};
    for (int64_t b = 0; b < nb; b += F::SLICES, w += F::BYTES) {
        block_scales<F>(w, sc);
        for (int s = 0; s < F::SLICES; s++) slice_step<F, NX>(w, s, sc, x + b + s, nb, acc[(b + s) & 1], macc);
    }
    for (int i = 0; i < NX; i++) out[i * out_stride] = hsum_f32(_mm256_add_ps(acc[0][i], acc[1][i])) + macc[i];
}

template <class F>
TV_AVX2 void rows(const uint8_t *w, const ActBlock *x, int64_t nb, int nx, float *out, int64_t out_stride) {
    switch (nx) {
        case 1: rows_nx<F, 1>(w, x, nb, out, out_stride); break;
        case 2: rows_nx<F, 2>(w, x, nb, out, out_stride); break;
        case 3: rows_nx<F, 3>(w, x, nb, out, out_stride); break;
        default: rows_nx<F, 4>(w, x, nb, out, out_stride); break;
    }
}

// ---- QuantGemm: the tiled matmul, shaped like kernels_avx512.cpp's -----------------------------
// Every output is the same float sequence as on the AVX-512 path (so a token's row gets the same
// bits from the decode and the panel kernel, whatever its batch):
//     acc = 0; per slice: acc = fma(float(idot), d_w * d_x, acc)
//                         [TWO_SCALES: idot of values 0..15 with d_w[0], then 16..31 with d_w[1]]
//                         [HAS_MIN: acc = fma(m_w, s_x, acc)]
// with idot the slice's exact integer dot (vpmaddwd pairs + vpaddd: AVX2 has no vpdpwssd, so each
// pair costs two ops instead of one, and the order of exact int32 sums does not matter).
//   - m < GEMM_MIN (decode): 8 weight rows at a time, unpacked in registers, their slice dots
//     reduced into one 8-lane vector (lane = weight row): float work once per slice for 8 rows;
//   - m >= GEMM_MIN: 8 weight rows unpacked once into an L1 panel of int16 pairs, then run against
//     tiles of 8 activation rows (lane = activation row): per pair one broadcast weight dword meets
//     the tile in vpmaddwd + vpaddd. AVX2 has 16 ymm registers, not 32: the micro kernel keeps its
//     8 int32 accumulators (one per panel row) in registers; the float ones, touched once per slice,
//     may spill (MR = 4, nothing spilled, measured 5% slower).
// Per-half mins (Q2_K) are not run here: the driver falls back to the rows[] kernels for them.

constexpr int GEMM_MIN = 4;  // activation rows from which the panel path runs
constexpr int NW = 8;        // weight rows per group (decode lanes, panel rows)
constexpr int TW = 8;        // activation rows per panel tile (ymm lanes)
constexpr int MR = 8;        // panel rows per micro-kernel pass (a divisor of NW)

struct alignas(64) Blk16 {  // one slice of int16 (std::vector<__m256i> would drop the vector attributes)
    int16_t v[QK];
};

struct Prep {
    std::vector<Blk16> qs;      // [m][nb] (decode path)
    std::vector<float> d, s;    // [m][nb]
    std::vector<int32_t> xt;    // [tile][nb][16 pairs][TW rows], padded rows 0
    std::vector<float> xd, xs;  // [tile][nb][TW]
};

TV_AVX2 inline __m256i dot_half(__m256i w, const int16_t *x) {
    return _mm256_madd_epi16(w, _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x)));
}
TV_AVX2 inline __m256i dot8(__m256i wlo, __m256i whi, const int16_t *x) {
    return _mm256_add_epi32(dot_half(wlo, x), dot_half(whi, x + 16));
}

void prepare_tile(Prep &p, const ActBlock *x, int64_t m, int64_t nb, int64_t t) {
    for (int64_t b = 0; b < nb; b++) {
        int32_t *xt = p.xt.data() + ((t * nb + b) * 16) * TW;
        float *xd = p.xd.data() + (t * nb + b) * TW, *xs = p.xs.data() + (t * nb + b) * TW;
        for (int i = 0; i < TW; i++) {
            const int64_t row = t * TW + i;
            int32_t pairs[16] = {};  // the activations' int16 pairs, in memory order
            if (row < m) {
                const ActBlock &a = x[row * nb + b];
                std::memcpy(pairs, a.qs, sizeof pairs);
                xd[i] = a.d, xs[i] = a.s;
            } else {
                xd[i] = xs[i] = 0.0f;
            }
            for (int j = 0; j < 16; j++) xt[j * TW + i] = pairs[j];
        }
    }
}

const void *prepare(const ActBlock *x, int64_t m, int64_t nb, ThreadPool &pool) {
    thread_local Prep p;  // the calling thread's; workers fill tiles of it, then only read it
    const size_t n = (size_t)(m * nb);
    if (m < GEMM_MIN) {
        if (p.qs.size() < n) p.qs.resize(n), p.d.resize(n), p.s.resize(n);
        for (size_t i = 0; i < n; i++) {
            std::memcpy(p.qs[i].v, x[i].qs, sizeof p.qs[i].v);
            p.d[i] = x[i].d;
            p.s[i] = x[i].s;
        }
        return &p;
    }
    const int64_t tiles = (m + TW - 1) / TW;
    if (p.xt.size() < (size_t)(tiles * nb * 16 * TW)) p.xt.resize((size_t)(tiles * nb * 16 * TW));
    if (p.xd.size() < (size_t)(tiles * nb * TW)) p.xd.resize((size_t)(tiles * nb * TW)), p.xs.resize(p.xd.size());
    Prep *mine = &p;  // inside the lambda `p` would name each worker's own thread_local
    if (tiles > 1) pool.run(tiles, [&](int64_t t, int) { prepare_tile(*mine, x, m, nb, t); });
    else prepare_tile(p, x, m, nb, 0);
    return &p;
}

TV_AVX2 inline void store_lanes(__m256 v, float *y, int n) {
    alignas(32) float t[8];
    _mm256_store_ps(t, v);
    for (int i = 0; i < n; i++) y[i] = t[i];
}

// The f16 at byte AT of each of a group's 8 blocks (rows at w0 + off[r]) as 8 float lanes: 8 scalar
// loads (AVX2 gathers are slow on many cores, and there is no vpmovdw to narrow a dword gather).
template <int AT>
TV_AVX2 inline __m256 halves8(const uint8_t *w0, const int32_t *off) {
    const uint8_t *p = w0 + AT;
    return _mm256_cvtph_ps(_mm_setr_epi16((short)load_u16(p + off[0]), (short)load_u16(p + off[1]),
                                          (short)load_u16(p + off[2]), (short)load_u16(p + off[3]),
                                          (short)load_u16(p + off[4]), (short)load_u16(p + off[5]),
                                          (short)load_u16(p + off[6]), (short)load_u16(p + off[7])));
}

// d and m (the f16 pair at D_AT) of each of a group's 8 blocks in one pass: 8 dword loads, low
// halves to *d, high halves to *m.
template <int AT>
TV_AVX2 inline void half_pairs8(const uint8_t *w0, const int32_t *off, __m256 *d, __m256 *m) {
    auto u32 = [&](int r) { uint32_t v; std::memcpy(&v, w0 + AT + off[r], 4); return (int)v; };
    const __m256i v = _mm256_setr_epi32(u32(0), u32(1), u32(2), u32(3), u32(4), u32(5), u32(6), u32(7));
    const __m256i split = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
                                           0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
    const __m256i t = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, split), 0xD8);  // [d 0..7 | m 0..7]
    *d = _mm256_cvtph_ps(_mm256_castsi256_si128(t));
    *m = _mm256_cvtph_ps(_mm256_extracti128_si256(t, 1));
}

// unpack<F> (x86_common.h) with a shorter form for plain 16-byte nibbles (Q4_0, Q4_1): widen the
// bytes to int16 once, then the low nibble is a mask and the high one a shift (3-4 ops, not 6-8).
template <class F>
TV_AVX2 inline W16 unpack2(const uint8_t *blk, int s) {
    if constexpr (F::LOW == LOW_NIB16 && F::HIGH == HIGH_NONE && !F::HAS_TABLE) {
        const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(blk + F::src(s).lo)));
        __m256i lo = _mm256_and_si256(v, _mm256_set1_epi16(15)), hi = _mm256_srli_epi16(v, 4);
        if constexpr (F::OFFSET != 0) {
            lo = _mm256_sub_epi16(lo, _mm256_set1_epi16(F::OFFSET));
            hi = _mm256_sub_epi16(hi, _mm256_set1_epi16(F::OFFSET));
        }
        return {lo, hi};
    } else {
        return unpack<F>(blk, s);
    }
}

// The scales of one stored block of each of a group's 8 rows, lanes = rows (same products as
// F::scales: the same bits).
template <class F>
struct GroupScales {
    alignas(32) float d[F::SLICES][2][NW], m[F::SLICES][NW];
};
template <class F>
TV_AVX2 inline void group_scales(const uint8_t *w0, const int32_t *off, GroupScales<F> &g) {
    if constexpr (F::D_AT >= 0) {
        __m256 d, m;
        if constexpr (F::HAS_MIN && F::M_AT == F::D_AT + 2) {
            half_pairs8<F::D_AT>(w0, off, &d, &m);
            _mm256_store_ps(g.m[0], m);
        } else {
            d = halves8<F::D_AT>(w0, off);
            if constexpr (F::HAS_MIN) _mm256_store_ps(g.m[0], halves8<F::M_AT>(w0, off));
        }
        _mm256_store_ps(g.d[0][0], d);
        _mm256_store_ps(g.d[0][1], d);
    } else {
        static_assert(nsc<F>() + (F::HAS_MIN ? F::SLICES : 0) <= 16 && !F::TWO_MINS, "one 16-byte row of integers");
        alignas(16) int8_t v[NW][32];
        __m128i rows[NW], cols[NW];
        for (int r = 0; r < NW; r++) {
            F::scale_ints(w0 + off[r], v[r]);
            rows[r] = _mm_load_si128(reinterpret_cast<const __m128i *>(v[r]));
        }
        transpose8x16(rows, cols);  // integer c of every row: cols[c / 2], low (c even) or high 8 bytes
        auto col = [&](int c) TV_AVX2 { return int8_lanes(c % 2 ? _mm_srli_si128(cols[c / 2], 8) : cols[c / 2]); };
        const __m256 d = halves8<F::SD_AT>(w0, off);
        for (int s = 0; s < F::SLICES; s++) {
            _mm256_store_ps(g.d[s][0], _mm256_mul_ps(d, col(sc_index<F>(s, 0))));
            _mm256_store_ps(g.d[s][1], _mm256_mul_ps(d, col(sc_index<F>(s, 1))));
        }
        if constexpr (F::HAS_MIN) {
            const __m256 nd = _mm256_sub_ps(_mm256_setzero_ps(), halves8<(F::SDMIN_AT > 0 ? F::SDMIN_AT : 0)>(w0, off));
            for (int s = 0; s < F::SLICES; s++) _mm256_store_ps(g.m[s], _mm256_mul_ps(nd, col(mn_index<F>(s, 0))));
        }
    }
}

// Row offsets of a group: rows past r1 repeat the last one (computed, never stored).
inline void group_offsets(int64_t g0, int64_t r1, size_t row_bytes, int32_t *off) {
    for (int r = 0; r < NW; r++) off[r] = (int32_t)((size_t)(std::min(g0 + r, r1 - 1) - g0) * row_bytes);
}

// 4 x (two rows' 8-lane dots, hadd-ed) -> one vector, lane r = row r's whole dot.
TV_AVX2 inline __m256i reduce8(const __m256i h[4]) {
    const __m256i A = _mm256_hadd_epi32(h[0], h[1]), B = _mm256_hadd_epi32(h[2], h[3]);
    return _mm256_add_epi32(_mm256_permute2x128_si256(A, B, 0x20), _mm256_permute2x128_si256(A, B, 0x31));
}

// Decode: weight rows [g0, g0 + 8) (clamped to r1 - 1; extra lanes are not stored) x NR rows.
template <class F, int NR>
TV_AVX2 void gemv8(const uint8_t *w, size_t row_bytes, int64_t g0, int64_t r1, const Prep &x, int64_t nb, float *y,
                   int64_t ldy) {
    alignas(32) int32_t off[NW];
    group_offsets(g0, r1, row_bytes, off);
    const uint8_t *w0 = w + (size_t)g0 * row_bytes;
    constexpr int PF_LINES = (NW * F::BYTES / F::SLICES + 63) / 64;  // per slice
    const uint8_t *next = w + (size_t)(g0 + NW) * row_bytes;
    __m256 acc[NR];
    for (int i = 0; i < NR; i++) acc[i] = _mm256_setzero_ps();
    GroupScales<F> gs;
    for (int64_t b0 = 0; b0 < nb; b0 += F::SLICES) {
        const size_t o = (size_t)(b0 / F::SLICES) * F::BYTES;
        group_scales<F>(w0 + o, off, gs);
        for (int s = 0; s < F::SLICES; s++) {
            const int64_t b = b0 + s;
            // 8 interleaved row streams defeat the hardware prefetcher: fetch the next group a few
            // lines per slice (as kernels_avx512.cpp's gemv8)
            for (int c = 0; c < PF_LINES; c++)
                _mm_prefetch(reinterpret_cast<const char *>(next + (b * PF_LINES + c) * 64), _MM_HINT_T0);
            __m256i h[NR][4], h2[NR][4];
            for (int p = 0; p < 4; p++) {
                const W16 a = unpack2<F>(w0 + off[2 * p] + o, s), c = unpack2<F>(w0 + off[2 * p + 1] + o, s);
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
            const __m256 d0 = _mm256_load_ps(gs.d[s][0]), d1 = _mm256_load_ps(gs.d[s][1]);
            for (int i = 0; i < NR; i++) {
                const size_t xb = (size_t)(i * nb + b);
                const __m256 dx = _mm256_set1_ps(x.d[xb]);
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(reduce8(h[i])), _mm256_mul_ps(d0, dx), acc[i]);
                if constexpr (F::TWO_SCALES)
                    acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(reduce8(h2[i])), _mm256_mul_ps(d1, dx), acc[i]);
                if constexpr (F::HAS_MIN)
                    acc[i] = _mm256_fmadd_ps(_mm256_load_ps(gs.m[s]), _mm256_set1_ps(x.s[xb]), acc[i]);
            }
        }
    }
    const int nw = (int)std::min<int64_t>(NW, r1 - g0);
    for (int i = 0; i < NR; i++) store_lanes(acc[i], y + i * ldy + g0, nw);
}

// A panel: NW weight rows as int16 pairs [nb][NW][16] plus their scales [nb][NW].
struct Panel {
    std::vector<Blk16> w;  // one Blk16 = one slice's 16 pair dwords
    std::vector<float> d, d2, mn;
};

// Panel rows [r0, r0 + MR) x one tile of TW activation rows (the lanes): per pair, one broadcast
// weight dword meets the TW rows in vpmaddwd + vpaddd; float work once per slice.
template <class Fmt>
TV_AVX2 void micro(const Panel &P, int r0, const Prep &x, int64_t t, int64_t nb, int nw, int ni, float *y, int64_t ldy) {
    __m256 acc[MR];
    for (int r = 0; r < MR; r++) acc[r] = _mm256_setzero_ps();
    const int32_t *pw = reinterpret_cast<const int32_t *>(P.w.data()) + r0 * 16, *xt = x.xt.data() + t * nb * 16 * TW;
    const float *xd = x.xd.data() + t * nb * TW, *xs = x.xs.data() + t * nb * TW;
    auto pairs = [&](__m256i *id, int j0) TV_AVX2 {
#pragma GCC unroll 8
        for (int j = j0; j < j0 + 8; j++) {
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(xt + j * TW));
            for (int r = 0; r < MR; r++) {
                id[r] = _mm256_add_epi32(id[r], _mm256_madd_epi16(_mm256_set1_epi32(pw[r * 16 + j]), xv));
                // keeps the accumulator a register chain: GCC otherwise re-associates the exact int
                // sums into all products first, spilled to the stack (2.5x slower, measured)
                asm("" : "+x"(id[r]));
            }
        }
    };
    for (int64_t b = 0; b < nb; b++, pw += NW * 16, xt += 16 * TW) {
        const __m256 dx = _mm256_loadu_ps(xd + b * TW);
        const float *pd = P.d.data() + b * NW + r0, *pd2 = P.d2.data() + b * NW + r0, *pm = P.mn.data() + b * NW + r0;
        __m256i id[MR];
        for (int r = 0; r < MR; r++) id[r] = _mm256_setzero_si256();
        pairs(id, 0);
        if constexpr (Fmt::TWO_SCALES) {  // values 16..31 have their own scale: fold the first half now
            for (int r = 0; r < MR; r++) {
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(id[r]), _mm256_mul_ps(_mm256_set1_ps(pd[r]), dx), acc[r]);
                id[r] = _mm256_setzero_si256();
            }
            pairs(id, 8);
            for (int r = 0; r < MR; r++)
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(id[r]), _mm256_mul_ps(_mm256_set1_ps(pd2[r]), dx), acc[r]);
        } else {
            pairs(id, 8);
            for (int r = 0; r < MR; r++)
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(id[r]), _mm256_mul_ps(_mm256_set1_ps(pd[r]), dx), acc[r]);
        }
        if constexpr (Fmt::HAS_MIN) {
            const __m256 sx = _mm256_loadu_ps(xs + b * TW);
            for (int r = 0; r < MR; r++) acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(pm[r]), sx, acc[r]);
        }
    }
    alignas(32) float tmp[TW];
    for (int r = 0; r < MR && r0 + r < nw; r++) {
        _mm256_store_ps(tmp, acc[r]);
        for (int i = 0; i < ni; i++) y[(t * TW + i) * ldy + r0 + r] = tmp[i];
    }
}

template <class F>
TV_AVX2 void gemm_rows(const uint8_t *w, size_t row_bytes, int64_t r0, int64_t r1, const Prep &x, int64_t m,
                       int64_t nb, float *y, int64_t ldy) {
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
        group_offsets(g0, r1, row_bytes, off);
        const uint8_t *w0 = w + (size_t)g0 * row_bytes, *next = w0 + NW * row_bytes;
        constexpr int PF_LINES = (NW * F::BYTES / F::SLICES + 63) / 64;  // per slice: see gemv8
        for (int64_t b0 = 0; b0 < nb; b0 += F::SLICES) {
            const size_t o = (size_t)(b0 / F::SLICES) * F::BYTES;
            group_scales<F>(w0 + o, off, gs);
            for (int s = 0; s < F::SLICES; s++) {
                const int64_t b = b0 + s;
                for (int c = 0; c < PF_LINES; c++)
                    _mm_prefetch(reinterpret_cast<const char *>(next + (b * PF_LINES + c) * 64), _MM_HINT_T1);
                for (int r = 0; r < NW; r++) {
                    const W16 u = unpack2<F>(w0 + off[r] + o, s);
                    int16_t *dst = P.w[(size_t)(b * NW + r)].v;
                    _mm256_store_si256(reinterpret_cast<__m256i *>(dst), u.lo);
                    _mm256_store_si256(reinterpret_cast<__m256i *>(dst + 16), u.hi);
                }
                std::memcpy(P.d.data() + b * NW, gs.d[s][0], sizeof(float) * NW);
                if (F::TWO_SCALES) std::memcpy(P.d2.data() + b * NW, gs.d[s][1], sizeof(float) * NW);
                if (F::HAS_MIN) std::memcpy(P.mn.data() + b * NW, gs.m[s], sizeof(float) * NW);
            }
        }
        for (int64_t t = 0; t * TW < m; t++) {
            const int ni = (int)std::min<int64_t>(TW, m - t * TW);
            for (int rr = 0; rr < nw; rr += MR) micro<F>(P, rr, x, t, nb, nw, ni, y + g0, ldy);
        }
    }
}

bool gemm_run(int dtype, const uint8_t *w, size_t row_bytes, int64_t r0, int64_t r1, const void *prep, int64_t m,
              int64_t nb, float *y, int64_t ldy) {
    const Prep &x = *static_cast<const Prep *>(prep);
    switch (dtype) {
#define TV_GEMM(F)                                               \
    case F::DTYPE:                                               \
        if constexpr (F::TWO_MINS) return false;                 \
        else return gemm_rows<F>(w, row_bytes, r0, r1, x, m, nb, y, ldy), true;
        TV_QUANT_FORMATS(TV_GEMM)
#undef TV_GEMM
        default: return false;
    }
}

TV_AVX2 float dot_f32(const float *w, const float *x, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    float s = hsum_f32(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < n; i++) s += w[i] * x[i];
    return s;
}

TV_AVX2 inline __m256 load_h8(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
}

TV_AVX2 float dot_f16(const uint16_t *w, const float *x, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(load_h8(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(load_h8(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    }
    for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(load_h8(w + i), _mm256_loadu_ps(x + i), a0);
    float s = hsum_f32(_mm256_add_ps(a0, a1));
    for (; i < n; i++) s += _cvtsh_ss(w[i]) * x[i];
    return s;
}

TV_AVX2 void conv_row(const uint8_t *src, bool f16, float *dst, int hd) {  // hd: any count
    int i = 0;
    if (f16) {
        for (; i + 8 <= hd; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(src + 2 * i))));
        for (; i < hd; i++) dst[i] = _cvtsh_ss(load_u16(src + 2 * i));
    } else {
        std::memcpy(dst, src, sizeof(float) * hd);
    }
}

// quantize_row_act 8 lanes at a time, bit for bit (the reasoning is at kernels_avx512.cpp's copy,
// which takes ~25% less time with mask registers (measured): the two stay apart).
TV_AVX2 void quantize_act(const float *x, ActBlock *out, int64_t cols) {
    const __m256 qmax = _mm256_set1_ps((float)ACT_MAX), magic = _mm256_set1_ps(12582912.0f), zero = _mm256_setzero_ps();
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (int64_t b = 0; b < cols / QK; b++, x += QK) {
        __m256 xv[4], m = zero;
        for (int h = 0; h < 4; h++) xv[h] = _mm256_loadu_ps(x + 8 * h), m = _mm256_max_ps(_mm256_and_ps(xv[h], abs_mask), m);
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        const float d = amax / (float)ACT_MAX, id = d > 0.0f ? 1.0f / d : 0.0f;
        __m256i sum = _mm256_setzero_si256();
        for (int h = 0; h < 4; h++) {
            const __m256 v = _mm256_mul_ps(xv[h], _mm256_set1_ps(id));
            const __m256 r = _mm256_sub_ps(_mm256_add_ps(v, magic), magic);
            const __m256 sat = _mm256_blendv_ps(_mm256_and_ps(_mm256_cmp_ps(v, zero, _CMP_GT_OQ), qmax),
                                                _mm256_sub_ps(zero, qmax), _mm256_cmp_ps(v, zero, _CMP_LT_OQ));
            const __m256i q = _mm256_cvttps_epi32(_mm256_blendv_ps(sat, r, _mm256_cmp_ps(_mm256_and_ps(v, abs_mask), qmax, _CMP_LE_OQ)));
            sum = _mm256_add_epi32(sum, q);
            _mm_storeu_si128(reinterpret_cast<__m128i *>(out[b].qs + 8 * h),
                             _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)));
        }
        out[b].d = d;
        out[b].s = d * (float)hsum_i32(sum);
    }
}

// e^x, x clamped to [-87, 88] (EXP_POLY as in kernels_avx512.cpp's exp512; 2^n built
// in the exponent bits, which the clamp keeps in range).
TV_AVX2 inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_LO), r);
    __m256 p = _mm256_set1_ps(EXP_POLY[0]);
    for (int i = 1; i < 6; i++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_POLY[i]));
    const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// exp256 over a row of scores (attention), libm for the last n % 8: the same for a query however it
// is batched, since n is its own number of visible keys in the block.
TV_AVX2 void exp_in_place(float *x, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, exp256(_mm256_loadu_ps(x + i)));
    exp_in_place_libm(x + i, n - i);
}
TV_DEFINE_ATTN_BLOCK(TV_AVX2, attn_block, conv_row, exp_in_place)

TV_AVX2 void silu_mul(float *g, const float *u, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), x));
        _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
    swiglu(g + i, u + i, n - i);
}

// gelu(x) * u = x * u / (1 + exp(-2y)), y = sqrt(2/pi) (x + 0.044715 x^3): 0.5 (1 + tanh(y)) is
// the logistic function of 2y, so one exp256 serves (a few ulp from libm's tanh form).
TV_AVX2 void gelu_mul(float *g, const float *u, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f), c = _mm256_set1_ps(-2.0f * 0.7978845608028654f),
                 c3 = _mm256_set1_ps(0.044715f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 e = exp256(_mm256_mul_ps(c, _mm256_fmadd_ps(_mm256_mul_ps(c3, x), _mm256_mul_ps(x, x), x)));
        _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
    gelu_tanh_mul(g + i, u + i, n - i);
}

const QuantGemm gemm = {NW, prepare, gemm_run};
Kernels make_table() {
    Kernels k = make_kernels("avx2", dot_f32, dot_f16, attn_block, quantize_act, silu_mul, gelu_mul);
#define TV_ROWS(F) \
    if (!F::TWO_MINS) k.rows[F::DTYPE] = rows<F>;  // per-half mins (Q2_K) keep the scalar rows
    TV_QUANT_FORMATS(TV_ROWS)
#undef TV_ROWS
    k.gemm = &gemm;  // every format but per-half mins (Q2_K keeps the scalar rows)
    return k;
}
const Kernels table = make_table();

}  // namespace

const Kernels *kernels_avx2_table() { return &table; }

bool cpu_has_avx2() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

}  // namespace tv

#else  // not x86

namespace tv {
const Kernels *kernels_avx2_table() { return nullptr; }
bool cpu_has_avx2() { return false; }
}  // namespace tv

#endif
