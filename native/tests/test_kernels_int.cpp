// Every int16 activation value the quantizer can produce (it clamps to +-ACT_MAX; -32768 is
// covered too) through every path's integer block dot, exactly. Guards the neon_dotprod split
// x = 256 * hi + lo + 128 (int8 halves) and any other path that narrows or widens activations.
#include <cstring>
#include <vector>

#include "helpers.h"
#include "kernels.h"
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
            auto fn = dtype == TV_Q4_0 ? k.rows_q4_0 : dtype == TV_Q4_1 ? k.rows_q4_1 : k.rows_q8_0;
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
