// A small random 2-layer model through the C ABI vs a double-precision forward written here:
// prefill in one batch, decode token by token with the cache, several sequences in one batch,
// copy-on-write blocks, and the error paths; Qwen3's q/k norms and Gemma 3's block (post norms,
// GELU, scales, soft cap, sliding-window layers with their own RoPE) the same way.
#include <algorithm>
#include <map>
#include <memory>
#include <numeric>

#include "helpers.h"
#include "kernels.h"

using namespace tvtest;

namespace {

struct Config {
    int32_t wdtype_q, wdtype_o, wdtype_ffn, wdtype_down, wdtype_embd;
    bool bias, tied, interleaved;
    int32_t kv_dtype;
    int arch = 0;  // 0 LLaMA, 1 Qwen3 (q/k norms), 2 Gemma 3 (layer 0 sliding with a window of 3)
};

struct TestModel {
    tv_model_params p{};
    std::vector<float> inv_freq, inv_freq_swa;
    std::vector<int32_t> swa_layers;
    std::map<std::string, HostTensor> t;
    tv_model *m = nullptr;
    ~TestModel() { tv_model_free(m); }

    void add(const std::string &name, int32_t dtype, int64_t rows, int64_t cols, float scale = 0.02f) {
        t[name] = random_tensor(dtype, rows, cols, scale);
    }
    void add_norm(const std::string &name, int64_t n) {
        HostTensor h{TV_F32, 1, n, std::vector<uint8_t>((size_t)n * 4)};
        for (int64_t i = 0; i < n; i++) {
            float v = uniform(0.6f, 1.4f);
            std::memcpy(h.bytes.data() + 4 * i, &v, 4);
        }
        t[name] = h;
    }
    std::vector<double> get(const std::string &name) const {
        auto f = t.at(name).dequantized();
        return std::vector<double>(f.begin(), f.end());
    }
};

std::unique_ptr<TestModel> make_model(const Config &c, int n_layer = 2) {
    auto tm = std::make_unique<TestModel>();
    tv_model_params &p = tm->p;
    p.n_vocab = 50, p.n_embd = 64, p.n_ff = 96, p.n_layer = n_layer, p.n_head = 4, p.n_head_kv = 2, p.head_dim = 16;
    p.rms_eps = 1e-5f, p.rope_interleaved = c.interleaved, p.n_threads = 2;
    for (int i = 0; i < p.head_dim / 2; i++) tm->inv_freq.push_back((float)std::pow(10000.0, -2.0 * i / p.head_dim));
    p.rope_inv_freq = tm->inv_freq.data();
    const int E = p.n_embd, Dq = p.n_head * p.head_dim, Dkv = p.n_head_kv * p.head_dim;
    if (c.arch >= 1) p.qk_norm = 1;
    if (c.arch == 2) {
        p.post_norms = 1, p.ffn_act = 1, p.embd_scale = 8.0f, p.attn_scale = 0.3f, p.final_logit_softcap = 3.0f;
        p.sliding_window = 3;
        for (int l = 0; l < n_layer; l++) tm->swa_layers.push_back(l % 2 == 0);
        for (int i = 0; i < p.head_dim / 2; i++) tm->inv_freq_swa.push_back((float)std::pow(100.0, -2.0 * i / p.head_dim));
        p.swa_layers = tm->swa_layers.data(), p.rope_inv_freq_swa = tm->inv_freq_swa.data();
    }
    tm->add("token_embd.weight", c.wdtype_embd, p.n_vocab, E, 0.1f);
    if (!c.tied) tm->add("output.weight", c.wdtype_o, p.n_vocab, E, 0.05f);
    tm->add_norm("output_norm.weight", E);
    for (int l = 0; l < n_layer; l++) {
        const std::string b = "blk." + std::to_string(l) + ".";
        tm->add_norm(b + "attn_norm.weight", E);
        tm->add_norm(b + "ffn_norm.weight", E);
        tm->add(b + "attn_q.weight", c.wdtype_q, Dq, E, 0.05f);
        tm->add(b + "attn_k.weight", c.wdtype_q, Dkv, E, 0.05f);
        tm->add(b + "attn_v.weight", c.wdtype_q, Dkv, E);
        tm->add(b + "attn_output.weight", c.wdtype_o, E, Dq);
        tm->add(b + "ffn_gate.weight", c.wdtype_ffn, p.n_ff, E);
        tm->add(b + "ffn_up.weight", c.wdtype_ffn, p.n_ff, E);
        tm->add(b + "ffn_down.weight", c.wdtype_down, E, p.n_ff);
        if (c.arch >= 1) tm->add_norm(b + "attn_q_norm.weight", p.head_dim), tm->add_norm(b + "attn_k_norm.weight", p.head_dim);
        if (c.arch == 2) tm->add_norm(b + "post_attention_norm.weight", E), tm->add_norm(b + "post_ffw_norm.weight", E);
        if (c.bias) {
            tm->add(b + "attn_q.bias", TV_F32, 1, Dq);
            tm->add(b + "attn_k.bias", TV_F32, 1, Dkv);
            tm->add(b + "attn_v.bias", TV_F32, 1, Dkv);
        }
    }
    CHECK(tv_model_create(&p, &tm->m) == TV_OK) << tv_last_error();
    for (auto &[name, h] : tm->t) {
        tv_tensor d = h.desc();
        CHECK(tv_model_set_tensor(tm->m, name.c_str(), &d) == TV_OK) << name << ": " << tv_last_error();
    }
    CHECK(tv_model_finalize(tm->m) == TV_OK) << tv_last_error();
    return tm;
}

// ---- the double-precision reference forward: logits at every position of one sequence
using Mat = std::vector<double>;

Mat matvec(const Mat &W, const double *x, int rows, int cols) {
    Mat y(rows);
    for (int r = 0; r < rows; r++) {
        double s = 0;
        for (int c = 0; c < cols; c++) s += W[(size_t)r * cols + c] * x[c];
        y[r] = s;
    }
    return y;
}

Mat rmsnorm(const double *x, const Mat &w, int n, double eps) {
    double ss = 0;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const double s = 1.0 / std::sqrt(ss / n + eps);
    Mat y(n);
    for (int i = 0; i < n; i++) y[i] = x[i] * s * w[i];
    return y;
}

void rope(double *x, int n_heads, int hd, bool inter, int pos, const std::vector<float> &inv) {
    for (int h = 0; h < n_heads; h++)
        for (int i = 0; i < hd / 2; i++) {
            double *a = x + h * hd + (inter ? 2 * i : i), *b = x + h * hd + (inter ? 2 * i + 1 : i + hd / 2);
            const double ang = pos * (double)inv[i], x0 = *a, x1 = *b;
            *a = x0 * std::cos(ang) - x1 * std::sin(ang);
            *b = x0 * std::sin(ang) + x1 * std::cos(ang);
        }
}

std::vector<Mat> reference_logits(const TestModel &tm, const std::vector<int> &tokens) {
    const tv_model_params &p = tm.p;
    const int L = (int)tokens.size(), E = p.n_embd, hd = p.head_dim, H = p.n_head, Hkv = p.n_head_kv;
    const int Dq = H * hd, Dkv = Hkv * hd, F = p.n_ff;
    const Mat embd = tm.get("token_embd.weight");
    std::vector<Mat> x(L);
    for (int t = 0; t < L; t++) x[t].assign(embd.begin() + (size_t)tokens[t] * E, embd.begin() + (size_t)(tokens[t] + 1) * E);
    if (p.embd_scale != 0)
        for (auto &r : x)
            for (auto &e : r) e *= p.embd_scale;
    for (int l = 0; l < p.n_layer; l++) {
        const std::string b = "blk." + std::to_string(l) + ".";
        const Mat wq = tm.get(b + "attn_q.weight"), wk = tm.get(b + "attn_k.weight"), wv = tm.get(b + "attn_v.weight"),
                  wo = tm.get(b + "attn_output.weight"), an = tm.get(b + "attn_norm.weight"),
                  fn = tm.get(b + "ffn_norm.weight"), wg = tm.get(b + "ffn_gate.weight"),
                  wu = tm.get(b + "ffn_up.weight"), wd = tm.get(b + "ffn_down.weight");
        const bool bias = tm.t.count(b + "attn_q.bias");
        const bool swa = p.sliding_window > 0 && tm.swa_layers[l];
        const std::vector<float> &inv = swa ? tm.inv_freq_swa : tm.inv_freq;
        const int window = swa ? p.sliding_window : 1 << 30;
        const double att_scale = p.attn_scale > 0 ? (double)p.attn_scale : 1.0 / std::sqrt((double)hd);
        std::vector<Mat> q(L), k(L), v(L);
        for (int t = 0; t < L; t++) {
            Mat xn = rmsnorm(x[t].data(), an, E, p.rms_eps);
            q[t] = matvec(wq, xn.data(), Dq, E), k[t] = matvec(wk, xn.data(), Dkv, E), v[t] = matvec(wv, xn.data(), Dkv, E);
            if (bias) {
                const Mat bq = tm.get(b + "attn_q.bias"), bk = tm.get(b + "attn_k.bias"), bv = tm.get(b + "attn_v.bias");
                for (int i = 0; i < Dq; i++) q[t][i] += bq[i];
                for (int i = 0; i < Dkv; i++) k[t][i] += bk[i], v[t][i] += bv[i];
            }
            if (p.qk_norm) {
                const Mat qn = tm.get(b + "attn_q_norm.weight"), kn = tm.get(b + "attn_k_norm.weight");
                for (int h = 0; h < H; h++) {
                    Mat r = rmsnorm(q[t].data() + h * hd, qn, hd, p.rms_eps);
                    std::copy(r.begin(), r.end(), q[t].begin() + h * hd);
                }
                for (int h = 0; h < Hkv; h++) {
                    Mat r = rmsnorm(k[t].data() + h * hd, kn, hd, p.rms_eps);
                    std::copy(r.begin(), r.end(), k[t].begin() + h * hd);
                }
            }
            rope(q[t].data(), H, hd, p.rope_interleaved, t, inv);
            rope(k[t].data(), Hkv, hd, p.rope_interleaved, t, inv);
        }
        for (int t = 0; t < L; t++) {
            Mat att(Dq, 0.0);
            for (int h = 0; h < H; h++) {
                const int kvh = h / (H / Hkv);
                std::vector<double> s(t + 1, -1e300);
                double mx = -1e300, sum = 0;
                for (int j = std::max(0, t - window + 1); j <= t; j++) {
                    double d = 0;
                    for (int i = 0; i < hd; i++) d += q[t][h * hd + i] * k[j][kvh * hd + i];
                    s[j] = d * att_scale;
                    mx = std::max(mx, s[j]);
                }
                for (auto &e : s) sum += (e = std::exp(e - mx));
                for (int j = 0; j <= t; j++)
                    for (int i = 0; i < hd; i++) att[h * hd + i] += s[j] / sum * v[j][kvh * hd + i];
            }
            Mat o = matvec(wo, att.data(), E, Dq);
            if (p.post_norms) o = rmsnorm(o.data(), tm.get(b + "post_attention_norm.weight"), E, p.rms_eps);
            for (int i = 0; i < E; i++) x[t][i] += o[i];
            Mat xn = rmsnorm(x[t].data(), fn, E, p.rms_eps);
            Mat g = matvec(wg, xn.data(), F, E), u = matvec(wu, xn.data(), F, E);
            for (int i = 0; i < F; i++)
                g[i] = p.ffn_act == 1 ? 0.5 * g[i] * (1 + std::tanh(std::sqrt(2 / M_PI) * (g[i] + 0.044715 * g[i] * g[i] * g[i]))) * u[i]
                                      : g[i] / (1 + std::exp(-g[i])) * u[i];
            Mat d = matvec(wd, g.data(), E, F);
            if (p.post_norms) d = rmsnorm(d.data(), tm.get(b + "post_ffw_norm.weight"), E, p.rms_eps);
            for (int i = 0; i < E; i++) x[t][i] += d[i];
        }
    }
    const Mat on = tm.get("output_norm.weight");
    const Mat out = tm.t.count("output.weight") ? tm.get("output.weight") : embd;
    std::vector<Mat> logits(L);
    for (int t = 0; t < L; t++) {
        Mat xn = rmsnorm(x[t].data(), on, E, p.rms_eps);
        logits[t] = matvec(out, xn.data(), p.n_vocab, E);
        if (p.final_logit_softcap > 0)
            for (auto &e : logits[t]) e = p.final_logit_softcap * std::tanh(e / p.final_logit_softcap);
    }
    return logits;
}

// ---- native batches
struct Seq {
    std::vector<int32_t> table;  // physical blocks
    std::vector<int> tokens;     // all tokens so far
};

struct Step {
    std::vector<int32_t> tokens, positions, seq_ids, rows, tables;
    int max_blocks = 0, n_seqs = 0;
    tv_batch batch() const {
        return tv_batch{(int32_t)tokens.size(), tokens.data(), positions.data(), seq_ids.data(), n_seqs, max_blocks,
                        tables.data(), (int32_t)rows.size(), rows.data()};
    }
};

Step make_step(const std::vector<Seq> &seqs, const std::vector<std::pair<int, int>> &items /* (seq, pos) */,
               int max_blocks) {
    Step s;
    s.max_blocks = max_blocks, s.n_seqs = (int)seqs.size();
    for (auto &sq : seqs) {
        std::vector<int32_t> row(max_blocks, -1);
        std::copy(sq.table.begin(), sq.table.end(), row.begin());
        s.tables.insert(s.tables.end(), row.begin(), row.end());
    }
    for (auto [seq, pos] : items) {
        s.rows.push_back((int32_t)s.tokens.size());
        s.tokens.push_back(seqs[seq].tokens[pos]), s.positions.push_back(pos), s.seq_ids.push_back(seq);
    }
    return s;
}

double max_abs(const std::vector<Mat> &v) {
    double m = 1e-9;
    for (auto &r : v)
        for (double x : r) m = std::max(m, std::fabs(x));
    return m;
}

void run_model_case(const Config &c, double rel_tol, const char *label) {
    auto tm = make_model(c);
    const int bs = 4, n_blocks = 32, max_blocks = 6, V = tm->p.n_vocab;
    tv_kv_cache *cache = nullptr;
    CHECK(tv_kv_cache_create(tm->m, n_blocks, bs, c.kv_dtype, &cache) == TV_OK) << tv_last_error();
    std::vector<int32_t> perm(n_blocks);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng());
    // seq 0: prompt of 7 then 5 decode steps; seq 1: prompt 3 in the same first batch, then decodes
    std::vector<Seq> seqs(2);
    seqs[0].table = {perm[0], perm[1], perm[2], perm[3]};
    seqs[1].table = {perm[4], perm[5], perm[6], perm[7]};
    for (int i = 0; i < 12; i++) seqs[0].tokens.push_back(randint(0, V - 1));
    for (int i = 0; i < 9; i++) seqs[1].tokens.push_back(randint(0, V - 1));
    const std::vector<Mat> ref0 = reference_logits(*tm, seqs[0].tokens), ref1 = reference_logits(*tm, seqs[1].tokens);
    const double scale = std::max(max_abs(ref0), max_abs(ref1));
    std::vector<float> inc_last;  // incremental logits of seq 0's last token

