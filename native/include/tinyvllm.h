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
    TV_Q8_0 = 8    /* 32-element blocks: f16 d, 32 int8; x = q * d                        */
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

#ifdef __cplusplus
}
#endif

#endif /* TINYVLLM_H */
