// The x86 paths' QuantGemm (kernels.h), written once for every vector width: kernels_avx2.cpp and
// kernels_avx512.cpp each define TV_ISA (their target attribute) and an ISA traits struct, include
// this file, and instantiate `x86_gemm<Isa>`. What a traits struct `I` holds:
//   unpack<F>(blk, s) -> W16        a slice as int16 lanes (x86_common.h's unpack, or a faster form)
//   high_bits<F>(z1, z2, ba, bc)    decode: adds 1 << LOW_BITS to the slice bytes of two rows (one
//                                   128-bit half each) whose bit is set in their 32-bit masks
//   zmm_decode<F>(), slice_dots_zmm<F, NR>(...)  decode formats the ISA runs its own way (AVX-512:
//                                   int8 two rows per zmm), in place of slice_dots
//   halves<AT, BYTES>(w0, off, voff, second)  the f16 at byte AT of 8 rows' blocks as 8 float lanes
//                                   (second: also the f16 right after it)
//   dot_pairs(acc, w, x)            acc + w . x per int16 pair, 8 int32 lanes (for Ymm below)
//   Wide                            TW_MAX activation rows as vector lanes for micro() (as Ymm)
//   TW_MAX                          widest tile (activation rows)
//
// Every output, whatever path or tile computes it, is the same float sequence:
//     acc = 0; per slice: acc = fma(float(idot), d_w * d_x, acc)
//                         [TWO_SCALES: idot of values 0..15 with d_w[0], then 16..31 with d_w[1]]
//                         [HAS_MIN: acc = fma(m_w, s_x, acc)]
// where idot is the slice's exact integer dot (so the order of its int32 partial sums does not
// matter). Rows of a batch therefore get the same bits whichever x86 path (and tile) ran them.
//   - m < GEMM_MIN (decode): 8 weight rows at a time, two per register (slice_dots below), their
//     slice dots reduced into one 8-lane vector (lane = weight row): float work once per slice for
//     8 rows;
//   - m >= GEMM_MIN: 8 weight rows unpacked once into an L1 panel of int16 pairs, then run against
//     tiles of 8 (ymm) or 16 (zmm) activation rows (lane = activation row): per pair one broadcast
//     weight dword meets the tile in one vpdpwssd (AVX2: vpmaddwd + vpaddd). AVX2 has 16 ymm
//     registers: the micro kernel keeps its 8 int32 accumulators in registers (one set, folded
//     after each scale's half); the float ones, touched once per slice, may spill.
// Pairs are neighbours (values 2j, 2j + 1): dwords 0..7 hold values 0..15, 8..15 values 16..31.
// Per-half mins (Q2_K) are not run here: the driver falls back to the rows kernels for them.
#pragma once

#if defined(__x86_64__) || defined(__i386__)

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "x86_common.h"

#ifndef TV_ISA
#error "define TV_ISA (the including path's target attribute) before including x86_gemm.h"
#endif

