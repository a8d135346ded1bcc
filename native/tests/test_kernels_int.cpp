// Every int16 activation value the quantizer can produce (it clamps to +-ACT_MAX; -32768 is
// covered too) through every path's integer block dot, exactly. Guards the neon_dotprod split
// x = 256 * hi + lo + 128 (int8 halves) and any other path that narrows or widens activations.
#include <cmath>
#include <cstring>
#include <vector>

#include "helpers.h"
#include "kernels.h"
#include "ops.h"
#include "quant.h"

using namespace tvtest;

namespace {

// Weight blocks with d = 1 (and m = 0): out = (float)sum(w * x) exactly when |sum| < 2^24, so a
// path must match the int64 reference bit for bit. The float accumulation of one block is exact.
void check_format(int32_t dtype, const tv::Kernels &k, const char *path) {
    const size_t bytes = tv_row_bytes(dtype, 32);
    const int64_t nvals = 65536, nblocks = nvals / 32;
    std::vector<tv::ActBlock> x((size_t)nblocks);
    std::vector<uint8_t> w(bytes);
    int bad = 0;
    for (int pass = 0; pass < 4; pass++) {  // value v sits in lane (v + 7 * pass) % 32: 4 lane positions
        for (int64_t i = 0; i < nvals; i++) {
            const int64_t slot = (i + 7 * pass) % nvals;
            x[(size_t)(slot / 32)].qs[slot % 32] = (int16_t)(i - 32768);
        }
        for (auto &b : x) b.d = 1.0f, b.s = 0.0f;
        for (int64_t b = 0; b < nblocks; b++) {
            put_f16(w.data(), 1.0f);
            int wv[32];
            if (dtype == TV_Q8_0) {
                // extremes in one lane (-128 * -32768 = 2^22), small weights elsewhere to keep |sum| < 2^24
                for (int j = 0; j < 32; j++) wv[j] = randint(-3, 3);
                wv[randint(0, 31)] = randint(0, 1) ? -128 : 127;
                for (int j = 0; j < 32; j++) w[2 + j] = (uint8_t)(int8_t)wv[j];
            } else {  // 4-bit: full range, |sum| <= 32 * 15 * 32768 < 2^24
                const size_t qs = dtype == TV_Q4_1 ? 4 : 2;
                if (dtype == TV_Q4_1) put_f16(w.data() + 2, 0.0f);
                for (int j = 0; j < 16; j++) {
                    const int lo = randint(0, 15), hi = randint(0, 15);
                    w[qs + j] = (uint8_t)(lo | hi << 4);
                    wv[j] = dtype == TV_Q4_0 ? lo - 8 : lo;
                    wv[j + 16] = dtype == TV_Q4_0 ? hi - 8 : hi;
                }
            }
            int64_t ref = 0;
            for (int j = 0; j < 32; j++) ref += (int64_t)wv[j] * x[(size_t)b].qs[j];
            float got = -1.0f;
            auto fn = k.rows[dtype];
            fn(w.data(), &x[(size_t)b], 1, 1, &got, 1);
            if (got != (float)ref && bad++ < 5) {
                CHECK(false) << path << " " << tv::dtype_name(dtype) << " block " << b << ": " << got << " vs " << ref;
            }
        }
    }
    CHECK(bad == 0) << path << " " << tv::dtype_name(dtype) << ": " << bad << " wrong blocks";
}

}  // namespace

TEST(kernels_int16_full_range_exact) {
    const char *restore = tv_kernel_path();
    for (const char *path : tv::available_kernels()) {
        CHECK(tv::select_kernels(path));
        for (int32_t dtype : {TV_Q4_0, TV_Q4_1, TV_Q8_0}) check_format(dtype, tv::kernels(), path);
    }
    tv::select_kernels(restore);
}

