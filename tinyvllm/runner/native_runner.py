"""Runs the model on the native C++ core: hands it the (still quantized) weights and batches."""
import os
import time

import numpy as np

from .._native import NativeError, check, ffi, lib, ptr
from .kv_cache import canonical_kv_dtype, kv_bytes_per_block

_KV_DTYPE_CODES = {"float16": 1, "float32": 0}  # the native tv_kv_cache_create codes


def _amx_scratch_bytes(cfg, max_tokens: int, threads: int) -> int:
    """kernels_amx.cpp keeps thread-local scratch that grows to its largest use: the calling thread's
    activation tiles (2 bytes per value and 2 floats per 32 values, rows rounded up to a tile of 16) and,
    per thread, one buffer of 64 unpacked weight rows that every format shares (2 bytes per weight with
    per-half scales, 3 floats per 16-row slice). Zero where that path does not run."""
    if ffi.string(lib.tv_kernel_path()).decode() != "avx512amx":
        return 0
    k = max(cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim)
    return -(-max_tokens // 16) * 16 * k * 9 // 4 + threads * 64 * k * 19 // 8


def _matmul_scratch_bytes(threads: int) -> int:
    """The model's thread pool keeps one buffer per thread for the decode-sized matmuls' tasks (a task
    computes into it, then copies out: native/src/matmul.h DUP_ITEM_FLOATS = 4096 floats, reserved
    when the model is made and never grown by its matmuls: native test threadpool_matmul_scratch_stays_reserved)."""
    return threads * 4096 * 4


def default_threads() -> int:
    """Physical cores where we can tell (SMT siblings share the FMA units), else online CPUs."""
    try:
        cores = {line.split(":")[1].strip() for line in open("/proc/cpuinfo") if line.startswith("core id")}
        cpus = {line for line in open("/proc/cpuinfo") if line.startswith("physical id")}
        if cores and len(cpus) <= 1:
            return max(1, min(len(cores), len(os.sched_getaffinity(0))))
    except (OSError, AttributeError, IndexError):
        pass
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class NativeModelRunner:
    """Owns a native tv_model (borrowing the numpy weight arrays) and its paged KV cache.

    What every runner tells the engine before it is built, so that the memory budget pays for what
    the runner really allocates: kv_bytes_per_block, extra_kv_blocks (blocks it allocates beyond the
    usable ones) and workspace_bytes (the scratch one step needs at the engine's batch limits)."""

    kv_bytes_per_block = staticmethod(kv_bytes_per_block)
    extra_kv_blocks = 0

    def __init__(self, weights, num_blocks: int, block_size: int = 16, kv_dtype: str = "float16",
                 threads: int | None = None):
        cfg = weights.config
        self.config, self.block_size, self.num_blocks = cfg, block_size, num_blocks
        self.threads = threads or default_threads()
        self._inv_freq = np.ascontiguousarray(cfg.rope_inv_freq(), dtype=np.float32)
        fields = dict(
            n_vocab=cfg.vocab_size, n_embd=cfg.hidden_size, n_ff=cfg.intermediate_size,
            n_layer=cfg.num_layers, n_head=cfg.num_heads, n_head_kv=cfg.num_kv_heads,
            head_dim=cfg.head_dim, rms_eps=cfg.rms_norm_eps, rope_interleaved=int(cfg.rope_interleaved),
            rope_inv_freq=ptr(self._inv_freq), n_threads=self.threads,
            qk_norm=int(cfg.qk_norm), post_norms=int(cfg.post_norms), ffn_act=int(cfg.ffn_act == "gelu_tanh"),
            embd_scale=0.0 if cfg.embed_scale == 1.0 else cfg.embed_scale, attn_scale=cfg.attn_scale or 0.0,
            final_logit_softcap=cfg.final_logit_softcap)
        if cfg.sliding_window:  # the native side copies both arrays at create
            self._swa = np.ascontiguousarray(cfg.swa_layers, dtype=np.int32)
            self._inv_freq_swa = np.ascontiguousarray(cfg.rope_inv_freq_swa(), dtype=np.float32)
            fields.update(sliding_window=cfg.sliding_window, swa_layers=ptr(self._swa, "int32_t *"),
                          rope_inv_freq_swa=ptr(self._inv_freq_swa))
        fields.update(n_rot=cfg.rope_dim, rope_mscale=cfg.rope_mscale)
        if cfg.nope_layers:  # copied at create, like the two above
            self._nope = np.ascontiguousarray(cfg.nope_layers, dtype=np.int32)
            fields.update(nope_layers=ptr(self._nope, "int32_t *"))
        params = ffi.new("tv_model_params *", fields)
        out = ffi.new("tv_model **")
        check(lib.tv_model_create(params, out))
        # The native side borrows these arrays: they live until the model is freed (the free waits for
        # a thread-pool worker that may still read weights after the last forward returned).
        self._keep = keep = []
        self._model = ffi.gc(out[0], lambda m: (lib.tv_model_free(m), keep.clear()))
        for name, t in weights.tensors.items():
            data = np.ascontiguousarray(t.data)
            if data.ctypes.data % 16:  # a file with a small general.alignment: the core reads floats and block
                data = data.copy()    # scales at their natural alignment (misaligned loads are UB; found by UBSan)
            self._keep.append(data)
            rows, cols = (1, t.shape[0]) if len(t.shape) == 1 else t.shape
            desc = ffi.new("tv_tensor *", dict(dtype=t.dtype, rows=rows, cols=cols,
                                                data=ffi.cast("void *", data.ctypes.data), nbytes=data.nbytes))
            check(lib.tv_model_set_tensor(self._model, name.encode(), desc))
        check(lib.tv_model_finalize(self._model))
        code = _KV_DTYPE_CODES[canonical_kv_dtype(kv_dtype)]
        cache = ffi.new("tv_kv_cache **")
        check(lib.tv_kv_cache_create(self._model, num_blocks, block_size, code, cache))
        self._cache = ffi.gc(cache[0], lib.tv_kv_cache_free)
        self.last_forward_s = 0.0  # wall time of the last native forward call (benchmarks: Python overhead)

    @staticmethod
    def workspace_bytes(cfg, max_num_batched_tokens: int, max_num_seqs: int, threads: int | None = None) -> int:
        """The native activation scratch of one step (its buffers grow to this), the logits rows and
        the sampler's copies of them, the thread pool's per-thread matmul task buffers, and the AMX
        path's scratch where it runs."""
        q_kv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        rope = cfg.head_dim if getattr(cfg, "sliding_window", 0) else 0  # the sliding layers' own RoPE cos + sin
        per_token = 4 * (4 * cfg.hidden_size + 3 * cfg.intermediate_size + q_kv + 2 * cfg.num_heads * cfg.head_dim
                         + rope)
        # logits rows scale with the vocabulary (262,144 for Gemma 3: 1 MiB per sequence per copy): a step's
        # logits (one row per sampled sequence, plus up to max_num_seqs prompt positions scored for prompt
        # logprobs), the sampled rows gathered out of them, and the sampler's scratch
        return (max_num_batched_tokens * per_token + 4 * max_num_seqs * cfg.vocab_size * 4
                + _matmul_scratch_bytes(threads or default_threads())
                + _amx_scratch_bytes(cfg, max_num_batched_tokens, threads or default_threads()))

    @property
    def kv_cache_bytes(self) -> int:
        return lib.tv_kv_cache_bytes(self._cache)

    @property
    def kernel_path(self) -> str:
        """The matmul kernels in use ("avx512vnni", "neon_dotprod", "scalar", ...)."""
        return ffi.string(lib.tv_kernel_path()).decode()

    def copy_block(self, src: int, dst: int) -> None:
        check(lib.tv_kv_cache_copy_block(self._cache, src, dst))

    def forward(self, tokens, positions, seq_ids, block_tables, logits_rows) -> np.ndarray:
        """One step. block_tables is [n_seqs, max_blocks] int32; returns [len(logits_rows), vocab] float32."""
        arrays = [np.ascontiguousarray(a, dtype=np.int32) for a in (tokens, positions, seq_ids, logits_rows)]
        tables = np.ascontiguousarray(block_tables, dtype=np.int32)
        if tables.ndim != 2:
            raise ValueError("block_tables must be 2-D [n_seqs, max_blocks]")
        tok, pos, sid, rows = arrays
        logits = np.empty((len(rows), self.config.vocab_size), dtype=np.float32)
        batch = ffi.new("tv_batch *", dict(
            n_tokens=len(tok), tokens=ptr(tok, "int32_t *"), positions=ptr(pos, "int32_t *"),
            seq_ids=ptr(sid, "int32_t *"), n_seqs=tables.shape[0], max_blocks=tables.shape[1],
            block_tables=ptr(tables, "int32_t *"), n_logits=len(rows), logits_rows=ptr(rows, "int32_t *")))
        t = time.perf_counter()
        rc = lib.tv_model_forward(self._model, self._cache, batch, ptr(logits))
        self.last_forward_s = time.perf_counter() - t
        check(rc)
        return logits


__all__ = ["NativeModelRunner", "NativeError", "default_threads"]