    auto check_rows = [&](const Step &s, const std::vector<float> &logits) {
        for (size_t r = 0; r < s.rows.size(); r++) {
            const int seq = s.seq_ids[r], pos = s.positions[r];
            const Mat &ref = (seq == 0 ? ref0 : ref1)[pos];
            double err = 0;
            for (int v = 0; v < V; v++) err = std::max(err, std::fabs(logits[r * V + v] - ref[v]));
            CHECK(err <= rel_tol * scale) << label << ": seq " << seq << " pos " << pos << " max err " << err
                                          << " (scale " << scale << ")";
        }
    };

    // prefill: both prompts interleaved in one batch
    std::vector<std::pair<int, int>> items;
    for (int i = 0; i < 7; i++) {
        items.push_back({0, i});
        if (i < 3) items.push_back({1, i});
    }
    Step s = make_step(seqs, items, max_blocks);
    std::vector<float> logits(s.rows.size() * V);
    tv_batch b = s.batch();
    CHECK(tv_model_forward(tm->m, cache, &b, logits.data()) == TV_OK) << tv_last_error();
    check_rows(s, logits);
    // decode: one token per sequence per step, seq 1 first in the batch
    for (int step = 0; step < 6; step++) {
        items.clear();
        if (3 + step < 9) items.push_back({1, 3 + step});
        if (7 + step < 12) items.push_back({0, 7 + step});
        s = make_step(seqs, items, max_blocks);
        logits.assign(s.rows.size() * V, 0);
        b = s.batch();
        CHECK(tv_model_forward(tm->m, cache, &b, logits.data()) == TV_OK) << tv_last_error();
        check_rows(s, logits);
        for (size_t r = 0; r < s.rows.size(); r++)
            if (s.seq_ids[r] == 0 && s.positions[r] == 11) inc_last.assign(logits.begin() + r * V, logits.begin() + (r + 1) * V);
    }
    // full recompute of seq 0 in a fresh cache, logits only for the last row: bit-identical to the
    // incremental result (kernels are batch-invariant)
    tv_kv_cache *fresh = nullptr;
    CHECK(tv_kv_cache_create(tm->m, n_blocks, bs, c.kv_dtype, &fresh) == TV_OK);
    items.clear();
    for (int i = 0; i < 12; i++) items.push_back({0, i});
    s = make_step(seqs, items, max_blocks);
    s.rows = {11};
    logits.assign(V, 0);
    b = s.batch();
    CHECK(tv_model_forward(tm->m, fresh, &b, logits.data()) == TV_OK) << tv_last_error();
    CHECK(inc_last.size() == (size_t)V);
    for (int v = 0; v < V && inc_last.size() == (size_t)V; v++)
        CHECK(logits[v] == inc_last[v]) << label << " recompute vs incremental: " << logits[v] << " vs " << inc_last[v];

