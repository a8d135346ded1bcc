// Block formats: sizes, fp16 conversion, dequantization of hand-built blocks.
#include <cstring>

#include "fp16.h"
#include "helpers.h"
#include "quant.h"

using namespace tvtest;

TEST(row_bytes) {
    CHECK(tv_row_bytes(TV_F32, 7) == 28);
    CHECK(tv_row_bytes(TV_F16, 7) == 14);
    CHECK(tv_row_bytes(TV_Q4_0, 64) == 36);
    CHECK(tv_row_bytes(TV_Q4_1, 64) == 40);
    CHECK(tv_row_bytes(TV_Q8_0, 576) == 18 * 34);
    CHECK(tv_row_bytes(TV_Q4_0, 48) == 0);  // not a whole block
    CHECK(tv_row_bytes(TV_Q8_0, 0) == 0);
    CHECK(tv_row_bytes(TV_F32, -1) == 0);
    CHECK(tv_row_bytes(5, 32) == 0);  // unknown dtype
    CHECK(std::strlen(tv_version()) > 0);
}

TEST(fp16_conversion) {
    using tv::fp16_to_fp32;
    using tv::fp32_to_fp16;
    CHECK(fp32_to_fp16(1.0f) == 0x3C00);
    CHECK(fp32_to_fp16(-2.0f) == 0xC000);
    CHECK(fp32_to_fp16(65504.0f) == 0x7BFF);
    CHECK(fp32_to_fp16(65520.0f) == 0x7C00);
    CHECK(fp32_to_fp16(1e-8f) == 0x0000);
    CHECK(fp32_to_fp16(5.9604645e-8f) == 0x0001);  // smallest subnormal
    CHECK(fp16_to_fp32(0x0001) == 5.9604644775390625e-8f);
    CHECK(fp16_to_fp32(0x3555) == 0.333251953125f);
    CHECK(std::isinf(fp16_to_fp32(0x7C00)) && std::isnan(fp16_to_fp32(0x7E00)));
    // every finite half survives a round trip; ties round to even
    int bad = 0;
    for (uint32_t h = 0; h < 0x10000; h++) {
        if ((h & 0x7C00) == 0x7C00) continue;
        if (fp32_to_fp16(fp16_to_fp32((uint16_t)h)) != h) bad++;
    }
    CHECK(bad == 0) << bad << " halves do not round-trip";
    CHECK(fp32_to_fp16(1.0f + 1.0f / 2048) == 0x3C00);           // tie -> even (down)
    CHECK(fp32_to_fp16(1.0f + 3.0f / 2048) == 0x3C02);           // tie -> even (up)
    CHECK(fp32_to_fp16(1.0f + 1.0f / 2048 + 1e-7f) == 0x3C01);   // above the tie
}

TEST(dequantize_hand_built_blocks) {
    // Q4_0: d = 0.5, qs[j] = j | ((15 - j) << 4)
    uint8_t q40[18];
    put_f16(q40, 0.5f);
    for (int j = 0; j < 16; j++) q40[2 + j] = (uint8_t)(j | ((15 - j) << 4));
    // Q4_1: d = 0.25, m = -1
    uint8_t q41[20];
    put_f16(q41, 0.25f);
    put_f16(q41 + 2, -1.0f);
    for (int j = 0; j < 16; j++) q41[4 + j] = (uint8_t)(j | ((15 - j) << 4));
    // Q8_0: d = 0.125, qs = -128..127 stride 8
    uint8_t q80[34];
    put_f16(q80, 0.125f);
    for (int j = 0; j < 32; j++) q80[2 + j] = (uint8_t)(int8_t)(-128 + 8 * j);

    float out[32];
    tv_tensor t{TV_Q4_0, 1, 32, q40, sizeof q40};
    CHECK(tv_dequantize_rows(&t, 0, 1, out) == TV_OK);
    for (int j = 0; j < 16; j++) {
        CHECK(out[j] == (j - 8) * 0.5f) << "j=" << j;
        CHECK(out[j + 16] == (15 - j - 8) * 0.5f) << "j=" << j;
    }
    t = tv_tensor{TV_Q4_1, 1, 32, q41, sizeof q41};
    CHECK(tv_dequantize_rows(&t, 0, 1, out) == TV_OK);
    for (int j = 0; j < 16; j++) {
        CHECK(out[j] == j * 0.25f - 1.0f);
        CHECK(out[j + 16] == (15 - j) * 0.25f - 1.0f);
    }
    t = tv_tensor{TV_Q8_0, 1, 32, q80, sizeof q80};
    CHECK(tv_dequantize_rows(&t, 0, 1, out) == TV_OK);
    for (int j = 0; j < 32; j++) CHECK(out[j] == (-128 + 8 * j) * 0.125f);

    uint16_t h[3] = {0x3C00, 0xC000, 0x3555};
    t = tv_tensor{TV_F16, 1, 3, h, sizeof h};
    CHECK(tv_dequantize_rows(&t, 0, 1, out) == TV_OK);
    CHECK(out[0] == 1.0f && out[1] == -2.0f && out[2] == 0.333251953125f);

    // several rows with an offset
    HostTensor w = random_tensor(TV_Q4_1, 5, 64);
    std::vector<float> all = w.dequantized(), part(2 * 64);
    tv_tensor d = w.desc();
    CHECK(tv_dequantize_rows(&d, 3, 2, part.data()) == TV_OK);
    CHECK(std::memcmp(part.data(), all.data() + 3 * 64, part.size() * 4) == 0);
    CHECK(tv_dequantize_rows(&d, 4, 2, part.data()) == TV_ERR_INVALID);
    CHECK(std::strlen(tv_last_error()) > 0);
}

TEST(activation_quantizer) {
    std::vector<float> x = random_vec(64, -3, 3);
    x[5] = 0;
    std::vector<tv::ActBlock> q(2);
    tv::quantize_row_act(x.data(), q.data(), 64);
    for (int b = 0; b < 2; b++) {
        int sum = 0;
        for (int j = 0; j < 32; j++) {
            CHECK(std::abs(q[b].qs[j]) <= tv::ACT_MAX);
            CHECK_NEAR(q[b].qs[j] * q[b].d, x[b * 32 + j], q[b].d * 0.5f + 1e-6f);
            sum += q[b].qs[j];
        }
        CHECK_NEAR(q[b].s, q[b].d * sum, 1e-5);
    }
    std::vector<float> z(32, 0.0f);
    tv::quantize_row_act(z.data(), q.data(), 32);
    CHECK(q[0].d == 0.0f && q[0].s == 0.0f);
}
