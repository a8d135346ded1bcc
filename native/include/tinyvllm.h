/* tinyvllm native core: a flat C ABI over opaque handles.
 *
 * Rules of this header (so cffi can cdef it straight, see tinyvllm/_native.py):
 *   - no #include of system headers is needed by cffi: only fixed-width ints, float, size_t;
 *   - lines starting with '#' are dropped by the Python loader, so keep declarations free of macros;
 *   - every function that can fail returns int (TV_OK = 0, negative on error) and leaves a
 *     message readable with tv_last_error() (thread-local); no C++ exception crosses this line;
 *   - memory passed in by pointer is borrowed, never freed here, unless a function says otherwise.
 */
#ifndef TINYVLLM_H
#define TINYVLLM_H

#include <stddef.h>
#include <stdint.h>

/* The library builds with hidden visibility: the functions declared here are its only exports. */
#if defined(__GNUC__)
#pragma GCC visibility push(default)
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Return codes. */
enum tv_status {
    TV_OK = 0,
    TV_ERR_INVALID = -1,   /* bad argument: shape, size, index out of range, null pointer */
    TV_ERR_NOMEM = -2,     /* allocation failed */
    TV_ERR_INTERNAL = -3   /* a bug: please report */
};

/* Tensor element types. Numbers follow GGML's so GGUF tensors map one to one. */
enum tv_dtype {
    TV_F32 = 0,
    TV_F16 = 1,
    TV_Q4_0 = 2,   /* 32-element blocks: f16 d, 16 bytes of nibbles; x = (q - 8) * d      */
    TV_Q4_1 = 3,   /* 32-element blocks: f16 d, f16 m, 16 bytes of nibbles; x = q * d + m */
    TV_Q5_0 = 6,   /* 32-element blocks: f16 d, 32 high bits, nibbles; x = (q - 16) * d   */
    TV_Q5_1 = 7,   /* 32-element blocks: f16 d, f16 m, 32 high bits, nibbles; x = q*d + m */
    TV_Q8_0 = 8,   /* 32-element blocks: f16 d, 32 int8; x = q * d                        */
    TV_Q2_K = 10,  /* 256-element super-blocks ("K-quants"), layouts in native/src/formats.h */
    TV_Q3_K = 11,
    TV_Q4_K = 12,
    TV_Q5_K = 13,
    TV_Q6_K = 14,
    TV_IQ4_NL = 20 /* 32-element blocks: f16 d, 4-bit indices into a fixed non-linear table */
};

/* A borrowed 2-D weight: `rows` output features, each a row of `cols` elements stored in
 * `dtype`'s layout (GGUF/PyTorch order: y = W x, W is rows x cols). 1-D tensors have rows = 1. */
typedef struct tv_tensor {
    int32_t dtype;
    int64_t rows;
    int64_t cols;
    const void *data;
    size_t nbytes;     /* checked against rows * row_bytes(dtype, cols) */
} tv_tensor;