    // copy-on-write fork: seq 2 shares seq 1's full blocks, its partial last block is copied
    // (seq 1 has 9 tokens: blocks 0,1 full, block 2 holds position 8)
    seqs.push_back(seqs[1]);
    seqs[2].table[2] = perm[10];
    CHECK(tv_kv_cache_copy_block(cache, seqs[1].table[2], perm[10]) == TV_OK);
    seqs[2].tokens.push_back(randint(0, V - 1));
    const std::vector<Mat> ref2 = reference_logits(*tm, seqs[2].tokens);
    s = make_step(seqs, {{2, 9}}, max_blocks);
    logits.assign(V, 0);
    b = s.batch();
    CHECK(tv_model_forward(tm->m, cache, &b, logits.data()) == TV_OK) << tv_last_error();
    double err = 0;
    for (int v = 0; v < V; v++) err = std::max(err, std::fabs(logits[v] - ref2[9][v]));
    CHECK(err <= rel_tol * scale) << label << ": forked sequence err " << err;

    tv_kv_cache_free(cache);
    tv_kv_cache_free(fresh);
}

}  // namespace

TEST(model_forward_f32_weights) {
    // float weights, fp32 KV: only float rounding separates native from the double reference
    run_model_case({TV_F32, TV_F32, TV_F32, TV_F32, TV_F32, true, false, false, TV_F32}, 1e-5, "f32");
    run_model_case({TV_F16, TV_F16, TV_F16, TV_F16, TV_F16, false, true, true, TV_F32}, 1e-5, "f16");
}

