// "avx512amx": the avx512vnni table with its prefill matmul on Intel AMX tiles (Sapphire Rapids and
// later). Everything but the quantized matmul at m >= AMX_MIN activation rows is avx512vnni's.
//
// AMX multiplies int8 (or bf16) only, while activations are int16 (ActBlock): each activation is
// split exactly as x = 256 * hi + lo (hi signed, lo unsigned byte), and a slice's integer dot is
// 256 * dot(w, hi) + dot(w, lo): one TDPBSSD and one TDPBUSD into two int32 tiles. That is the
// exact integer dot every other path forms, so the float work after it (formats.h's sequence,
// see kernels_avx512.cpp's QuantGemm) gives the same bits: batch invariance across m, and across
// this path's prefill and the avx512vnni decode it uses below AMX_MIN, holds bit for bit.
//
// Tile C[i][n] (16 activation rows x 16 weight rows) += A[i][k] B[k/4][4n + k%4]: A is a slice of
// 16 activation rows (32 bytes each), B a slice of 16 weight rows in AMX's dword-interleaved
// layout. Per slice and 16x16 block: 2 tile ops (4 for per-half scales), two 1 KiB tile stores,
// then per activation row 5 vector ops (combine, convert, scale, fma) with lanes = weight rows.
#include "kernels.h"
#include "tinyvllm.h"
#include "x86_common.h"

#if defined(__x86_64__)

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#define TV_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c,amx-tile,amx-int8")))

