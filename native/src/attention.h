// Causal paged attention for a batch: token t (sequence seq_ids[t], position positions[t])
// attends to positions 0..positions[t] of its sequence (only the last `window` of them on a
// sliding-window layer), read from the KV cache through the block table. GQA: query head h reads
// kv head h / (n_head / n_head_kv).
#pragma once

#include <cstdint>
#include <vector>

#include "kv_cache.h"
#include "threadpool.h"

namespace tv {

struct AttentionBatch {
    int32_t n_tokens;
    const int32_t *positions;
    const int32_t *seq_ids;
    const int32_t *block_tables;  // [n_seqs * max_blocks]
    int32_t max_blocks;
    int32_t window = 0;  // > 0: keys at positions <= positions[t] - window are masked out
    float scale = 0.0f;  // score scale; 0: 1/sqrt(head_dim)
};

struct ActBlock;

// q, out: [n_tokens, n_head * head_dim]. scratch is grown as needed (per-thread work space).
// out_q (optional, head_dim a multiple of QK): out's int16 blocks too, [n_tokens, n_head * head_dim / QK],
// quantized by the task that wrote each head (the next matmul's input without a region of its own;
// blocks are quantized independently, so the bits equal quantizing whole rows).
void attention(const KvCache &cache, int layer, const AttentionBatch &b, const float *q, float *out, int n_head,
               ThreadPool &pool, std::vector<float> &scratch, ActBlock *out_q = nullptr);

}  // namespace tv