TEST(model_forward_quantized_weights) {
    // int16 activations: quantization noise ~1e-5 relative, so compare relative to the logit scale
    const char *restore = tv_kernel_path();
    for (const char *path : tv::available_kernels()) {
        tv::select_kernels(path);
        run_model_case({TV_Q4_1, TV_Q4_0, TV_Q4_1, TV_Q8_0, TV_Q8_0, false, true, true, TV_F16}, 1e-3, path);
        run_model_case({TV_Q8_0, TV_Q8_0, TV_Q4_0, TV_F16, TV_Q4_1, true, false, false, TV_F32}, 1e-3, path);
    }
    tv::select_kernels(restore);
}

TEST(model_forward_qwen3_and_gemma3_blocks) {
    // the same checks (reference, decode == recompute bits, forks) with q/k norms, and Gemma 3's
    // block: seq 0 reaches position 11 with a window of 3, so layer 0 masks most of its keys
    run_model_case({TV_F32, TV_F32, TV_F32, TV_F32, TV_F32, false, true, false, TV_F32, 1}, 1e-5, "qwen3 f32");
    run_model_case({TV_F32, TV_F32, TV_F32, TV_F32, TV_F32, false, true, false, TV_F32, 2}, 1e-5, "gemma3 f32");
    const char *restore = tv_kernel_path();
    for (const char *path : tv::available_kernels()) {
        tv::select_kernels(path);
        run_model_case({TV_Q8_0, TV_Q4_0, TV_Q8_0, TV_Q8_0, TV_Q8_0, false, true, false, TV_F16, 2}, 1e-3, path);
    }
    tv::select_kernels(restore);
}