typedef struct tv_model_params {
    int32_t n_vocab;
    int32_t n_embd;
    int32_t n_ff;
    int32_t n_layer;
    int32_t n_head;
    int32_t n_head_kv;
    int32_t head_dim;
    float rms_eps;
    /* 1: rotate interleaved pairs (x[2i], x[2i+1]), the layout of GGUF llama Q/K weights;
     * 0: rotate halves (x[i], x[i + head_dim/2]), the HF / NeoX layout. */
    int32_t rope_interleaved;
    /* head_dim/2 inverse frequencies, rope scaling (Llama 3, linear) already applied; copied. */
    const float *rope_inv_freq;
    int32_t n_threads; /* <= 0: one per online CPU */
    /* Features beyond LLaMA / Qwen2, per model; all zero (as cffi's ffi.new and `{}` leave them)
     * is the LLaMA block. */
    int32_t qk_norm;     /* 1: RMSNorm every q and k head (blk.N.attn_q_norm / attn_k_norm, [head_dim])
                          * before RoPE (qwen3, gemma3) */
    int32_t post_norms;  /* 1: RMSNorm the attention and FFN outputs before their residual adds
                          * (blk.N.post_attention_norm / post_ffw_norm, [n_embd]) (gemma3) */
    int32_t ffn_act;     /* gate activation: 0 SiLU, 1 GELU (tanh approximation, gemma3) */
    float embd_scale;    /* token embeddings are multiplied by this (gemma3: sqrt(n_embd)); 0: 1 */
    float attn_scale;    /* attention logit scale; 0: 1/sqrt(head_dim) */
    float final_logit_softcap; /* > 0: logits = cap * tanh(logits / cap) */
    /* Sliding-window attention: on layers with swa_layers[l] != 0, a query at position p sees keys
     * at positions > p - sliding_window (the KV stays in the cache; attention masks it). */
    int32_t sliding_window;          /* 0: none */
    const int32_t *swa_layers;       /* [n_layer], copied; may be null when sliding_window is 0 */
    const float *rope_inv_freq_swa;  /* head_dim/2, copied: the sliding layers' own RoPE frequencies;
                                      * null: rope_inv_freq */
    /* Layers without RoPE (SmolLM3's NoPE layers): q and k of layer l stay unrotated when nope_layers[l]
     * != 0. Null (as callers that predate it leave it) rotates every layer. */
    const int32_t *nope_layers;      /* [n_layer], copied; null: every layer rotates */
    /* Partial RoPE: only the first n_rot values of each q/k head rotate (pairs as rope_interleaved says,
     * within those n_rot); rope_inv_freq(_swa) then hold n_rot/2 values. 0: head_dim. Even, <= head_dim. */
    int32_t n_rot;
    float rope_mscale; /* RoPE's cos and sin are multiplied by this (LongRoPE's attention factor, as
                        * llama.cpp's rope attn_factor: the rotated values only); 0: 1 */
} tv_model_params;

typedef struct tv_model tv_model;
typedef struct tv_kv_cache tv_kv_cache;

/* One forward step over a batch of tokens from one or more sequences.
 * The KV of token i is written at position positions[i] of sequence seq_ids[i]; token i then
 * attends to positions 0..positions[i] of that sequence (causal). A sequence's position p lives
 * in physical block block_tables[seq * max_blocks + p / block_size], slot p % block_size.
 * Tokens of one sequence must come in increasing position order. */
typedef struct tv_batch {
    int32_t n_tokens;
    const int32_t *tokens;       /* [n_tokens] */
    const int32_t *positions;    /* [n_tokens] */
    const int32_t *seq_ids;      /* [n_tokens], each in [0, n_seqs) */
    int32_t n_seqs;
    int32_t max_blocks;          /* row length of block_tables */
    const int32_t *block_tables; /* [n_seqs * max_blocks] physical block ids */
    int32_t n_logits;
    const int32_t *logits_rows;  /* [n_logits] token indices whose logits are wanted */
} tv_batch;

/* Last error message of the calling thread ("" when none). */
const char *tv_last_error(void);
/* Library version string, e.g. "0.1.0". */
const char *tv_version(void);
/* Bytes one row of `cols` elements takes in `dtype`; 0 when dtype is unknown or cols does not
 * fit its block size. */
size_t tv_row_bytes(int32_t dtype, int64_t cols);
/* Name of the matmul kernel path in use ("scalar", "avx2", ...). */
const char *tv_kernel_path(void);
/* Switch every later call to path `name` ("scalar", "avx2", "avx512vnni", "avx512amx", "neon",
 * "neon_dotprod", "auto"); TV_ERR_INVALID when this build or CPU cannot run it. For tests and benchmarks: the
 * TINYVLLM_KERNEL environment variable does the same at start-up. */
int tv_select_kernel_path(const char *name);

/* Model: create, hand it every weight by GGUF name, then finalize. Weights are borrowed: the
 * caller keeps their memory alive (and unchanged) until tv_model_free.
 * Names: token_embd.weight, output_norm.weight, output.weight (optional: tied to token_embd),
 * blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,ffn_norm,ffn_gate,ffn_up,ffn_down}.weight,
 * blk.N.{attn_q,attn_k,attn_v}.bias (optional, all three or none). Norms and biases are F32. */
int tv_model_create(const tv_model_params *params, tv_model **out);
int tv_model_set_tensor(tv_model *model, const char *name, const tv_tensor *tensor);
int tv_model_finalize(tv_model *model);
void tv_model_free(tv_model *model);