namespace tv {
namespace {

constexpr int GEMM_MIN = 4;  // activation rows from which the panel path runs
constexpr int NW = 8;        // weight rows per group (decode lanes, panel rows)

// One slice of int16, 64-aligned (std::vector<__m256i> would drop the vector attributes).
struct alignas(64) Blk16 {
    int16_t v[QK];
};

struct Prep {
    std::vector<Blk16> qe;       // [m][nb] (decode path), in decode_act's order
    std::vector<int32_t> sum;    // [m][nb][2]: the integer sums of values 0..15 and 16..31 (decode)
    std::vector<float> d, s;     // [m][nb]
    int64_t tw = 8;              // panel path: activation rows per tile (8: ymm lanes, 16: zmm)
    std::vector<int32_t> xt;     // [tile][nb][16 pairs][tw rows], padded rows 0
    std::vector<float> xd, xs;   // [tile][nb][tw]
    int64_t m = 0;               // the shape a late run_dup worker may still read p as (see prepare)
    StaleReaders readers;        // last: waits for late run_dup workers at thread exit
};

// One activation slice in decode order: the even values (0, 2, .., 30), then the odd ones.
TV_ISA inline void decode_act(const int16_t *qs, int16_t *out) {
    for (int j = 0; j < QK / 2; j++) out[j] = qs[2 * j], out[QK / 2 + j] = qs[2 * j + 1];
}

// One tile of the panel path's activation layout (rows [t * tw, t * tw + tw), zero-padded).
TV_ISA void prepare_tile(Prep &p, const ActBlock *x, int64_t m, int64_t nb, int64_t t) {
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

template <class I>
TV_ISA const void *prepare(const ActBlock *x, int64_t m, int64_t nb, ThreadPool &pool) {
    thread_local Prep p;  // the calling thread's; workers fill tiles of it, then only read it
    // A late run_dup worker may still read p (its result is discarded): new contents are harmless,
    // a new shape (m) or a reallocation is not, so those wait for it first.
    if (p.m != m) ThreadPool::quiesce_all(), p.m = m;
    const size_t n = (size_t)(m * nb);
    if (m < GEMM_MIN) {
        if (p.qe.size() < n) ThreadPool::quiesce_all(), p.qe.resize(n), p.sum.resize(2 * n), p.d.resize(n), p.s.resize(n);
        for (size_t i = 0; i < n; i++) {
            decode_act(x[i].qs, p.qe[i].v);
            int32_t s0 = 0, s1 = 0;
            for (int j = 0; j < QK / 2; j++) s0 += x[i].qs[j], s1 += x[i].qs[j + QK / 2];
            p.sum[2 * i] = s0, p.sum[2 * i + 1] = s1;
            p.d[i] = x[i].d;
            p.s[i] = x[i].s;
        }
        return &p;
    }
    const int64_t tw = p.tw = m <= 8 ? 8 : I::TW_MAX, tiles = (m + tw - 1) / tw;
    if (p.xt.size() < (size_t)(tiles * nb * 16 * tw) || p.xd.size() < (size_t)(tiles * nb * tw)) ThreadPool::quiesce_all();
    if (p.xt.size() < (size_t)(tiles * nb * 16 * tw)) p.xt.resize((size_t)(tiles * nb * 16 * tw));
    if (p.xd.size() < (size_t)(tiles * nb * tw)) p.xd.resize((size_t)(tiles * nb * tw)), p.xs.resize(p.xd.size());
    // tiles are disjoint: a prefill's prep (2% of it) runs on every thread (one tile runs inline);
    // a decode batch's (a few us: m = 32, k = 576) runs inline, cheaper than a parallel region.
    // Through a pointer: inside the lambda `p` would name each worker's own thread_local
    Prep *mine = &p;
    if (tiles * nb * 16 * tw <= 32768) {
        for (int64_t t = 0; t < tiles; t++) prepare_tile(p, x, m, nb, t);
    } else {
        pool.run(tiles, [&](int64_t t, int) { prepare_tile(*mine, x, m, nb, t); });
    }
    return &p;
}

// The scales of one stored block of each of a group's 8 rows, lanes = rows: fixed f16 fields
// (F::D_AT, the min right after it) 8 at a time; K formats' integer scales transposed from the
// rows' bytes, times their super-scales. Same products as F::scales: the same bits.
template <class F>
struct GroupScales {
    alignas(32) float d[F::SLICES][2][NW], m[F::SLICES][NW];
};
template <class I, class F>
TV_ISA inline void group_scales(const uint8_t *w0, const int32_t *off, __m256i voff, GroupScales<F> &g) {
    if constexpr (F::D_AT >= 0) {
        static_assert(F::SLICES == 1 && (!F::HAS_MIN || F::M_AT == F::D_AT + 2), "d and m read together");
        __m256 m;
        const __m256 d = I::template halves<F::D_AT, F::BYTES>(w0, off, voff, F::HAS_MIN ? &m : nullptr);
        _mm256_store_ps(g.d[0][0], d);
        _mm256_store_ps(g.d[0][1], d);
        if constexpr (F::HAS_MIN) _mm256_store_ps(g.m[0], m);
    } else {
        static_assert(nsc<F>() + (F::HAS_MIN ? F::SLICES : 0) <= 16 && !F::TWO_MINS, "one 16-byte row of integers");
        alignas(16) int8_t v[NW][32];
        __m128i rows[NW], cols[NW];
        for (int r = 0; r < NW; r++) {
            F::scale_ints(w0 + off[r], v[r]);
            rows[r] = _mm_load_si128(reinterpret_cast<const __m128i *>(v[r]));
        }
        transpose8x16(rows, cols);  // integer c of every row: cols[c / 2], low (c even) or high 8 bytes
        auto col = [&](int c) TV_ISA { return int8_lanes(c % 2 ? _mm_srli_si128(cols[c / 2], 8) : cols[c / 2]); };
        const __m256 d = I::template halves<F::SD_AT, F::BYTES>(w0, off, voff, nullptr);
        for (int s = 0; s < F::SLICES; s++) {
            _mm256_store_ps(g.d[s][0], _mm256_mul_ps(d, col(sc_index<F>(s, 0))));
            _mm256_store_ps(g.d[s][1], _mm256_mul_ps(d, col(sc_index<F>(s, 1))));
        }
        if constexpr (F::HAS_MIN) {
            const __m256 nd = _mm256_sub_ps(_mm256_setzero_ps(), I::template halves<F::SDMIN_AT, F::BYTES>(w0, off, voff, nullptr));
            for (int s = 0; s < F::SLICES; s++) _mm256_store_ps(g.m[s], _mm256_mul_ps(nd, col(mn_index<F>(s, 0))));
        }
    }
}

// dst[0, n) = src[0, n); `stream`: the whole cache lines of dst bypass the caches (non-temporal
// stores: no read for ownership of lines that are only written; a partial line would be a slow
// partial write, so the ends go through the cache).
TV_ISA inline void copy_out(float *dst, const float *src, int64_t n, bool stream) {
    int64_t i = 0;
    if (stream) {
        for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 63); i++) dst[i] = src[i];
        for (; i + 16 <= n; i += 16) {
            _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
            _mm256_stream_ps(dst + i + 8, _mm256_loadu_ps(src + i + 8));
        }
    }
    for (; i < n; i++) dst[i] = src[i];
}

// Row offsets of a group: rows past r1 repeat the last one (computed, never stored).
TV_ISA inline __m256i group_offsets(int64_t g0, int64_t r1, size_t row_bytes, int32_t *off) {
    for (int r = 0; r < NW; r++) off[r] = (int32_t)((size_t)(std::min(g0 + r, r1 - 1) - g0) * row_bytes);
    return _mm256_loadu_si256(reinterpret_cast<const __m256i *>(off));
}

// Decode: rows r and r + 4 of a group share one ymm of slice bytes (one 128-bit half each), and no
// byte is widened by a shuffle: an int16 lane's low byte (even value) is split off by a mask (or
// vpmaddubsw by 1, signed) and its high byte (odd value) by one shift, against activations stored
// even values first (decode_act). The shuffle port (port 5 on Intel, which alone runs widenings and
// lane-crossing shuffles) then serves only the reduction: 6 shuffles per 8 rows, where a per-row
// layout took 16 widenings and 14 shuffles (hadds are 2 shuffle uops each). Unsigned fields (every
// format but int8 and code books) stay unsigned: their offset leaves the exact integer dot as
// OFFSET * (the activations' integer sum), once per 8 rows instead of a subtraction per byte. ymm,
// not zmm, on AVX-512 too: Intel runs 512-bit ops on 2 ports, 256-bit ones on 3 (measured faster).

// 16 bytes at p, then 16 at q.
TV_ISA inline __m256i load2(const uint8_t *p, const uint8_t *q) {
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p))),
                                   _mm_loadu_si128(reinterpret_cast<const __m128i *>(q)), 1);
}