TEST(matmul_int16_extremes_exact_all_batch_sizes) {
    // The same exactness through tv_matmul (each path's whole matmul: avx512vnni's decode and
    // panel kernels, which re-pair values), one 32-value block per row so the result is the block's
    // integer dot: activation rows with amax 32767 quantize with d = 1 to themselves, swept over
    // [-32767, 32767]; 9 weight rows (a partial group of 8) at d = 1, m = 0.
    const int64_t n = 9, k = 32, m = 2100;
    std::vector<float> x((size_t)(m * k));
    for (int64_t i = 0; i < m; i++)
        for (int j = 0; j < 32; j++)
            x[(size_t)(i * k + j)] = j == i % 32 ? 32767.0f : (float)((i * 31 + j * 2113) % 65535 - 32767);
    const char *restore = tv_kernel_path();
    for (const char *path : tv::available_kernels()) {
        CHECK(tv::select_kernels(path));
        for (int32_t dtype : {TV_Q4_0, TV_Q4_1, TV_Q8_0}) {
            const size_t bytes = tv_row_bytes(dtype, k);
            std::vector<uint8_t> w(bytes * n);
            std::vector<int> wv((size_t)(n * 32));
            for (int64_t r = 0; r < n; r++) {
                uint8_t *p = w.data() + r * bytes;
                int *v = &wv[(size_t)(r * 32)];
                put_f16(p, 1.0f);
                if (dtype == TV_Q8_0) {
                    for (int j = 0; j < 32; j++) v[j] = randint(-3, 3);
                    v[randint(0, 31)] = randint(0, 1) ? -128 : 127;
                    for (int j = 0; j < 32; j++) p[2 + j] = (uint8_t)(int8_t)v[j];
                } else {
                    const size_t qs = dtype == TV_Q4_1 ? 4 : 2;
                    if (dtype == TV_Q4_1) put_f16(p + 2, 0.0f);
                    for (int j = 0; j < 16; j++) {
                        const int lo = randint(0, 15), hi = randint(0, 15);
                        p[qs + j] = (uint8_t)(lo | hi << 4);
                        v[j] = dtype == TV_Q4_0 ? lo - 8 : lo;
                        v[j + 16] = dtype == TV_Q4_0 ? hi - 8 : hi;
                    }
                }
            }
            tv_tensor t{dtype, n, k, w.data(), w.size()};
            std::vector<float> y((size_t)(m * n)), y3((size_t)(3 * n));
            CHECK(tv_matmul(&t, x.data(), m, y.data(), 2) == TV_OK) << tv_last_error();
            int bad = 0;
            for (int64_t i = 0; i < m; i++) {
                if (i % 97 == 0)  // also as a small batch (the decode path)
                    CHECK(tv_matmul(&t, x.data() + i * k, 1 + i % 3, y3.data(), 1) == TV_OK);
                for (int64_t r = 0; r < n; r++) {
                    int64_t ref = 0;
                    for (int j = 0; j < 32; j++) ref += (int64_t)wv[(size_t)(r * 32 + j)] * (int64_t)x[(size_t)(i * k + j)];
                    const bool ok = y[(size_t)(i * n + r)] == (float)ref && (i % 97 != 0 || y3[(size_t)r] == (float)ref);
                    if (!ok && bad++ < 5)
                        CHECK(false) << path << " " << tv::dtype_name(dtype) << " row " << i << " col " << r << ": "
                                     << y[(size_t)(i * n + r)] << " vs " << ref;
                }
            }
            CHECK(bad == 0) << path << " " << tv::dtype_name(dtype) << ": " << bad << " wrong";
        }
    }
    tv::select_kernels(restore);
}

TEST(quantize_act_and_silu_mul_every_path_vs_scalar) {
    // quantize_act must give the scalar quantizer's exact bits (the integer dots downstream are
    // exact, so this is what keeps paths equal); silu_mul may differ by its exp, to float accuracy.
    const int64_t cols = 32 * 40;
    std::vector<float> x((size_t)cols);
    for (int64_t i = 0; i < cols; i++) {
        const int64_t b = i / 32;  // blocks of different kinds: normal, tiny, huge, with outliers, specials
        float v = (float)uniform(-3, 3);
        if (b % 5 == 1) v *= 1e-30f;
        if (b % 5 == 2) v *= 1e30f;
        if (b % 5 == 3 && i % 32 == 7) v = 1000.0f;
        if (b == 4) v = 0.0f;
        if ((b == 9 && i % 32 == 3) || (b == 24 && i % 32 == 31)) v = std::nanf("");
        if (b == 14 && i % 32 == 5) v = -INFINITY;
        if (b == 19) v = i % 2 ? 32767.5f : -0.5f;  // ties of the rounding
        x[(size_t)i] = v;
    }
    const int64_t nb = cols / 32;
    std::vector<tv::ActBlock> ref((size_t)nb), got((size_t)nb);
    tv::quantize_row_act(x.data(), ref.data(), cols);
    std::vector<float> g = random_vec(1003, -90, 90), u = random_vec(1003), gref = g;
    tv::swiglu(gref.data(), u.data(), (int64_t)g.size());
    std::vector<float> gelu_ref = g;
    tv::gelu_tanh_mul(gelu_ref.data(), u.data(), (int64_t)g.size());
    const char *restore = tv_kernel_path();
    for (const char *path : tv::available_kernels()) {
        CHECK(tv::select_kernels(path));
        std::memset(got.data(), 0x55, got.size() * sizeof(tv::ActBlock));
        tv::kernels().quantize_act(x.data(), got.data(), cols);
        for (int64_t b = 0; b < nb; b++) {
            const tv::ActBlock &r = ref[(size_t)b], &o = got[(size_t)b];
            CHECK(std::memcmp(&r.d, &o.d, 4) == 0 && std::memcmp(&r.s, &o.s, 4) == 0 &&
                  std::memcmp(r.qs, o.qs, sizeof r.qs) == 0)
                << path << " block " << b << ": d " << o.d << " vs " << r.d << ", s " << o.s << " vs " << r.s;
        }
        std::vector<float> gp = g;
        tv::kernels().silu_mul(gp.data(), u.data(), (int64_t)gp.size());
        for (size_t i = 0; i < g.size(); i++)
            CHECK_NEAR(gp[i], gref[i], 1e-6 * (1 + std::fabs(gref[i]))) << path << " silu_mul at " << g[i];
        std::vector<float> gg = g;
        tv::kernels().gelu_mul(gg.data(), u.data(), (int64_t)gg.size());
        for (size_t i = 0; i < g.size(); i++)
            CHECK_NEAR(gg[i], gelu_ref[i], 2e-6 * (1 + std::fabs(gelu_ref[i]))) << path << " gelu_mul at " << g[i];
    }
    tv::select_kernels(restore);
}
