// The rules of a tv_batch (tinyvllm.h), written once for every entry point that takes one:
// tv_model_forward, and the standalone tv_kv_cache_write and tv_attention_paged.
#pragma once

#include <cstdint>
#include <vector>

#include "attention.h"
#include "kv_cache.h"
#include "tinyvllm.h"

namespace tv {

// Checks b against cache c and returns its token layout; throws InvalidArgument, messages start
// with f. Every call: n_tokens > 0; positions, seq_ids, block_tables not null; n_seqs and
// max_blocks > 0; each token's seq_id in [0, n_seqs), position >= 0, increasing within its
// sequence, in a block < max_blocks; every block a token reads (0..position / block_size) in
// [0, n_blocks). A forward (n_vocab > 0) also needs tokens in [0, n_vocab) and, when it asks for
// logits, logits_rows in [0, n_tokens) and logits not null; the standalone calls ignore tokens
// and logits. last_pos is scratch (n_seqs entries, reused across calls).
AttentionBatch check_batch(const char *f, const KvCache &c, const tv_batch *b, int32_t n_vocab, const float *logits,
                           std::vector<int32_t> &last_pos);

}  // namespace tv