// Whether pair_bytes leaves the values as signed bytes (int8, code book) or unsigned, offset not applied.
template <class F>
constexpr bool signed_bytes() { return F::LOW == LOW_I8 || F::HAS_TABLE; }

// Slice s of rows a and c as bytes: z1 = values 0..15 of a, then of c; z2 = values 16..31.
template <class I, class F>
TV_ISA inline void pair_bytes(const uint8_t *a, const uint8_t *c, int s, __m256i &z1, __m256i &z2) {
    const SliceSrc src = F::src(s);
    if constexpr (F::LOW == LOW_NIB16) {
        const __m256i q = load2(a + src.lo, c + src.lo), m = _mm256_set1_epi8(0x0F);
        z1 = _mm256_and_si256(q, m);
        z2 = _mm256_and_si256(_mm256_srli_epi16(q, 4), m);
    } else if constexpr (F::LOW == LOW_NIB32 || F::LOW == LOW_BIT2) {
        const __m256i m = _mm256_set1_epi8(F::LOW == LOW_NIB32 ? 0x0F : 0x03);
        z1 = _mm256_and_si256(_mm256_srli_epi16(load2(a + src.lo, c + src.lo), src.lo_shift), m);
        z2 = _mm256_and_si256(_mm256_srli_epi16(load2(a + src.lo + 16, c + src.lo + 16), src.lo_shift), m);
    } else {
        z1 = load2(a + src.lo, c + src.lo);
        z2 = load2(a + src.lo + 16, c + src.lo + 16);
    }
    if constexpr (F::HIGH == HIGH_MASK32) {
        uint32_t ba, bc;
        std::memcpy(&ba, a + src.hi, 4);
        std::memcpy(&bc, c + src.hi, 4);
        I::template high_bits<F>(z1, z2, ba, bc);
    } else if constexpr (F::HIGH == HIGH_BYTES) {
        // ((h >> hi_shift) & HIGH_MASK) << LOW_BITS as one shift and one mask: the bits a 16-bit
        // shift carries in from the neighbour byte land outside the mask (every format's fields)
        const __m256i m = _mm256_set1_epi8((char)(F::HIGH_MASK << F::LOW_BITS));
        const int up = F::LOW_BITS - src.hi_shift;
        auto high = [&](__m256i h) TV_ISA { return _mm256_and_si256(up >= 0 ? _mm256_slli_epi16(h, up) : _mm256_srli_epi16(h, -up), m); };
        z1 = _mm256_or_si256(z1, high(load2(a + src.hi, c + src.hi)));
        z2 = _mm256_or_si256(z2, high(load2(a + src.hi + 16, c + src.hi + 16)));
    }
    if constexpr (F::HAS_TABLE) {
        const __m256i t = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i *>(F::TABLE)));
        z1 = _mm256_shuffle_epi8(t, z1);
        z2 = _mm256_shuffle_epi8(t, z2);
    }
}