namespace tv {
namespace {

// Activation rows from which the tile path runs; below, avx512vnni. Measured 2026-12-03 (one thread's
// CPU time for a reference-model decode step's matmuls, min of 3 per round): vnni ahead at 4 rows (2x),
// even at 24; at 32 AMX 2-4% ahead on one thread (4 of 5 rounds) but not on two under run_dup's
// 128-row tasks (whole forward, 4 rounds): a tie, left to vnni; AMX ahead from 33 (6%), 40 (8%),
// 48 (10%), 56 (13%).
constexpr int AMX_MIN = 33;
constexpr int TR = 16;      // activation rows per tile, weight rows per group

// Tiles: 0-3 int32 results (hi, lo; a second pair for the second half of per-half-scale slices),
// 4-5 activations (hi, lo), 6-7 weights (one slice, or its two halves with the other half zeroed).
struct alignas(64) TileConfig {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

TV_AMX void configure_tiles() {
    thread_local bool done = false;  // a thread's tile configuration stays until it is released
    if (done) return;
    TileConfig c;
    std::memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 4; t++) c.rows[t] = TR, c.colsb[t] = TR * 4;
    for (int t = 4; t < 6; t++) c.rows[t] = TR, c.colsb[t] = QK;
    for (int t = 6; t < 8; t++) c.rows[t] = QK / 4, c.colsb[t] = TR * 4;
    _tile_loadconfig(&c);
    done = true;
}

// One slice of a tile of 16 activation rows: the int16 values split in two byte planes.
struct alignas(64) ASlice {
    int8_t hi[TR][QK];
    uint8_t lo[TR][QK];
};
// One slice of a group of 16 weight rows in B layout: dword j of row n at b[j][n] (j = values
// 4j..4j+3); half[h]: the same with the values of the other 16-value half zeroed (per-half scales).
struct alignas(64) BSlice {
    int32_t b[QK / 4][TR];
};

struct Prep {
    bool tiles = false;
    const void *vnni = nullptr;  // m < AMX_MIN: avx512vnni's own prep
    std::vector<ASlice> a;       // [tile][nb]
    std::vector<float> xd, xs;   // [tile][nb][16]
    int64_t m = 0;               // the shape a late run_dup worker may still read p as
    StaleReaders readers;        // last: waits for late run_dup workers at thread exit
};

const QuantGemm *vnni_gemm() { return kernels_avx512_table()->gemm; }

TV_AMX void prepare_tile(Prep &p, const ActBlock *x, int64_t m, int64_t nb, int64_t t) {
    for (int64_t b = 0; b < nb; b++) {
        ASlice &s = p.a[(size_t)(t * nb + b)];
        float *xd = p.xd.data() + (t * nb + b) * TR, *xs = p.xs.data() + (t * nb + b) * TR;
        for (int i = 0; i < TR; i++) {
            const int64_t row = t * TR + i;
            if (row >= m) {  // padding rows: zero values and scales (their outputs are not stored)
                std::memset(s.hi[i], 0, QK), std::memset(s.lo[i], 0, QK);
                xd[i] = xs[i] = 0.0f;
                continue;
            }
            const ActBlock &a = x[row * nb + b];
            const __m512i v = _mm512_loadu_si512(a.qs);
            _mm256_store_si256(reinterpret_cast<__m256i *>(s.hi[i]), _mm512_cvtepi16_epi8(_mm512_srai_epi16(v, 8)));
            _mm256_store_si256(reinterpret_cast<__m256i *>(s.lo[i]), _mm512_cvtepi16_epi8(v));  // low bytes
            xd[i] = a.d, xs[i] = a.s;
        }
    }
}

TV_AMX const void *prepare(const ActBlock *x, int64_t m, int64_t nb, ThreadPool &pool) {
    thread_local Prep p;  // the calling thread's; workers fill tiles of it, then only read it
    if (p.m != m) ThreadPool::quiesce_all(), p.m = m;  // as x86_gemm.h's prepare
    p.tiles = m >= AMX_MIN;
    if (!p.tiles) {
        p.vnni = vnni_gemm()->prepare(x, m, nb, pool);
        return &p;
    }
    const int64_t tiles = (m + TR - 1) / TR;
    const size_t n = (size_t)(tiles * nb);
    if (p.a.size() < n) ThreadPool::quiesce_all(), p.a.resize(n), p.xd.resize(n * TR), p.xs.resize(n * TR);
    Prep *mine = &p;  // inside the lambda `p` would name each worker's own thread_local
    pool.run(tiles, [&](int64_t t, int) { prepare_tile(*mine, x, m, nb, t); });
    return &p;
}

// A group's 16 weight rows unpacked (formats.h through x86_common.h's unpack) into B slices, with
// the per-slice scales as 16-lane vectors (lane = weight row): the same products as F::scales.
// A view into the thread's WeightScratch.
template <class F>
struct Group {
    static constexpr int NB_ = F::TWO_SCALES ? 2 : 1;
    BSlice *b;              // [nb][NB_]
    float *d, *d2, *mn;     // [nb][16]
};

// Weight groups are unpacked GROUPS_MAX at a time however long the driver's chunk is (a decode-sized
// chunk can be half a 49,152-row output matrix: 20 MB of unpacked groups), into one buffer per thread
// that every format shares: a thread's scratch stays GROUPS_MAX * 16 rows x the widest row it met,
// 2 bytes per weight plus 3 floats per 16-row slice (runner/native_runner.py's _amx_scratch_bytes pays it).
constexpr int GROUPS_MAX = 4;
struct WeightScratch {
    std::vector<BSlice> b;  // [GROUPS_MAX][nb][2]
    std::vector<float> f;   // [GROUPS_MAX][3][nb][16]
    int64_t nb = 0;         // the row width (in slices) the buffers are laid out for
};

template <class F>
Group<F> group_view(WeightScratch &s, int64_t gi, int64_t nb) {
    float *f = s.f.data() + gi * 3 * nb * TR;
    return Group<F>{s.b.data() + gi * nb * 2, f, f + nb * TR, f + 2 * nb * TR};
}

WeightScratch &weight_scratch(int64_t nb) {
    thread_local WeightScratch s;
    if (s.nb < nb) {
        s.b.resize((size_t)(GROUPS_MAX * nb * 2)), s.f.resize((size_t)(GROUPS_MAX * 3 * nb * TR));
        s.nb = nb;
    }
    return s;
}

template <class F>
TV_AMX void unpack_group(const uint8_t *w, size_t row_bytes, int64_t g0, int64_t r1, int64_t nb, Group<F> &g) {
    for (int n = 0; n < TR; n++) {
        const uint8_t *row = w + (size_t)(std::min(g0 + n, r1 - 1)) * row_bytes;  // rows past r1 repeat the last
        BlockScales<F::SLICES> sc{};
        for (int64_t b0 = 0; b0 < nb; b0 += F::SLICES) {
            const uint8_t *blk = row + (size_t)(b0 / F::SLICES) * F::BYTES;
            block_scales<F>(blk, sc);
            for (int s = 0; s < F::SLICES; s++) {
                const int64_t b = b0 + s;
                const W16 u = unpack<F>(blk, s);
                alignas(32) int32_t q[QK / 4];
                _mm256_store_si256(reinterpret_cast<__m256i *>(q),
                                   _mm512_cvtepi16_epi8(_mm512_inserti64x4(_mm512_castsi256_si512(u.lo), u.hi, 1)));
                for (int j = 0; j < QK / 4; j++) {
                    if constexpr (F::TWO_SCALES) {
                        g.b[(size_t)(b * 2)].b[j][n] = j < 4 ? q[j] : 0;
                        g.b[(size_t)(b * 2 + 1)].b[j][n] = j < 4 ? 0 : q[j];
                    } else {
                        g.b[(size_t)b].b[j][n] = q[j];
                    }
                }
                g.d[b * TR + n] = sc.d[s][0];
                if constexpr (F::TWO_SCALES) g.d2[b * TR + n] = sc.d[s][1];
                if constexpr (F::HAS_MIN) g.mn[b * TR + n] = sc.m[s][0];
            }
        }
    }
}

// acc[i] (activation row i, lanes = weight rows) += float(256 hi + lo) * (d_w * d_x[i]).
TV_AMX inline void scale_rows(__m512 acc[TR], const int32_t (*c)[2][TR][TR], int h, __m512 dw, const float *xd) {
#pragma GCC unroll 16
    for (int i = 0; i < TR; i++) {
        const __m512i id = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(c[h][0][i]), 8), _mm512_load_si512(c[h][1][i]));
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(id), _mm512_mul_ps(dw, _mm512_set1_ps(xd[i])), acc[i]);
    }
}

