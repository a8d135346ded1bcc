// LLaMA forward over a batch of tokens from any number of sequences (prefill and decode mixed):
//   x = embed(tokens)
//   per layer: x += Wo · attn(rope(Wq·norm(x)), rope(Wk·norm(x)), Wv·norm(x))
//              x += Wdown · (silu(Wgate·norm(x)) * Wup·norm(x))
//   logits = Wout · norm(x) for the requested rows only.
// The other architectures are this block with per-model switches (tv_model_params), each tested
// once per layer or step: Qwen2's q/k/v biases; qk_norm (Qwen3, Gemma 3) normalizes every q/k
// head before RoPE; Gemma 3 adds embd_scale, post_norms (the attention and FFN outputs are
// normalized before their residual adds), a GELU gate, its own attention scale, and sliding-window
// layers with their own RoPE frequencies; SmolLM3 leaves RoPE out on its NoPE layers (nope_layers).
// Activations are [n_tokens, features] row-major; every matmul runs the whole batch at once.
#include "model.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "attention.h"
#include "batch.h"
#include "common.h"
#include "kernels.h"
#include "ops.h"

namespace tv {

namespace {

template <class T>
T *grow(std::vector<T> &v, size_t n) {
    if (v.size() < n) v.resize(n);
    return v.data();
}

// Per-token work (norms, quantization, RoPE, KV writes, SwiGLU, residuals) over the pool when the
// batch pays for a parallel region (prefill, batched decode: SwiGLU's exp alone is ~0.2 ms per
// layer at 16 tokens); a decode token runs inline. Each token's arithmetic is the same either way.
template <class F>
void per_token(ThreadPool &pool, int T, F &&fn) {
    if (T < 4) {
        for (int t = 0; t < T; t++) fn(t);
        return;
    }
    pool.run(T, [&](int64_t t, int) { fn((int)t); });
}

}  // namespace

Model::Model(const tv_model_params &p) : p_(p) {
    const char *f = "tv_model_create";
    if (p.n_vocab <= 0 || p.n_embd <= 0 || p.n_ff <= 0 || p.n_layer <= 0 || p.n_head <= 0 || p.n_head_kv <= 0 ||
        p.head_dim <= 0)
        fail("%s: n_vocab, n_embd, n_ff, n_layer, n_head, n_head_kv and head_dim must be > 0", f);
    if (p.n_head % p.n_head_kv != 0)
        fail("%s: n_head (%d) must be a multiple of n_head_kv (%d)", f, p.n_head, p.n_head_kv);
    if (p.head_dim % 2 != 0) fail("%s: head_dim (%d) must be even for RoPE", f, p.head_dim);
    if (!(p.rms_eps >= 0.0f) || !std::isfinite(p.rms_eps)) fail("%s: rms_eps must be finite and >= 0", f);
    if (!p.rope_inv_freq) fail("%s: rope_inv_freq is null", f);
    if ((p.qk_norm | p.post_norms) & ~1) fail("%s: qk_norm and post_norms must be 0 or 1", f);
    if (p.ffn_act != 0 && p.ffn_act != 1) fail("%s: ffn_act must be 0 (SiLU) or 1 (GELU tanh), got %d", f, p.ffn_act);
    for (float v : {p.embd_scale, p.attn_scale, p.final_logit_softcap})
        if (!(v >= 0.0f) || !std::isfinite(v)) fail("%s: embd_scale, attn_scale and final_logit_softcap must be finite and >= 0", f);
    if (p.sliding_window < 0) fail("%s: sliding_window must be >= 0 (got %d)", f, p.sliding_window);
    if (p.sliding_window > 0 && !p.swa_layers) fail("%s: sliding_window is set but swa_layers is null", f);
    if (p.n_rot < 0 || p.n_rot > p.head_dim || p.n_rot % 2 != 0)
        fail("%s: n_rot (%d) must be even and in [0, head_dim %d]", f, p.n_rot, p.head_dim);
    p_.n_rot = p.n_rot > 0 ? p.n_rot : p.head_dim;
    if (!(p.rope_mscale >= 0.0f) || !std::isfinite(p.rope_mscale)) fail("%s: rope_mscale must be finite and >= 0", f);
    inv_freq_.assign(p.rope_inv_freq, p.rope_inv_freq + p_.n_rot / 2);
    p_.rope_inv_freq = inv_freq_.data();
    const float *fs = p.rope_inv_freq_swa ? p.rope_inv_freq_swa : p.rope_inv_freq;
    inv_freq_swa_.assign(fs, fs + p_.n_rot / 2);
    p_.rope_inv_freq_swa = inv_freq_swa_.data();
    swa_.assign((size_t)p.n_layer, 0);
    for (int l = 0; p.sliding_window > 0 && l < p.n_layer; l++) swa_[(size_t)l] = p.swa_layers[l] != 0;
    nope_.assign((size_t)p.n_layer, 0);
    for (int l = 0; p.nope_layers && l < p.n_layer; l++) nope_[(size_t)l] = p.nope_layers[l] != 0;
    p_.swa_layers = p_.nope_layers = nullptr;  // copied into swa_ and nope_; the caller's arrays are not kept
    layers_.resize((size_t)p.n_layer);
    pool_ = std::make_unique<ThreadPool>(p.n_threads);
    // A matmul may return while a descheduled worker still computes a copy of one of its tasks (it
    // reads weights, scratch and the caller's prepared activations, writes only its pool scratch):
    // a forward whose scratch may grow starts with quiesce(), and so does the destructor.
    pool_->set_allow_stale_workers(true);
    pool_->reserve_scratch((size_t)DUP_ITEM_FLOATS);  // paid by workspace_bytes
    p_.n_threads = pool_->size();
}

namespace {

// Every tensor the model takes, by GGUF name, written once: set_tensor looks a name up here to find
// its slot and the shape, dtype and feature flag it needs; finalize walks it for what is missing.
// Shapes are rows x cols in model dimensions; 1-D tensors (norms, biases) come as rows = 1.
enum Dim { ONE, EMBD, VOCAB, FF, QDIM, KVDIM, HEAD };  // indexes Model::set_tensor's dims[]
enum Need { ALWAYS, OPTIONAL, BIAS, QK_NORM, POST_NORMS };  // BIAS: attn_q/k/v all three or none
template <class S>
struct TensorRule {
    const char *name;  // layer tensors: after "blk.N."
    Weight S::*slot;
    Dim rows, cols;
    bool f32_only;  // norms and biases
    Need need;
};
const TensorRule<GlobalWeights> GLOBAL_TENSORS[] = {
    {"token_embd.weight", &GlobalWeights::token_embd, VOCAB, EMBD, false, ALWAYS},
    {"output_norm.weight", &GlobalWeights::output_norm, ONE, EMBD, true, ALWAYS},
    {"output.weight", &GlobalWeights::output, VOCAB, EMBD, false, OPTIONAL},
};
const TensorRule<LayerWeights> LAYER_TENSORS[] = {
    {"attn_norm.weight", &LayerWeights::attn_norm, ONE, EMBD, true, ALWAYS},
    {"attn_q.weight", &LayerWeights::wq, QDIM, EMBD, false, ALWAYS},
    {"attn_k.weight", &LayerWeights::wk, KVDIM, EMBD, false, ALWAYS},
    {"attn_v.weight", &LayerWeights::wv, KVDIM, EMBD, false, ALWAYS},
    {"attn_output.weight", &LayerWeights::wo, EMBD, QDIM, false, ALWAYS},
    {"ffn_norm.weight", &LayerWeights::ffn_norm, ONE, EMBD, true, ALWAYS},
    {"ffn_gate.weight", &LayerWeights::gate, FF, EMBD, false, ALWAYS},
    {"ffn_up.weight", &LayerWeights::up, FF, EMBD, false, ALWAYS},
    {"ffn_down.weight", &LayerWeights::down, EMBD, FF, false, ALWAYS},
    {"attn_q.bias", &LayerWeights::bq, ONE, QDIM, true, BIAS},
    {"attn_k.bias", &LayerWeights::bk, ONE, KVDIM, true, BIAS},
    {"attn_v.bias", &LayerWeights::bv, ONE, KVDIM, true, BIAS},
    {"attn_q_norm.weight", &LayerWeights::q_norm, ONE, HEAD, true, QK_NORM},
    {"attn_k_norm.weight", &LayerWeights::k_norm, ONE, HEAD, true, QK_NORM},
    {"post_attention_norm.weight", &LayerWeights::post_attn_norm, ONE, EMBD, true, POST_NORMS},
    {"post_ffw_norm.weight", &LayerWeights::post_ffw_norm, ONE, EMBD, true, POST_NORMS},
};

// Whether this model takes tensors of this kind (q/k norms and post norms only with their flags).
bool wanted(const tv_model_params &p, Need n) { return n == QK_NORM ? p.qk_norm : n == POST_NORMS ? p.post_norms : true; }

// The rule called `name` among `rules`, if this model takes it.
template <class S, size_t N>
const TensorRule<S> *find_rule(const TensorRule<S> (&rules)[N], const std::string &name, const tv_model_params &p) {
    for (const TensorRule<S> &r : rules)
        if (name == r.name && wanted(p, r.need)) return &r;
    return nullptr;
}

}  // namespace

void Model::set_tensor(const char *name, const tv_tensor &t) {
    const char *f = "tv_model_set_tensor";
    if (finalized_) fail("%s: model is already finalized", f);
    const std::string n(name);
    Weight *slot = nullptr;
    bool f32_only = false;
    int64_t rows = 0, cols = 0;
    const int64_t dims[] = {1, p_.n_embd, p_.n_vocab, p_.n_ff, (int64_t)p_.n_head * p_.head_dim,
                            (int64_t)p_.n_head_kv * p_.head_dim, p_.head_dim};
    auto take = [&](const auto *rule, auto &weights) {
        if (rule) slot = &(weights.*(rule->slot)), rows = dims[rule->rows], cols = dims[rule->cols], f32_only = rule->f32_only;
    };
    if (n.compare(0, 4, "blk.") != 0) {
        take(find_rule(GLOBAL_TENSORS, n, p_), g_);
    } else {
        size_t i = 4;
        int64_t layer = 0;
        while (i < n.size() && i < 14 && n[i] >= '0' && n[i] <= '9') layer = layer * 10 + (n[i++] - '0');
        if (i == 4 || i >= n.size() || n[i] != '.') fail("%s: unknown tensor name '%s'", f, name);
        if (layer >= p_.n_layer) fail("%s: '%s': layer %lld out of range [0, %d)", f, name, (long long)layer, p_.n_layer);
        take(find_rule(LAYER_TENSORS, n.substr(i + 1), p_), layers_[(size_t)layer]);
    }
    if (!slot) fail("%s: unknown tensor name '%s' (q/k norms need qk_norm, post norms need post_norms)", f, name);
    if (slot->set()) fail("%s: tensor '%s' was already set", f, name);
    if (t.rows != rows || t.cols != cols)
        fail("%s: '%s': shape %lld x %lld, expected %lld x %lld (rows = out features, 1-D tensors as rows = 1)", f,
             name, (long long)t.rows, (long long)t.cols, (long long)rows, (long long)cols);
    const std::string what = std::string(f) + ": '" + n + "'";
    const Weight w = check_weight(what.c_str(), &t);
    if (f32_only && w.dtype != TV_F32)
        fail("%s: norms and biases must be F32, got %s", what.c_str(), dtype_name(w.dtype));
    *slot = w;
}

void Model::finalize() {
    const char *f = "tv_model_finalize";
    if (finalized_) fail("%s: model is already finalized", f);
    for (const auto &r : GLOBAL_TENSORS)
        if (r.need == ALWAYS && !(g_.*(r.slot)).set()) fail("%s: missing tensor '%s'", f, r.name);
    for (int l = 0; l < p_.n_layer; l++) {
        const LayerWeights &L = layers_[(size_t)l];
        int biases = 0;
        for (const auto &r : LAYER_TENSORS) {
            const bool set = (L.*(r.slot)).set();
            if (r.need == BIAS) biases += set;
            else if (r.need != OPTIONAL && wanted(p_, r.need) && !set) fail("%s: missing tensor 'blk.%d.%s'", f, l, r.name);
        }
        if (biases != 0 && biases != 3) fail("%s: blk.%d: attn_q/k/v biases must be given all three or none", f, l);
    }
    finalized_ = true;
}

Model::~Model() {
    if (pool_) pool_->quiesce();  // before the scratch a late worker may still read goes away
}

void Model::forward(KvCache &cache, const tv_batch &b, float *logits) {
    std::lock_guard<std::mutex> lock(forward_mu_);
    const char *f = "tv_model_forward";
    if (!finalized_) fail("%s: model is not finalized (call tv_model_finalize)", f);
    if (cache.n_layer != p_.n_layer || cache.n_head_kv != p_.n_head_kv || cache.head_dim != p_.head_dim)
        fail("%s: KV cache was made for a different model shape", f);
    check_batch(f, cache, &b, p_.n_vocab, logits, s_.last_pos);
    const int T = b.n_tokens, E = p_.n_embd, half = p_.n_rot / 2;
    // The scratch that matmul tasks read grows with the rows (T, n_logits) only: when it may grow, a
    // late worker of the last forward must be out first. Otherwise nobody waits for it (its result
    // is discarded; ThreadPool::run_dup).
    if (T > scratch_rows_ || b.n_logits > scratch_logits_) {
        pool_->quiesce();
        scratch_rows_ = std::max(scratch_rows_, T), scratch_logits_ = std::max(scratch_logits_, b.n_logits);
    }

    float *x = grow(s_.x, (size_t)T * E);
    for (int t = 0; t < T; t++) dequantize_row(g_.token_embd.dtype, g_.token_embd.row(b.tokens[t]), x + (size_t)t * E, E);
    if (p_.embd_scale != 0.0f)
        for (size_t i = 0; i < (size_t)T * E; i++) x[i] *= p_.embd_scale;
    // RoPE angles depend only on the position: once per token for all layers and heads (and once
    // more for the sliding-window layers' own frequencies).
    float *rc = grow(s_.rope_cos, (size_t)T * half), *rs = grow(s_.rope_sin, (size_t)T * half);
    for (int t = 0; t < T; t++) rope_angles(b.positions[t], inv_freq_.data(), half, rc + (size_t)t * half, rs + (size_t)t * half);
    if (p_.sliding_window > 0) {
        float *c = grow(s_.rope_cos_swa, (size_t)T * half), *s = grow(s_.rope_sin_swa, (size_t)T * half);
        for (int t = 0; t < T; t++)
            rope_angles(b.positions[t], inv_freq_swa_.data(), half, c + (size_t)t * half, s + (size_t)t * half);
    }
    if (p_.rope_mscale != 0.0f && p_.rope_mscale != 1.0f)  // LongRoPE scales the global layers' table (no SWA there)
        for (size_t i = 0; i < (size_t)T * half; i++) rc[i] *= p_.rope_mscale, rs[i] *= p_.rope_mscale;

    for (int l = 0; l < p_.n_layer; l++) run_layer(l, cache, b);

    if (b.n_logits == 0) return;
    const Weight &out = g_.output.set() ? g_.output : g_.token_embd;  // tied embeddings
    float *xn = grow(s_.xn, (size_t)b.n_logits * E);
    for (int i = 0; i < b.n_logits; i++)
        rmsnorm(x + (size_t)b.logits_rows[i] * E, reinterpret_cast<const float *>(g_.output_norm.data), xn + (size_t)i * E, E,
                p_.rms_eps);
    matmul(out, xn, b.n_logits, logits, *pool_, s_.xq);
    if (p_.final_logit_softcap > 0.0f) softcap(logits, (int64_t)b.n_logits * p_.n_vocab, p_.final_logit_softcap);
}

void Model::run_layer(int l, KvCache &cache, const tv_batch &b) {
    const LayerWeights &L = layers_[(size_t)l];
    const int T = b.n_tokens, E = p_.n_embd, F = p_.n_ff, hd = p_.head_dim, half = p_.n_rot / 2;
    const int Dq = p_.n_head * hd, Dkv = p_.n_head_kv * hd;
    ThreadPool &pool = *pool_;
    float *x = s_.x.data();
    float *xn = grow(s_.xn, (size_t)T * E), *q = grow(s_.q, (size_t)T * Dq), *k = grow(s_.k, (size_t)T * Dkv),
          *v = grow(s_.v, (size_t)T * Dkv), *att = grow(s_.att, (size_t)T * Dq), *tmp = grow(s_.tmp, (size_t)T * E);

    const Kernels &K = kernels();
    // Gemma 3 normalizes a block's output (tmp) before the residual add: post is its norm or null.
    const Weight *post_attn = p_.post_norms ? &L.post_attn_norm : nullptr, *post_ffw = p_.post_norms ? &L.post_ffw_norm : nullptr;
    auto residual_add = [&](int t, const Weight *post) {
        float *xt = x + (size_t)t * E, *tt = tmp + (size_t)t * E;
        if (post) rmsnorm(tt, reinterpret_cast<const float *>(post->data), tt, E, p_.rms_eps);
        for (int i = 0; i < E; i++) xt[i] += tt[i];
    };
    // x[t] += tmp[t] (when add), then xn[t] = norm(x[t]) and its int16 blocks for the next matmuls.
    const bool qE = E % QK == 0;
    ActBlock *xq = grow(s_.xq, (size_t)T * (std::max({E, F, Dq}) / QK));  // every quantization below
    auto norm_quant = [&](const Weight &norm, bool add, const Weight *post) {
        per_token(pool, T, [&](int t) {
            float *xt = x + (size_t)t * E, *xnt = xn + (size_t)t * E;
            if (add) residual_add(t, post);
            rmsnorm(xt, reinterpret_cast<const float *>(norm.data), xnt, E, p_.rms_eps);
            if (qE) K.quantize_act(xnt, xq + (size_t)t * (E / QK), E);
        });
        return qE ? xq : nullptr;
    };

    // --- attention block
    {
        // the previous layer's FFN residual add runs here, in this norm's parallel region (one region
        // fewer per layer; each token's arithmetic and order unchanged)
        const Weight *prev_post_ffw = p_.post_norms && l > 0 ? &layers_[(size_t)l - 1].post_ffw_norm : nullptr;
        const ActBlock *xqn = norm_quant(L.attn_norm, l > 0, prev_post_ffw);  // shared by q, k, v
        const Weight *ws[3] = {&L.wq, &L.wk, &L.wv};
        float *ys[3] = {q, k, v};
        matmul_multi(ws, ys, 3, xn, xqn, T, pool);  // one parallel region for q, k and v
    }
    // All of the batch's K/V go in before any attention, so tokens of one sequence in this batch
    // see each other (causally, by position).
    const bool swa = swa_[(size_t)l] != 0;
    const bool nope = nope_[(size_t)l] != 0;
    const float *rope_cos = swa ? s_.rope_cos_swa.data() : s_.rope_cos.data(),
                *rope_sin = swa ? s_.rope_sin_swa.data() : s_.rope_sin.data();
    per_token(pool, T, [&](int t) {
        if (L.bq.set()) {
            const float *bq = reinterpret_cast<const float *>(L.bq.data), *bk = reinterpret_cast<const float *>(L.bk.data),
                        *bv = reinterpret_cast<const float *>(L.bv.data);
            for (int i = 0; i < Dq; i++) q[(size_t)t * Dq + i] += bq[i];
            for (int i = 0; i < Dkv; i++) k[(size_t)t * Dkv + i] += bk[i], v[(size_t)t * Dkv + i] += bv[i];
        }
        if (p_.qk_norm) {  // per head, before RoPE
            for (int h = 0; h < p_.n_head; h++)
                rmsnorm(q + (size_t)t * Dq + (size_t)h * hd, reinterpret_cast<const float *>(L.q_norm.data),
                        q + (size_t)t * Dq + (size_t)h * hd, hd, p_.rms_eps);
            for (int h = 0; h < p_.n_head_kv; h++)
                rmsnorm(k + (size_t)t * Dkv + (size_t)h * hd, reinterpret_cast<const float *>(L.k_norm.data),
                        k + (size_t)t * Dkv + (size_t)h * hd, hd, p_.rms_eps);
        }
        const float *c = rope_cos + (size_t)t * half, *s = rope_sin + (size_t)t * half;
        if (!nope) {  // a NoPE layer's keys go to the cache unrotated: decode and prefill read them alike
            rope_apply(q + (size_t)t * Dq, p_.n_head, hd, p_.rope_interleaved != 0, c, s, p_.n_rot);
            rope_apply(k + (size_t)t * Dkv, p_.n_head_kv, hd, p_.rope_interleaved != 0, c, s, p_.n_rot);
        }
        const int pos = b.positions[t];  // tokens write distinct slots: no two tasks touch one value
        const int block = b.block_tables[(size_t)b.seq_ids[t] * b.max_blocks + pos / cache.block_size];
        cache.write(l, block, pos % cache.block_size, k + (size_t)t * Dkv, v + (size_t)t * Dkv);
    });
    const AttentionBatch ab{T, b.positions, b.seq_ids, b.block_tables, b.max_blocks, swa ? p_.sliding_window : 0,
                            p_.attn_scale};
    // (a quantized weight's cols are a whole number of blocks, checked at set_tensor: qD, qE, qF hold
    // whenever the matmul needs xq; float weights ignore it). Whole-block heads are quantized by the
    // attention tasks that write them (one parallel region fewer per layer).
    const bool qD = Dq % QK == 0, q_heads = hd % QK == 0;
    attention(cache, l, ab, q, att, p_.n_head, pool, s_.attn, q_heads ? xq : nullptr);
    if (qD && !q_heads) per_token(pool, T, [&](int t) { K.quantize_act(att + (size_t)t * Dq, xq + (size_t)t * (Dq / QK), Dq); });
    matmul(L.wo, att, qD ? xq : nullptr, T, tmp, pool);

    // --- feed-forward block
    float *g = grow(s_.gate, (size_t)T * F), *u = grow(s_.up, (size_t)T * F);
    {
        const ActBlock *xqn = norm_quant(L.ffn_norm, true, post_attn);  // shared by gate, up
        const Weight *ws[2] = {&L.gate, &L.up};
        float *ys[2] = {g, u};
        matmul_multi(ws, ys, 2, xn, xqn, T, pool);
    }
    const bool qF = F % QK == 0;
    per_token(pool, T, [&](int t) {
        if (p_.ffn_act == 0) K.silu_mul(g + (size_t)t * F, u + (size_t)t * F, F);
        else K.gelu_mul(g + (size_t)t * F, u + (size_t)t * F, F);
        if (qF) K.quantize_act(g + (size_t)t * F, xq + (size_t)t * (F / QK), F);
    });
    matmul(L.down, g, qF ? xq : nullptr, T, tmp, pool);
    if (l == p_.n_layer - 1) per_token(pool, T, [&](int t) { residual_add(t, post_ffw); });  // else the next layer's
}

}  // namespace tv