// acc + the bytes' dot with 16 activations: even bytes (low halves of int16 lanes) against xe, odd
// ones against xo; 8 int32 lanes, 4 per 128-bit half (row).
template <class I, bool SIGNED>
TV_ISA inline __m256i dot_bytes(__m256i acc, __m256i z, __m256i xe, __m256i xo) {
    __m256i e, o;
    if constexpr (SIGNED) {
        e = _mm256_maddubs_epi16(_mm256_set1_epi16(1), z);  // 1 * even byte + 0 * odd byte
        o = _mm256_srai_epi16(z, 8);
    } else {
        e = _mm256_and_si256(z, _mm256_set1_epi16(0xFF));
        o = _mm256_srli_epi16(z, 8);
    }
    return I::dot_pairs(I::dot_pairs(acc, e, xe), o, xo);
}

// Pair vectors (lanes 0..3: row q's partial dots, 4..7: row q + 4's) -> lane r = row r's dot, in
// two steps (pairs q = 0, 1, then 2, 3: fewer live registers, AVX2 has 16): per 128-bit half
// [row q, row q + 1, row q, row q + 1] partial sums, then [rows 0, 1, 2, 3].
TV_ISA inline __m256i sum_pairs(__m256i p0, __m256i p1) {
    return _mm256_add_epi32(_mm256_unpacklo_epi32(p0, p1), _mm256_unpackhi_epi32(p0, p1));
}
TV_ISA inline __m256i sum_quads(__m256i s01, __m256i s23) {
    return _mm256_add_epi32(_mm256_unpacklo_epi64(s01, s23), _mm256_unpackhi_epi64(s01, s23));
}