// One group (16 weight rows from g0, nw of them stored) x one tile of activation rows, in steps:
// one per slice, or per half-slice with per-half scales (B tile 6 or 7 holds the half's values,
// the other half zeroed). Step j's tile ops go to result tiles 0-1 or 2-3 (j even or odd); its
// results are stored in step j + 1, after step j + 2's tile ops are issued, and turned into floats
// in step j + 2, from memory: a tile store takes long to reach vector loads, so each of the three
// overlaps the others' work.
template <class F>
TV_AMX void tile_block(const Group<F> &g, const Prep &x, int64_t t, int64_t nb, int nw, int ni, float *y, int64_t ldy) {
    constexpr int NH = Group<F>::NB_;  // steps per slice
    __m512 acc[TR];
#pragma GCC unroll 16
    for (int i = 0; i < TR; i++) acc[i] = _mm512_setzero_ps();
    alignas(64) int32_t c[2][2][TR][TR];  // [step parity][hi, lo][activation row][weight row]
    const ASlice *a = x.a.data() + t * nb;
    const float *xd = x.xd.data() + t * nb * TR, *xs = x.xs.data() + t * nb * TR;
    const int64_t steps = nb * NH;
    // tile numbers are literal in the instructions: one branch per parity
    auto issue = [&](int64_t j) TV_AMX {
        const int64_t b = j / NH;
        if (j % NH == 0) {
            _tile_loadd(4, a[b].hi, QK);
            _tile_loadd(5, a[b].lo, QK);
        }
        if (j % 2 == 0) {
            _tile_loadd(6, g.b[(size_t)j].b, TR * 4);
            _tile_zero(0);
            _tile_zero(1);
            _tile_dpbssd(0, 4, 6);
            _tile_dpbusd(1, 5, 6);
        } else {
            _tile_loadd(7, g.b[(size_t)j].b, TR * 4);
            _tile_zero(2);
            _tile_zero(3);
            _tile_dpbssd(2, 4, 7);
            _tile_dpbusd(3, 5, 7);
        }
    };
    auto store = [&](int64_t j) TV_AMX {
        if (j % 2 == 0) {
            _tile_stored(0, c[0][0], TR * 4);
            _tile_stored(1, c[0][1], TR * 4);
        } else {
            _tile_stored(2, c[1][0], TR * 4);
            _tile_stored(3, c[1][1], TR * 4);
        }
    };
    auto finish = [&](int64_t j) TV_AMX {
        const int64_t b = j / NH;
        const int h = (int)(j % NH);
        scale_rows(acc, c, (int)(j % 2), _mm512_loadu_ps((h ? g.d2 : g.d) + b * TR), xd + b * TR);
        if constexpr (F::HAS_MIN) {
            if (h == NH - 1) {
                const __m512 mn = _mm512_loadu_ps(g.mn + b * TR);
#pragma GCC unroll 16
                for (int i = 0; i < TR; i++) acc[i] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xs[b * TR + i]), acc[i]);
            }
        }
    };
    issue(0);
    for (int64_t j = 0; j < steps; j++) {
        store(j);
        if (j + 1 < steps) issue(j + 1);
        if (j > 0) finish(j - 1);
    }
    finish(steps - 1);
    const __mmask16 k = (__mmask16)((1u << nw) - 1);
    for (int i = 0; i < ni; i++) _mm512_mask_storeu_ps(y + (t * TR + i) * ldy, k, acc[i]);
}

// dst[0, n) = src[0, n), the whole cache lines of dst with non-temporal stores (see below).
TV_AMX void copy_out_streaming(float *dst, const float *src, int64_t n) {
    int64_t i = 0;
    for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 63); i++) dst[i] = src[i];
    for (; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
    for (; i < n; i++) dst[i] = src[i];
}

