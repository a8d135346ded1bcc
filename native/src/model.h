// The decoder model (LLaMA, Qwen2/3, Gemma 3): borrowed weights, validated shapes, and the batched
// forward pass.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "kv_cache.h"
#include "matmul.h"
#include "threadpool.h"
#include "tinyvllm.h"

namespace tv {

// The tensors outside the layers.
struct GlobalWeights {
    Weight token_embd, output_norm, output;  // output unset: tied to token_embd
};

struct LayerWeights {
    Weight attn_norm, wq, wk, wv, wo, bq, bk, bv, ffn_norm, gate, up, down;
    Weight q_norm, k_norm;                 // params.qk_norm
    Weight post_attn_norm, post_ffw_norm;  // params.post_norms
};

class Model {
   public:
    explicit Model(const tv_model_params &p);  // validates params (throws InvalidArgument)
    ~Model();

    void set_tensor(const char *name, const tv_tensor &t);
    void finalize();
    bool finalized() const { return finalized_; }
    // Validates the batch against the model and cache (check_batch), then runs it.
    void forward(KvCache &cache, const tv_batch &b, float *logits);

    const tv_model_params &params() const { return p_; }

   private:
    void run_layer(int l, KvCache &cache, const tv_batch &b);

    tv_model_params p_;
    std::vector<float> inv_freq_, inv_freq_swa_;
    std::vector<uint8_t> swa_;  // [n_layer]: 1 = sliding-window layer
    std::vector<uint8_t> nope_;  // [n_layer]: 1 = no RoPE on this layer (SmolLM3)
    GlobalWeights g_;
    std::vector<LayerWeights> layers_;
    bool finalized_ = false;
    int scratch_rows_ = 0, scratch_logits_ = 0;  // the most rows / logits rows a forward has grown s_ for
    std::unique_ptr<ThreadPool> pool_;
    std::mutex forward_mu_;  // scratch below belongs to one forward at a time

    // Scratch, grown to the largest batch seen and then reused: steady-state decode allocates nothing.
    struct Scratch {
        std::vector<float> x, xn, q, k, v, att, tmp, gate, up, rope_cos, rope_sin, rope_cos_swa, rope_sin_swa, attn;
        std::vector<ActBlock> xq;
        std::vector<int32_t> last_pos;
    } s_;
};

}  // namespace tv