// Slice s of a group's 8 rows (blocks at blk + off[r]) against NR activation rows: per row i, lane
// r = row r's exact integer dot (TWO_SCALES: d0 values 0..15, d1 values 16..31).
template <class I, class F, int NR>
TV_ISA inline void slice_dots(const uint8_t *blk, const int32_t *off, int s, const Prep &x, int64_t nb, int64_t b,
                              __m256i d0[NR], __m256i d1[NR]) {
    constexpr bool SIGNED = signed_bytes<F>();
    auto bcast = [](const int16_t *p) TV_ISA { return _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i *>(p))); };
    // pair q: rows q and q + 4; h: pairs 0, 1 and 2, 3 summed (h2: values 16..31, per-half scales)
    __m256i h[NR][2], h2[NR][2];
    for (int k = 0; k < 2; k++) {
        // plain nibbles (Q4_0, Q4_1): the int16 lanes' even and odd values straight from the loaded
        // bytes (a mask, two shifts and masks, one shift), 6 ops where bytes then their split take 7
        constexpr bool NIBBLES = F::LOW == LOW_NIB16 && F::HIGH == HIGH_NONE && !F::HAS_TABLE;
        __m256i z1[2], z2[2];
        for (int j = 0; j < 2; j++) {
            if constexpr (NIBBLES) z1[j] = load2(blk + off[2 * k + j] + F::src(s).lo, blk + off[2 * k + j + 4] + F::src(s).lo);
            else pair_bytes<I, F>(blk + off[2 * k + j], blk + off[2 * k + j + 4], s, z1[j], z2[j]);
        }
        for (int i = 0; i < NR; i++) {
            const int16_t *xq = x.qe[(size_t)(i * nb + b)].v;
            const __m256i e1 = bcast(xq), e2 = bcast(xq + 8), o1 = bcast(xq + 16), o2 = bcast(xq + 24);
            __m256i a[2], c[2];
            for (int j = 0; j < 2; j++) {
                if constexpr (NIBBLES) {
                    const __m256i y = z1[j], m = _mm256_set1_epi16(0x000F);
                    a[j] = I::dot_pairs(I::dot_pairs(_mm256_setzero_si256(), _mm256_and_si256(y, m), e1),
                                        _mm256_and_si256(_mm256_srli_epi16(y, 8), m), o1);
                    a[j] = I::dot_pairs(I::dot_pairs(a[j], _mm256_and_si256(_mm256_srli_epi16(y, 4), m), e2),
                                        _mm256_srli_epi16(y, 12), o2);
                    continue;
                }
                a[j] = dot_bytes<I, SIGNED>(_mm256_setzero_si256(), z1[j], e1, o1);
                if constexpr (F::TWO_SCALES) c[j] = dot_bytes<I, SIGNED>(_mm256_setzero_si256(), z2[j], e2, o2);
                else a[j] = dot_bytes<I, SIGNED>(a[j], z2[j], e2, o2);
            }
            h[i][k] = sum_pairs(a[0], a[1]);
            if constexpr (F::TWO_SCALES) h2[i][k] = sum_pairs(c[0], c[1]);
        }
    }
    for (int i = 0; i < NR; i++) {
        const int32_t *sum = &x.sum[(size_t)(2 * (i * nb + b))];
        d0[i] = sum_quads(h[i][0], h[i][1]);
        if constexpr (F::TWO_SCALES) d1[i] = sum_quads(h2[i][0], h2[i][1]);
        if constexpr (!SIGNED && F::OFFSET != 0) {  // dot(q - OFFSET, x) = dot(q, x) - OFFSET * sum(x)
            if constexpr (F::TWO_SCALES) {
                d0[i] = _mm256_sub_epi32(d0[i], _mm256_set1_epi32(F::OFFSET * sum[0]));
                d1[i] = _mm256_sub_epi32(d1[i], _mm256_set1_epi32(F::OFFSET * sum[1]));
            } else {
                d0[i] = _mm256_sub_epi32(d0[i], _mm256_set1_epi32(F::OFFSET * (sum[0] + sum[1])));
            }
        }
    }
}