/* KV cache: n_blocks blocks of block_size tokens for every layer, K and V, in kv_dtype
 * (TV_F16 or TV_F32). Bytes = 2 * n_layer * n_blocks * block_size * n_head_kv * head_dim * elt. */
int tv_kv_cache_create(const tv_model *model, int32_t n_blocks, int32_t block_size,
                       int32_t kv_dtype, tv_kv_cache **out);
size_t tv_kv_cache_bytes(const tv_kv_cache *cache);
/* Copy the contents of block src to block dst in every layer (copy-on-write). */
int tv_kv_cache_copy_block(tv_kv_cache *cache, int32_t src, int32_t dst);
void tv_kv_cache_free(tv_kv_cache *cache);

/* Run the batch; logits is [n_logits * n_vocab] floats, written row by row. */
int tv_model_forward(tv_model *model, tv_kv_cache *cache, const tv_batch *batch, float *logits);

/* Kernels, exposed for tests and benchmarks. y[m, n] = sum_k x[m, k] * W[n, k]. */
int tv_matmul(const tv_tensor *w, const float *x, int64_t m, float *y, int32_t n_threads);
/* Dequantize `rows` rows of w starting at row0 into out[rows * cols] floats. */
int tv_dequantize_rows(const tv_tensor *w, int64_t row0, int64_t rows, float *out);

/* ---- Attention, standalone (tests, benchmarks; tv_model_forward runs the same kernel) ----------
 * Tiled (flash-style, online softmax) causal attention over a paged KV cache: memory O(tokens),
 * no score matrix. GQA: query head h reads kv head h / (n_head / n_head_kv); scale 1/sqrt(head_dim).
 * Rows are [token][head][head_dim] f32. The paged calls take a tv_batch for the token layout:
 * positions, seq_ids, n_seqs, max_blocks, block_tables, with the same rules as tv_model_forward
 * (tokens, n_logits and logits_rows are ignored). */
/* A KV cache without a model (same layout and bytes as tv_kv_cache_create). */
int tv_kv_cache_create_raw(int32_t n_layer, int32_t n_head_kv, int32_t head_dim, int32_t n_blocks,
                           int32_t block_size, int32_t kv_dtype, tv_kv_cache **out);
/* Store k[i], v[i] ([n_tokens, n_head_kv * head_dim]) at the position of batch token i in `layer`. */
int tv_kv_cache_write(tv_kv_cache *cache, int32_t layer, const tv_batch *batch, const float *k, const float *v);
/* out[i] = attention of q[i] ([n_tokens, n_head * head_dim]) over positions 0..positions[i] of its
 * sequence, as the cache holds them (write them first, this batch's included). */
int tv_attention_paged(const tv_kv_cache *cache, int32_t layer, const tv_batch *batch, int32_t n_head,
                       const float *q, float *out, int32_t n_threads);
/* Contiguous K/V of one sequence: k, v [n_kv, n_head_kv * head_dim] at positions 0..n_kv-1; the n_q
 * queries (1 <= n_q <= n_kv) sit at the last n_q positions (n_q = n_kv: prefill, 1: decode). Copies
 * K/V into a temporary paged cache (kv_dtype TV_F16 or TV_F32, blocks of 16) and runs the kernel. */
int tv_attention(int32_t n_q, int32_t n_kv, int32_t n_head, int32_t n_head_kv, int32_t head_dim,
                 const float *q, const float *k, const float *v, int32_t kv_dtype, float *out, int32_t n_threads);

/* ---- Sampler (src/sampler.cpp) -------------------------------------------------------------
 * One token per row of float32 logits [rows][vocab] (row r at + r * row_stride), and lse[r], the
 * log-sum-exp of the row's raw logits (logprob of token t: raw[t] - lse). processed (NULL: raw) holds
 * the logits to draw from (penalties, masks applied; -inf = forbidden). temperature[r] == 0: greedy,
 * the lowest id among the maxima, nothing drawn. Otherwise weights exp((x - max) / T) (float32) are
 * filtered in vLLM's order: top_k[r] (on when 0 < top_k < the nonzero weights; ties with the k-th
 * kept), top_p[r] < 1 (on the top-k renormalized mass: the smallest prefix of the descending order,
 * ties by lower id, whose mass reaches top_p), min_p[r] > 0 (drops w < min_p * max w); the token is
 * the first survivor, in id order, whose cumulative weight exceeds u[r] * their total (u in [0, 1)).
 * weights (NULL: not wanted) [rows][vocab] receives each sampled row's filtered, unnormalized weights.
 * A row with a NaN or without a finite logit is an error. */
