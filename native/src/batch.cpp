// tv_batch validation (batch.h).
#include "batch.h"

#include "common.h"

namespace tv {

AttentionBatch check_batch(const char *f, const KvCache &c, const tv_batch *b, int32_t n_vocab, const float *logits,
                           std::vector<int32_t> &last_pos) {
    if (!b) fail("%s: batch is null", f);
    const bool forward = n_vocab > 0;
    if (b->n_tokens <= 0) fail("%s: n_tokens must be > 0 (got %d)", f, b->n_tokens);
    if (!b->positions || !b->seq_ids || (forward && !b->tokens))
        fail("%s: %spositions and seq_ids must not be null", f, forward ? "tokens, " : "");
    if (b->n_seqs <= 0 || b->max_blocks <= 0 || !b->block_tables)
        fail("%s: n_seqs and max_blocks must be > 0 and block_tables not null", f);
    if (forward && b->n_logits < 0) fail("%s: n_logits must be >= 0", f);
    if (forward && b->n_logits > 0 && (!b->logits_rows || !logits)) fail("%s: logits_rows and logits must not be null", f);
    last_pos.assign((size_t)b->n_seqs, -1);
    int32_t *last = last_pos.data();
    for (int t = 0; t < b->n_tokens; t++) {
        const int32_t pos = b->positions[t], seq = b->seq_ids[t];
        if (forward && (b->tokens[t] < 0 || b->tokens[t] >= n_vocab))
            fail("%s: token %d at index %d out of range [0, %d)", f, b->tokens[t], t, n_vocab);
        if (pos < 0) fail("%s: negative position %d at index %d", f, pos, t);
        if (seq < 0 || seq >= b->n_seqs) fail("%s: seq_id %d at index %d out of range [0, %d)", f, seq, t, b->n_seqs);
        if (pos / c.block_size >= b->max_blocks)
            fail("%s: position %d at index %d needs block %d but max_blocks is %d", f, pos, t, pos / c.block_size,
                 b->max_blocks);
        if (pos <= last[seq]) fail("%s: positions of sequence %d must increase within a batch (index %d)", f, seq, t);
        last[seq] = pos;
    }
    // every block a token reads (positions 0..pos) must be a real block
    for (int seq = 0; seq < b->n_seqs; seq++) {
        const int32_t *table = b->block_tables + (size_t)seq * b->max_blocks;
        for (int i = 0; last[seq] >= 0 && i <= last[seq] / c.block_size; i++)
            if (table[i] < 0 || table[i] >= c.n_blocks)
                fail("%s: block_tables[%d][%d] = %d out of range [0, %d)", f, seq, i, table[i], c.n_blocks);
    }
    for (int i = 0; forward && i < b->n_logits; i++)
        if (b->logits_rows[i] < 0 || b->logits_rows[i] >= b->n_tokens)
            fail("%s: logits_rows[%d] = %d out of range [0, %d)", f, i, b->logits_rows[i], b->n_tokens);
    return AttentionBatch{b->n_tokens, b->positions, b->seq_ids, b->block_tables, b->max_blocks};
}

}  // namespace tv