template <class F>
TV_AMX void gemm_rows(const uint8_t *w, size_t row_bytes, int64_t r0, int64_t r1, const Prep &x, int64_t m, int64_t nb,
                      float *y, int64_t ldy) {
    configure_tiles();
    // Output rows 64 KiB or more apart (an output matrix's logits; a multiple of 4 KiB for the
    // 49,152-row one) share a few cache sets: 16-float writes into each of m rows evict each other's
    // lines before they are whole (the output matrix at m = 64: 21.5 ms, 15 ms without that). The
    // tiles write into a buffer of the chunk's outputs instead (the driver's chunks are <= 512 rows
    // here; up to 256 KiB, else direct as before), copied out at the end with non-temporal stores.
    const int64_t BW = r1 - r0;
    const bool stream = ldy >= 16384 && m * BW <= 65536;
    thread_local std::vector<float> ybuf;
    if (stream && ybuf.size() < (size_t)(m * BW)) ybuf.resize((size_t)(m * BW));
    // up to GROUPS_MAX groups unpacked first, then each tile of activation rows meets all of them (the
    // tile's slices stay in L1 while the groups' B slices, ~nb KiB each, stay in L2)
    WeightScratch &s = weight_scratch(nb);
    for (int64_t c0 = r0; c0 < r1; c0 += GROUPS_MAX * TR) {
        const int64_t c1 = std::min<int64_t>(r1, c0 + GROUPS_MAX * TR), ng = (c1 - c0 + TR - 1) / TR;
        Group<F> groups[GROUPS_MAX];
        for (int64_t gi = 0; gi < ng; gi++) {
            groups[gi] = group_view<F>(s, gi, nb);
            unpack_group<F>(w, row_bytes, c0 + gi * TR, c1, nb, groups[gi]);
        }
        for (int64_t t = 0; t * TR < m; t++) {
            const int ni = (int)std::min<int64_t>(TR, m - t * TR);
            for (int64_t gi = 0; gi < ng; gi++) {
                const int64_t g0 = c0 + gi * TR;
                tile_block<F>(groups[gi], x, t, nb, (int)std::min<int64_t>(TR, c1 - g0), ni,
                              stream ? ybuf.data() + (g0 - r0) : y + g0, stream ? BW : ldy);
            }
        }
    }
    if (stream) {
        for (int64_t i = 0; i < m; i++) copy_out_streaming(y + i * ldy + r0, ybuf.data() + i * BW, BW);
        _mm_sfence();  // the streamed stores are visible before the pool reports this task done
    }
}

TV_AMX bool gemm_run(int dtype, const uint8_t *w, size_t row_bytes, int64_t r0, int64_t r1, const void *prep,
                     int64_t m, int64_t nb, float *y, int64_t ldy) {
    const Prep &x = *static_cast<const Prep *>(prep);
    if (!x.tiles) return vnni_gemm()->run(dtype, w, row_bytes, r0, r1, x.vnni, m, nb, y, ldy);
    return with_format(dtype, [&](auto f) TV_AMX {
        using F = decltype(f);
        if constexpr (F::TWO_MINS) return false;
        else return gemm_rows<F>(w, row_bytes, r0, r1, x, m, nb, y, ldy), true;
    });
}

// Linux hands out AMX tile state only on request (once per process); without it the first tile
// instruction faults.
bool os_grants_amx() {
#if defined(__linux__)
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
    return false;
#endif
}

bool cpu_reports_amx() {
    unsigned a, b, c, d;
    __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    if (!((d >> 24) & 1) || !((d >> 25) & 1)) return false;  // AMX-TILE, AMX-INT8
    __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
    if (!((c >> 27) & 1)) return false;  // OSXSAVE: xgetbv is usable
    unsigned lo, hi;
    __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((lo >> 17) & 3) == 3;  // the OS saves XTILECFG and XTILEDATA
}

const QuantGemm gemm = {TR, prepare, gemm_run};

}  // namespace

bool cpu_has_amx() {
    static const bool ok = cpu_has_avx512vnni() && cpu_reports_amx() && os_grants_amx();
    return ok;
}

const Kernels *kernels_amx_table() {
    static const Kernels table = [] {
        Kernels k = *kernels_avx512_table();
        k.name = "avx512amx";
        k.gemm = &gemm;
        return k;
    }();
    return &table;
}

}  // namespace tv

#else  // not x86-64

namespace tv {
const Kernels *kernels_amx_table() { return nullptr; }
bool cpu_has_amx() { return false; }
}  // namespace tv

#endif