TEST(model_thread_count_invariant) {
    // every output element is computed by exactly one thread in a fixed order: any thread count
    // gives bit-identical logits
    Config c{TV_Q4_1, TV_Q8_0, TV_Q4_0, TV_Q8_0, TV_Q8_0, false, true, true, TV_F16};
    const uint64_t seed = rng()();
    std::vector<std::vector<float>> results;
    for (int threads : {1, 2, 3}) {
        rng().seed(seed);
        auto tm = make_model(c);
        tv_model_free(tm->m);
        tm->m = nullptr;
        tm->p.n_threads = threads;
        CHECK(tv_model_create(&tm->p, &tm->m) == TV_OK);
        for (auto &[name, h] : tm->t) {
            tv_tensor d = h.desc();
            CHECK(tv_model_set_tensor(tm->m, name.c_str(), &d) == TV_OK);
        }
        CHECK(tv_model_finalize(tm->m) == TV_OK);
        tv_kv_cache *cache = nullptr;
        CHECK(tv_kv_cache_create(tm->m, 8, 4, TV_F16, &cache) == TV_OK);
        std::vector<int32_t> toks{3, 1, 4, 1, 5, 9, 2, 6, 5, 3}, pos{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, seq(10, 0),
            tab{2, 0, 7}, rows{9, 4, 0};
        tv_batch b{10, toks.data(), pos.data(), seq.data(), 1, 3, tab.data(), 3, rows.data()};
        std::vector<float> logits(3 * 50);
        CHECK(tv_model_forward(tm->m, cache, &b, logits.data()) == TV_OK) << tv_last_error();
        results.push_back(logits);
        tv_kv_cache_free(cache);
    }
    CHECK(results[0] == results[1] && results[0] == results[2]);
}

TEST(model_errors) {
    Config c{TV_F32, TV_F32, TV_F32, TV_F32, TV_F32, false, true, false, TV_F16};
    auto tm = make_model(c);
    auto invalid = [](int rc) { return rc == TV_ERR_INVALID && std::strlen(tv_last_error()) > 0; };

    // params
    tv_model_params p = tm->p;
    tv_model *m = nullptr;
    p.n_head_kv = 3;
    CHECK(invalid(tv_model_create(&p, &m)));
    CHECK(m == nullptr);
    p = tm->p, p.head_dim = 15;
    CHECK(invalid(tv_model_create(&p, &m)));
    p = tm->p, p.rope_inv_freq = nullptr;
    CHECK(invalid(tv_model_create(&p, &m)));
    p = tm->p, p.n_layer = 0;
    CHECK(invalid(tv_model_create(&p, &m)));
    CHECK(invalid(tv_model_create(nullptr, &m)));
    p = tm->p, p.sliding_window = 4;  // no swa_layers
    CHECK(invalid(tv_model_create(&p, &m)));
    p = tm->p, p.ffn_act = 2;
    CHECK(invalid(tv_model_create(&p, &m)));
    p = tm->p, p.final_logit_softcap = -1.0f;
    CHECK(invalid(tv_model_create(&p, &m)));
    p = tm->p, p.qk_norm = 2;
    CHECK(invalid(tv_model_create(&p, &m)));
    for (int rot : {-2, 3, tm->p.head_dim + 2}) {  // partial RoPE: even, within the head
        p = tm->p, p.n_rot = rot;
        CHECK(invalid(tv_model_create(&p, &m))) << rot;
    }
    p = tm->p, p.rope_mscale = -1.0f;
    CHECK(invalid(tv_model_create(&p, &m)));
    CHECK(m == nullptr);
    {  // q/k norms only with qk_norm, and then required
        HostTensor hn = random_tensor(TV_F32, 1, 16);
        tv_tensor dn = hn.desc();
        CHECK(tv_model_create(&tm->p, &m) == TV_OK);
        CHECK(invalid(tv_model_set_tensor(m, "blk.0.attn_q_norm.weight", &dn)));
        CHECK(std::string(tv_last_error()).find("qk_norm") != std::string::npos) << tv_last_error();
        tv_model_free(m);
        p = tm->p, p.qk_norm = 1;
        CHECK(tv_model_create(&p, &m) == TV_OK);
        for (auto &[name, h] : tm->t) {
            tv_tensor d = h.desc();
            CHECK(tv_model_set_tensor(m, name.c_str(), &d) == TV_OK) << tv_last_error();
        }
        CHECK(tv_model_set_tensor(m, "blk.0.attn_q_norm.weight", &dn) == TV_OK) << tv_last_error();
        CHECK(invalid(tv_model_finalize(m)));
        CHECK(std::string(tv_last_error()).find("attn_k_norm") != std::string::npos) << tv_last_error();
        tv_model_free(m);
        m = nullptr;
    }

    // tensors on a fresh model
    CHECK(tv_model_create(&tm->p, &m) == TV_OK);
    HostTensor q = tm->t.at("blk.0.attn_q.weight");
    tv_tensor d = q.desc();
    CHECK(invalid(tv_model_set_tensor(m, "blk.0.attn_qq.weight", &d)));
    CHECK(invalid(tv_model_set_tensor(m, "blk.2.attn_q.weight", &d)));  // layer out of range
    CHECK(invalid(tv_model_set_tensor(m, "blk.x.attn_q.weight", &d)));
    CHECK(invalid(tv_model_set_tensor(m, "blk.0.attn_k.weight", &d)));  // wrong shape (n_head_kv rows)
    CHECK(std::string(tv_last_error()).find("shape") != std::string::npos) << tv_last_error();
    tv_tensor bad = d;
    bad.nbytes += 4;
    CHECK(invalid(tv_model_set_tensor(m, "blk.0.attn_q.weight", &bad)));
    bad = d, bad.dtype = 5;  // a GGML id that no longer exists
    CHECK(invalid(tv_model_set_tensor(m, "blk.0.attn_q.weight", &bad)));
    CHECK(std::string(tv_last_error()).find("unsupported dtype 5 (supported: F32, F16, Q4_0") != std::string::npos)
        << tv_last_error();
    CHECK(invalid(tv_model_set_tensor(m, "blk.0.attn_q.weight", nullptr)));
    HostTensor qn = random_tensor(TV_F16, 1, 64);
    tv_tensor dn = qn.desc();
    CHECK(invalid(tv_model_set_tensor(m, "blk.0.attn_norm.weight", &dn)));  // norms must be F32
    CHECK(tv_model_set_tensor(m, "blk.0.attn_q.weight", &d) == TV_OK);
    CHECK(std::strlen(tv_last_error()) == 0);
    CHECK(invalid(tv_model_set_tensor(m, "blk.0.attn_q.weight", &d)));  // set twice
    CHECK(invalid(tv_model_finalize(m)));                                // missing tensors
    CHECK(std::string(tv_last_error()).find("missing") != std::string::npos) << tv_last_error();
    tv_kv_cache *c2 = nullptr;
    CHECK(tv_kv_cache_create(m, 4, 4, TV_F16, &c2) == TV_OK);
    std::vector<int32_t> one{1}, zero{0}, table{0};
    tv_batch b{1, one.data(), zero.data(), zero.data(), 1, 1, table.data(), 1, zero.data()};
    std::vector<float> logits(50);
    CHECK(invalid(tv_model_forward(m, c2, &b, logits.data())));  // not finalized
    CHECK(std::string(tv_last_error()).find("finalize") != std::string::npos) << tv_last_error();
    tv_kv_cache_free(c2);
    tv_model_free(m);

    // batches on the finalized model
    tv_kv_cache *cache = nullptr;
    CHECK(invalid(tv_kv_cache_create(tm->m, 8, 4, TV_Q8_0, &cache)));
    CHECK(invalid(tv_kv_cache_create(tm->m, 0, 4, TV_F16, &cache)));
    CHECK(tv_kv_cache_create(tm->m, 8, 4, TV_F16, &cache) == TV_OK);
    CHECK(tv_kv_cache_bytes(cache) == (size_t)2 * 2 * 8 * 4 * 2 * 16 * 2);
    CHECK(invalid(tv_kv_cache_copy_block(cache, 0, 8)));
    CHECK(invalid(tv_kv_cache_copy_block(cache, -1, 0)));
    std::vector<int32_t> toks{1, 2, 3}, pos{0, 1, 2}, seq{0, 0, 0}, tab{5, 6}, rows{2};
    auto batch = [&] {
        return tv_batch{(int32_t)toks.size(), toks.data(), pos.data(), seq.data(), 1, (int32_t)tab.size(), tab.data(),
                        (int32_t)rows.size(), rows.data()};
    };
    b = batch();
    CHECK(tv_model_forward(tm->m, cache, &b, logits.data()) == TV_OK) << tv_last_error();
    toks[1] = 50;
    b = batch();
    CHECK(invalid(tv_model_forward(tm->m, cache, &b, logits.data())));
    CHECK(std::string(tv_last_error()).find("token") != std::string::npos) << tv_last_error();
    toks[1] = -1;
    b = batch();
    CHECK(invalid(tv_model_forward(tm->m, cache, &b, logits.data())));
    toks[1] = 2, pos[0] = -1;
    b = batch();
    CHECK(invalid(tv_model_forward(tm->m, cache, &b, logits.data())));
    pos = {1, 0, 2};  // not increasing within the sequence
    b = batch();
    CHECK(invalid(tv_model_forward(tm->m, cache, &b, logits.data())));
    pos = {0, 1, 8};  // needs block 2, max_blocks is 2
    b = batch();
    CHECK(invalid(tv_model_forward(tm->m, cache, &b, logits.data())));
    pos = {0, 1, 4}, tab = {5, 8};  // block id out of range
    b = batch();
    CHECK(invalid(tv_model_forward(tm->m, cache, &b, logits.data())));
    CHECK(std::string(tv_last_error()).find("block") != std::string::npos) << tv_last_error();
    tab = {5, -1};
    b = batch();
    CHECK(invalid(tv_model_forward(tm->m, cache, &b, logits.data())));
    tab = {5, 6}, seq = {0, 1, 0};  // seq id out of range (n_seqs = 1)
    b = batch();
    CHECK(invalid(tv_model_forward(tm->m, cache, &b, logits.data())));
    seq = {0, 0, 0}, rows = {3};
    b = batch();
    CHECK(invalid(tv_model_forward(tm->m, cache, &b, logits.data())));
    rows = {2};
    b = batch();
    b.n_tokens = 0;
    CHECK(invalid(tv_model_forward(tm->m, cache, &b, logits.data())));
    b = batch();
    CHECK(invalid(tv_model_forward(tm->m, cache, &b, nullptr)));
    CHECK(invalid(tv_model_forward(tm->m, cache, nullptr, logits.data())));
    // a cache built for another model shape
    tv_model_params p3 = tm->p;
    p3.n_layer = 3;
    tv_model *m3 = nullptr;
    tv_kv_cache *c3 = nullptr;
    CHECK(tv_model_create(&p3, &m3) == TV_OK);
    CHECK(tv_kv_cache_create(m3, 8, 4, TV_F16, &c3) == TV_OK);
    b = batch();
    CHECK(invalid(tv_model_forward(tm->m, c3, &b, logits.data())));
    tv_kv_cache_free(c3);
    tv_model_free(m3);
    // still healthy after all that
    b = batch();
    CHECK(tv_model_forward(tm->m, cache, &b, logits.data()) == TV_OK) << tv_last_error();
    CHECK(invalid(tv_model_finalize(tm->m)));  // twice
    tv_kv_cache_free(cache);
}