// Weight rows past a chunk's end compute and are not stored.
TV_ISA inline void store_lanes(__m256 v, float *y, int n) {
    alignas(32) float t[8];
    _mm256_store_ps(t, v);
    for (int i = 0; i < n; i++) y[i] = t[i];
}

// Decode: weight rows [g0, g0 + 8) (clamped to r1 - 1; extra lanes are not stored) x NR rows.
template <class I, class F, int NR>
TV_ISA void gemv8(const uint8_t *w, size_t row_bytes, int64_t g0, int64_t r1, const Prep &x, int64_t nb, float *y,
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
        if constexpr (F::D_AT < 0) group_scales<I, F>(w0 + o, off, voff, gs);
        // unrolled: the slices' bit positions (F::src) become immediate shift counts (a count in a
        // register costs vpsrlw a second uop, on the shuffle port)
#pragma GCC unroll 8
        for (int s = 0; s < F::SLICES; s++) {
            const int64_t b = b0 + s;
            // 8 interleaved row streams defeat the hardware prefetcher: fetch the next group (the 8
            // rows are contiguous) a few lines per slice, so it is in cache when its turn comes (a
            // burst of a whole K block's lines fills the miss buffers and stalls)
            for (int c = 0; c < PF_LINES; c++)
                _mm_prefetch(reinterpret_cast<const char *>(next + (b * PF_LINES + c) * 64), _MM_HINT_T0);
            __m256i h[NR], h2[NR];
            if constexpr (I::template zmm_decode<F>()) I::template slice_dots_zmm<F, NR>(w0 + o, off, s, x, nb, b, h);
            else slice_dots<I, F, NR>(w0 + o, off, s, x, nb, b, h, h2);
            __m256 d0, d1, mn;  // the 8 rows' scales of this slice (fixed f16 fields: read here)
            if constexpr (F::D_AT >= 0) {
                d0 = d1 = I::template halves<F::D_AT, F::BYTES>(w0 + o, off, voff, F::HAS_MIN ? &mn : nullptr);
            } else {
                d0 = _mm256_load_ps(gs.d[s][0]), d1 = _mm256_load_ps(gs.d[s][1]), mn = _mm256_load_ps(gs.m[s]);
            }
            for (int i = 0; i < NR; i++) {
                const size_t xb = (size_t)(i * nb + b);
                const __m256 dx = _mm256_set1_ps(x.d[xb]);
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h[i]), _mm256_mul_ps(d0, dx), acc[i]);
                if constexpr (F::TWO_SCALES)
                    acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h2[i]), _mm256_mul_ps(d1, dx), acc[i]);
                if constexpr (F::HAS_MIN) acc[i] = _mm256_fmadd_ps(mn, _mm256_set1_ps(x.s[xb]), acc[i]);
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

// 8 activation rows as ymm lanes, for micro() (X::dot_pairs: acc + the products of int16 pairs).
template <class X>
struct Ymm {
    using I = __m256i;
    using F = __m256;
    TV_ISA static I zero_i() { return _mm256_setzero_si256(); }
    TV_ISA static F zero_f() { return _mm256_setzero_ps(); }
    TV_ISA static I load_i(const int32_t *p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)); }
    TV_ISA static F load_f(const float *p) { return _mm256_loadu_ps(p); }
    TV_ISA static I dot(I acc, int32_t w, I x) { return X::dot_pairs(acc, _mm256_set1_epi32(w), x); }
    // acc + float(id) * (d * dx)
    TV_ISA static F scale(F acc, I id, float d, F dx) { return _mm256_fmadd_ps(_mm256_cvtepi32_ps(id), _mm256_mul_ps(_mm256_set1_ps(d), dx), acc); }
    TV_ISA static F fma1(float a, F b, F acc) { return _mm256_fmadd_ps(_mm256_set1_ps(a), b, acc); }
    TV_ISA static void store(F v, float *t) { _mm256_storeu_ps(t, v); }
};

