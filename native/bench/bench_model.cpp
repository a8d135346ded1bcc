// End-to-end speed on a random model with SmolLM2-135M's shapes (Q4_1 layers, tied Q8_0
// embedding): prefill of one prompt, then greedy-shaped decode steps at batch 1 and batch B.
// Usage: tinyvllm_bench_model [threads=2] [prompt=128] [decode=64] [B=8]
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "tinyvllm.h"

namespace {

std::mt19937 rng(7);

uint16_t f2h(float f) {  // good enough for positive normal scales
    uint32_t x;
    std::memcpy(&x, &f, 4);
    return (uint16_t)(((x >> 16) & 0x8000) | ((((x >> 23) & 0xFF) - 112) << 10) | ((x >> 13) & 0x3FF));
}

std::vector<uint8_t> random_weights(int32_t dtype, int64_t rows, int64_t cols) {
    std::vector<uint8_t> w(tv_row_bytes(dtype, cols) * rows);
    for (auto &b : w) b = (uint8_t)rng();
    const size_t bb = dtype == TV_Q4_1 ? 20 : 34;
    for (size_t i = 0; i < w.size(); i += bb) {
        const uint16_t d = f2h(0.002f), m = f2h(0.015f) | 0x8000;
        std::memcpy(&w[i], &d, 2);
        if (dtype == TV_Q4_1) std::memcpy(&w[i + 2], &m, 2);
    }
    return w;
}

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

}  // namespace

int main(int argc, char **argv) {
    const int threads = argc > 1 ? std::atoi(argv[1]) : 2, prompt = argc > 2 ? std::atoi(argv[2]) : 128,
              decode = argc > 3 ? std::atoi(argv[3]) : 64, B = argc > 4 ? std::atoi(argv[4]) : 8;
    const int V = 49152, E = 576, F = 1536, L = 30, H = 9, Hkv = 3, hd = 64, bs = 16;
    std::vector<float> inv(hd / 2);
    for (int i = 0; i < hd / 2; i++) inv[i] = (float)std::pow(100000.0, -2.0 * i / hd);
    tv_model_params p{V, E, F, L, H, Hkv, hd, 1e-5f, 1, inv.data(), threads};
    tv_model *m = nullptr;
    if (tv_model_create(&p, &m)) return std::printf("%s\n", tv_last_error()), 1;
    std::map<std::string, std::vector<uint8_t>> keep;
    auto set = [&](const std::string &name, int32_t dtype, int64_t rows, int64_t cols) {
        std::vector<uint8_t> &w = keep[name];
        if (dtype == TV_F32) {
            w.resize(cols * 4);
            for (int64_t i = 0; i < cols; i++) {
                const float one = 1.0f;
                std::memcpy(&w[i * 4], &one, 4);
            }
        } else {
            w = random_weights(dtype, rows, cols);
        }
        tv_tensor t{dtype, rows, cols, w.data(), w.size()};
        if (tv_model_set_tensor(m, name.c_str(), &t)) std::printf("%s\n", tv_last_error()), std::exit(1);
    };
    set("token_embd.weight", TV_Q8_0, V, E);
    set("output_norm.weight", TV_F32, 1, E);
    for (int l = 0; l < L; l++) {
        const std::string b = "blk." + std::to_string(l) + ".";
        set(b + "attn_norm.weight", TV_F32, 1, E);
        set(b + "ffn_norm.weight", TV_F32, 1, E);
        set(b + "attn_q.weight", TV_Q4_1, H * hd, E);
        set(b + "attn_k.weight", TV_Q4_1, Hkv * hd, E);
        set(b + "attn_v.weight", TV_Q4_1, Hkv * hd, E);
        set(b + "attn_output.weight", TV_Q4_1, E, H * hd);
        set(b + "ffn_gate.weight", TV_Q4_1, F, E);
        set(b + "ffn_up.weight", TV_Q4_1, F, E);
        set(b + "ffn_down.weight", TV_Q4_1, E, F);
    }
    if (tv_model_finalize(m)) return std::printf("%s\n", tv_last_error()), 1;
    const int max_blocks = (prompt + decode + bs - 1) / bs + 1;
    tv_kv_cache *c = nullptr;
    if (tv_kv_cache_create(m, max_blocks * B, bs, TV_F16, &c)) return std::printf("%s\n", tv_last_error()), 1;
    std::vector<int32_t> table(B * max_blocks);
    for (int i = 0; i < B * max_blocks; i++) table[i] = i;
    std::vector<float> logits((size_t)V * B);

    auto run = [&](int n, const int32_t *pos, const int32_t *seq, int n_seqs, int n_logits, const int32_t *rows) {
        std::vector<int32_t> tok(n);
        for (auto &t : tok) t = (int32_t)(rng() % V);
        tv_batch b{n, tok.data(), pos, seq, n_seqs, max_blocks, table.data(), n_logits, rows};
        if (tv_model_forward(m, c, &b, logits.data())) std::printf("%s\n", tv_last_error()), std::exit(1);
    };
    // prefill every sequence (timing the first)
    std::vector<int32_t> pos(prompt), seq(prompt, 0);
    for (int i = 0; i < prompt; i++) pos[i] = i;
    int32_t last = prompt - 1;
    double t0 = now();
    run(prompt, pos.data(), seq.data(), 1, 1, &last);
    const double t_prefill = now() - t0;
    // batch-1 decode on sequence 0
    t0 = now();
    for (int s = 0; s < decode; s++) {
        int32_t ps = prompt + s, sq = 0, row = 0;
        run(1, &ps, &sq, 1, 1, &row);
    }
    const double t_decode1 = now() - t0;
    // batch-B decode: all B sequences at position prompt + s (their contents do not matter here)
    std::vector<int32_t> bpos(B), bseq(B), brows(B);
    t0 = now();
    for (int s = 0; s < decode; s++) {
        for (int i = 0; i < B; i++) bpos[i] = prompt + s, bseq[i] = i, brows[i] = i;
        run(B, bpos.data(), bseq.data(), B, B, brows.data());
    }
    const double t_decodeB = now() - t0;
    std::printf("kernels %s, %d threads: prefill %d tokens %.1f ms (%.0f tok/s); decode B=1 %.2f ms/token (%.0f tok/s); "
                "decode B=%d %.0f tok/s\n",
                tv_kernel_path(), threads, prompt, t_prefill * 1e3, prompt / t_prefill, t_decode1 / decode * 1e3,
                decode / t_decode1, B, (double)B * decode / t_decodeB);
    tv_kv_cache_free(c);
    tv_model_free(m);
    return 0;
}