int tv_sample(const float *raw, const float *processed, int64_t rows, int64_t vocab, int64_t row_stride,
              const double *temperature, const int32_t *top_k, const double *top_p, const double *min_p,
              const double *u, int32_t *tokens, float *lse, double *weights);

/* ---- Paged-KV block manager (src/block_manager.cpp) ------------------------------------------
 * A pool of num_blocks blocks of block_size token slots with reference counts, and per-sequence
 * block tables (logical block -> physical block id), sequences named by caller-chosen int64 ids.
 * Prefix caching: a full block whose KV is computed (marked by an APPEND or FREE op) is cached
 * under its whole token prefix (a chained 64-bit hash, verified against the stored tokens and
 * the parent block's key, so hash collisions never share wrong KV). A block whose reference
 * count drops to 0 is free, or evictable while it holds a cached key: it can still be hit, and
 * is evicted (least recently freed first) only when no free block is left. num_free_blocks
 * counts both. Running out of blocks is not an error (see tv_block_manager_apply). */
typedef struct tv_block_manager tv_block_manager;

enum tv_block_manager_status {
    TV_NO_FREE_BLOCKS = 1  /* not enough free + evictable blocks; nothing changed */
};

typedef struct tv_prefix_cache_stats {
    int64_t queries;           /* successful ALLOCATE ops (with prefix caching on) */
    int64_t query_tokens;      /* their prompt tokens */
    int64_t hit_tokens;        /* of which served from the cache */
    int64_t query_blocks;      /* full blocks they looked up: (n_tokens - 1) / block_size each */
    int64_t hit_blocks;        /* of which found */
    int64_t cached_blocks;     /* blocks holding a cached key now (in use or evictable) */
    int64_t evictable_blocks;  /* cached blocks with no reference */
    int64_t evictions;         /* cached blocks taken for new data */
} tv_prefix_cache_stats;

int tv_block_manager_create(int32_t num_blocks, int32_t block_size, int32_t enable_prefix_caching,
                            tv_block_manager **out);
void tv_block_manager_free(tv_block_manager *bm);
/* These four return the value (>= 0) or a negative status. */
int tv_block_manager_num_blocks(const tv_block_manager *bm);
int tv_block_manager_block_size(const tv_block_manager *bm);
int tv_block_manager_num_free_blocks(const tv_block_manager *bm);
int tv_block_manager_num_seqs(const tv_block_manager *bm);
/* 1 when seq_id is allocated, 0 when not. */
int tv_block_manager_has_seq(const tv_block_manager *bm, int64_t seq_id);

/* Every change to sequences goes through tv_block_manager_apply, a list of ops run in order (the
 * engine sends one list per step). The manager keeps no token ids: the caller owns them and lends
 * `tokens` (the whole sequence, at least num_tokens of them) where an op reads them. */