// Per pair j in [J0, J0 + 8): one weight dword of each panel row broadcast against the tile's pairs.
template <class L, int J0>
TV_ISA inline void pairs8(typename L::I *id, const int32_t *pw, const int32_t *xt) {
    constexpr int TW = sizeof(typename L::F) / 4;
#pragma GCC unroll 8
    for (int j = J0; j < J0 + 8; j++) {
        const typename L::I xv = L::load_i(xt + j * TW);
        for (int r = 0; r < NW; r++) id[r] = L::dot(id[r], pw[r * 16 + j], xv);
    }
}

// Panel (the group's NW weight rows) x one tile of TW activation rows (the vector lanes); float
// work once per slice (and half, for per-half scales).
template <class L, class Fmt>
TV_ISA void micro(const Panel &P, const Prep &x, int64_t t, int64_t nb, int nw, int ni, float *y, int64_t ldy) {
    constexpr int TW = sizeof(typename L::F) / 4;
    typename L::F acc[NW];
    for (int r = 0; r < NW; r++) acc[r] = L::zero_f();
    const int32_t *pw = reinterpret_cast<const int32_t *>(P.w.data()), *xt = x.xt.data() + t * nb * 16 * TW;
    const float *xd = x.xd.data() + t * nb * TW, *xs = x.xs.data() + t * nb * TW;
    for (int64_t b = 0; b < nb; b++, pw += NW * 16, xt += 16 * TW) {
        const typename L::F dx = L::load_f(xd + b * TW);
        const float *pd = P.d.data() + b * NW, *pd2 = P.d2.data() + b * NW, *pm = P.mn.data() + b * NW;
        typename L::I id[NW];
        for (int r = 0; r < NW; r++) id[r] = L::zero_i();
        pairs8<L, 0>(id, pw, xt);
        if constexpr (Fmt::TWO_SCALES) {  // values 16..31 have their own scale: fold the first half now
            for (int r = 0; r < NW; r++) acc[r] = L::scale(acc[r], id[r], pd[r], dx), id[r] = L::zero_i();
            pairs8<L, 8>(id, pw, xt);
            for (int r = 0; r < NW; r++) acc[r] = L::scale(acc[r], id[r], pd2[r], dx);
        } else {
            pairs8<L, 8>(id, pw, xt);
            for (int r = 0; r < NW; r++) acc[r] = L::scale(acc[r], id[r], pd[r], dx);
        }
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

template <class I, class F>
TV_ISA void gemm_rows(const uint8_t *w, size_t row_bytes, int64_t r0, int64_t r1, const Prep &x, int64_t m, int64_t nb,
                      float *y, int64_t ldy) {
    if (m < GEMM_MIN) {
        for (int64_t g0 = r0; g0 < r1; g0 += NW) switch (m) {
                case 1: gemv8<I, F, 1>(w, row_bytes, g0, r1, x, nb, y, ldy); break;
                case 2: gemv8<I, F, 2>(w, row_bytes, g0, r1, x, nb, y, ldy); break;
                default: gemv8<I, F, 3>(w, row_bytes, g0, r1, x, nb, y, ldy); break;
            }
        return;
    }
    static thread_local Panel P;
    const size_t np = (size_t)(nb * NW);
    if (P.w.size() < np) P.w.resize(np), P.d.resize(np), P.d2.resize(np), P.mn.resize(np);
    // The micro kernels write 8 outputs into each of m rows of y, ldy apart; with ldy * 4 a multiple
    // of 4 KiB (the 49152-row output matrix) those rows share one L1 set and few L2 sets, and every
    // line is evicted between its two halves' writes (the output matrix at m = 32 ran at 60% of
    // the others' rate). They write into this buffer instead, YB outputs per row, copied out in
    // whole lines once the YB weight rows are done. Rows < 4 KiB apart (a run_dup task's own
    // scratch, q/k/v/o outputs) spread over the sets: written directly.
    const bool buffered = ldy >= 1024;
    const int64_t YB = std::clamp<int64_t>(4096 / m / NW * NW, NW, 512);  // a buffer of up to 16 KiB (L1)
    static thread_local std::vector<float> ybuf;
    if (buffered && ybuf.size() < (size_t)(m * YB)) ybuf.resize((size_t)(m * YB));
    const bool stream = ldy >= 16384;  // rows 64 KiB or more apart (an output matrix's logits)
    GroupScales<F> gs;
    for (int64_t g0 = r0; g0 < r1; g0 += NW) {
        const int nw = (int)std::min<int64_t>(NW, r1 - g0);
        const int64_t c0 = r0 + (g0 - r0) / YB * YB;  // the buffer's first weight row
        alignas(32) int32_t off[NW];
        const __m256i voff = group_offsets(g0, r1, row_bytes, off);
        const uint8_t *w0 = w + (size_t)g0 * row_bytes, *next = w0 + NW * row_bytes;
        constexpr int PF_LINES = (NW * F::BYTES / F::SLICES + 63) / 64;  // per slice: see gemv8
        for (int64_t b0 = 0; b0 < nb; b0 += F::SLICES) {
            const size_t o = (size_t)(b0 / F::SLICES) * F::BYTES;
            group_scales<I, F>(w0 + o, off, voff, gs);
            for (int s = 0; s < F::SLICES; s++) {
                const int64_t b = b0 + s;
                for (int c = 0; c < PF_LINES; c++)
                    _mm_prefetch(reinterpret_cast<const char *>(next + (b * PF_LINES + c) * 64), _MM_HINT_T1);
                for (int r = 0; r < NW; r++) {
                    const W16 u = I::template unpack<F>(w0 + off[r] + o, s);
                    int16_t *dst = P.w[(size_t)(b * NW + r)].v;
                    _mm256_store_si256(reinterpret_cast<__m256i *>(dst), u.lo);
                    _mm256_store_si256(reinterpret_cast<__m256i *>(dst + 16), u.hi);
                }
                std::memcpy(P.d.data() + b * NW, gs.d[s][0], sizeof(float) * NW);
                if (F::TWO_SCALES) std::memcpy(P.d2.data() + b * NW, gs.d[s][1], sizeof(float) * NW);
                if (F::HAS_MIN) std::memcpy(P.mn.data() + b * NW, gs.m[s], sizeof(float) * NW);
            }
        }
        float *yb = buffered ? ybuf.data() + (g0 - c0) : y + g0;
        const int64_t ldb = buffered ? YB : ldy;
        for (int64_t t = 0; t * x.tw < m; t++) {
            const int ni = (int)std::min<int64_t>(x.tw, m - t * x.tw);
            if (x.tw == 8) micro<Ymm<I>, F>(P, x, t, nb, nw, ni, yb, ldb);
            else micro<typename I::Wide, F>(P, x, t, nb, nw, ni, yb, ldb);
        }
        if (buffered && g0 + NW >= std::min(r1, c0 + YB))  // the buffer's last group: copy it out
            for (int64_t i = 0; i < m; i++)
                copy_out(y + i * ldy + c0, ybuf.data() + i * YB, std::min(r1, c0 + YB) - c0, stream);
    }
    if (stream) _mm_sfence();  // the streamed stores are visible before the pool reports this task done
}

template <class I>
TV_ISA bool gemm_run(int dtype, const uint8_t *w, size_t row_bytes, int64_t r0, int64_t r1, const void *prep, int64_t m,
                     int64_t nb, float *y, int64_t ldy) {
    const Prep &x = *static_cast<const Prep *>(prep);
    return with_format(dtype, [&](auto f) TV_ISA {
        using F = decltype(f);
        if constexpr (F::TWO_MINS) return false;
        else return gemm_rows<I, F>(w, row_bytes, r0, r1, x, m, nb, y, ldy), true;
    });
}

template <class I>
const QuantGemm x86_gemm = {NW, prepare<I>, gemm_run<I>};

}  // namespace
}  // namespace tv

#endif