enum tv_block_op_kind {
    /* New sequence seq_id with slots for its num_tokens >= 1 prompt tokens. Leading full blocks
     * found in the prefix cache are shared instead of allocated, at most (num_tokens - 1) /
     * block_size of them (the last token is always computed); their token count is written back to
     * num_computed, and the sequence starts with that many computed tokens. */
    TV_BLOCK_ALLOCATE = 0,
    /* Mark, then grow: the first num_computed tokens of seq_id have their KV written (never
     * decreases, at most its slot count; full blocks among them become prefix-cache entries, keyed
     * by their tokens), then it gets slots for num_tokens tokens in all (never fewer than now). If
     * new slots go into a partial last block shared with another sequence (after a fork), that
     * block is copied first: a (src, dst) pair is added to cow_pairs; copy the KV of block src to
     * dst (tv_kv_cache_copy_block) before running the new tokens. */
    TV_BLOCK_APPEND = 1,
    /* New sequence seq_id sharing every block of parent_id (slot and computed counts copied). */
    TV_BLOCK_FORK = 2,
    /* Mark num_computed as APPEND does, then drop seq_id's references (last block first, so its
     * tail is evicted first); seq_id is then unknown. */
    TV_BLOCK_FREE = 3,
    /* As ALLOCATE, but nothing is shared from the prefix cache (num_computed is written back as 0):
     * every prompt position runs, for a caller that wants logits at each one (prompt logprobs). Its
     * full blocks still become cache entries for later sequences once computed. */
    TV_BLOCK_ALLOCATE_UNCACHED = 4,
    /* Mark num_computed as APPEND does, then shrink seq_id to num_tokens slots (num_computed <=
     * num_tokens <= its slot count): speculative decoding gave slots to draft tokens that were
     * rejected. Blocks past the last kept slot are released (tail first); KV beyond num_computed
     * is never cached, so rejected tokens never enter the prefix cache. */
    TV_BLOCK_TRUNCATE = 5
};

typedef struct tv_block_op {
    int32_t kind;             /* tv_block_op_kind */
    int32_t num_tokens;       /* ALLOCATE(_UNCACHED), APPEND, TRUNCATE */
    int32_t num_computed;     /* APPEND, FREE, TRUNCATE; written by ALLOCATE */
    int32_t table_row;        /* ALLOCATE(_UNCACHED), APPEND: row of `tables` that gets the block table; -1: none */
    int64_t seq_id;
    int64_t parent_id;        /* FORK */
    const int32_t *tokens;    /* ALLOCATE(_UNCACHED): the prompt; APPEND, FREE, TRUNCATE: may be null when the mark
                               * completes no block (or prefix caching is off) */
} tv_block_op;

/* Runs ops[0..n_ops) in order. Block tables go to tables[table_row * max_blocks ...], each row
 * padded with 0 up to max_blocks. Copy-on-write pairs go to cow_pairs[2 * i], [2 * i + 1] for
 * i < *n_cow (cow_cap counts pairs; one APPEND adds at most one). *n_done gets how many ops ran:
 * TV_OK when all of them did, TV_NO_FREE_BLOCKS when op *n_done needs more blocks than are free or
 * evictable now (it got none; an APPEND's mark has taken effect, and sending it again is harmless):
 * free some sequence and send the rest again. An invalid op returns TV_ERR_INVALID after the ones
 * before it ran (*n_done says how many). */
int tv_block_manager_apply(tv_block_manager *bm, tv_block_op *ops, int32_t n_ops, int32_t *tables, int32_t max_blocks,
                           int32_t *cow_pairs, int32_t cow_cap, int32_t *n_cow, int32_t *n_done);
/* Any of the out pointers may be null. */
int tv_block_manager_seq_info(const tv_block_manager *bm, int64_t seq_id, int32_t *num_tokens,
                              int32_t *num_blocks, int32_t *num_computed_tokens);
/* Writes seq_id's block table to out[cap]; returns its length (cap must be at least that). */
int tv_block_manager_get_block_table(const tv_block_manager *bm, int64_t seq_id, int32_t *out, int32_t cap);
/* Per block (cap >= num_blocks): reference count, and 1 if it holds a cached key. Either may be null. */
int tv_block_manager_block_info(const tv_block_manager *bm, int32_t *ref_counts, int32_t *cached, int32_t cap);
int tv_block_manager_prefix_cache_stats(const tv_block_manager *bm, tv_prefix_cache_stats *out);
/* Tests: keep only the low `bits` (1..64) bits of block hashes, to force collisions. Only while
 * the prefix cache is empty. */
int tv_block_manager_set_hash_bits(tv_block_manager *bm, int32_t bits);
/* Tests: recount all state from scratch; TV_ERR_INTERNAL with the broken rule if inconsistent. */
int tv_block_manager_check(const tv_block_manager *bm);

#ifdef __cplusplus
}
#endif

#if defined(__GNUC__)
#pragma GCC visibility pop
#endif

#endif /* TINYVLLM_H */
