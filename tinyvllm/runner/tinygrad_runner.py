"""Runs the model on tinygrad: CUDA on a Jetson, METAL on a Mac, its CPU (clang) device here.

Same interface as NativeModelRunner. Design, in one place:
  * Weights go to the device as stored: GGUF blocks stay raw uint8 [rows, row_bytes] and are
    dequantized inside the graph (tinygrad fuses the unpacking into the matmul's loads), so a Q4_1
    model costs its file size in device memory. F16/F32 weights are uploaded in the compute dtype.
  * Paged KV cache: one pool per layer and per K/V, [(num_blocks + 1) * block_size, kv_heads * head_dim]
    (the extra block takes the padding tokens' writes). A token's K/V land at
    slot = table[pos // bs] * bs + pos % bs. tinygrad has no scatter, so small steps (decode) store
    each token's row at a bound-variable offset (one tiny kernel per token), and big steps (prefill
    chunks) rewrite the pool with a select: the host inverts the slot mapping (slot -> token, or -1).
  * Attention gathers each token's blocks through its sequence's block table and masks keys past
    the token's position, so any mix of prefill chunks and decodes runs as one batch.
  * Every step is a TinyJit call, bucketed by (tokens, blocks per sequence, logits rows) rounded up
    to powers of two; everything that changes between steps (token ids, RoPE angles, tables,
    positions, rows, slots) is an input tensor or a bound variable, so a bucket compiles once and
    is replayed after.
"""
import math

import numpy as np

from ..model.weights import F16, F32, Q4_0, Q4_1, Q8_0, QUANT_BLOCKS
from .kv_cache import canonical_kv_dtype, kv_bytes_per_block
from .native_runner import NativeModelRunner

GRAPH_QUANT = (Q4_0, Q4_1, Q8_0)  # GGUF blocks the graph unpacks itself

INSTALL_HINT = ("device='tinygrad' needs tinygrad: `pip install tinyvllm[gpu]` (Python >= 3.11); "
                "its CPU device also needs clang on PATH (e.g. `apt-get install -y clang`)")
MAX_TOKEN_WRITES = 16  # steps up to this many tokens store K/V row by row; bigger ones rewrite the pool
# The graph below is the LLaMA block (+ Qwen2 biases). qwen3's q/k norms and gemma3's block (post norms,
# GELU, scales, sliding-window masks with their own RoPE) run on the native core (device="cpu") only.
SUPPORTED_ARCHS = ("llama", "qwen2")


def check_supported(cfg) -> None:
    if cfg.arch not in SUPPORTED_ARCHS:
        raise NotImplementedError(f"device='tinygrad' runs {', '.join(SUPPORTED_ARCHS)} models; {cfg.arch!r} "
                                  "runs on device='cpu' (the native core)")
    if cfg.sliding_window:
        raise NotImplementedError(f"device='tinygrad' has no sliding-window attention (this model's window is "
                                  f"{cfg.sliding_window}); it runs on device='cpu' (the native core)")
    if cfg.rope_dim != cfg.head_dim:
        raise NotImplementedError(f"device='tinygrad' has no partial RoPE (this model rotates {cfg.rope_dim} of "
                                  f"{cfg.head_dim} values per head); it runs on device='cpu' (the native core)")


def import_tinygrad():
    """tinygrad's module, or an ImportError that says how to get it (it is an optional extra)."""
    try:
        import tinygrad
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    return tinygrad


def bucket(n: int) -> int:
    """Round up to a power of two: the shapes the JIT captures a graph for."""
    return 1 << max(0, int(n) - 1).bit_length()


class TinygradModelRunner:
    def __init__(self, weights, num_blocks: int, block_size: int = 16, kv_dtype: str = "float16",
                 threads: int | None = None, device: str | None = None,
                 min_tokens: int = 1, min_rows: int = 1, min_blocks: int = 8):
        check_supported(weights.config)  # before tinygrad or any device is touched
        import_tinygrad()
        from tinygrad import Device, Tensor, TinyJit, UOp, dtypes
        self.Tensor, self.TinyJit, self.UOp, self.dtypes = Tensor, TinyJit, UOp, dtypes
        kv_dtype = canonical_kv_dtype(kv_dtype)
        try:  # DEV=CUDA / DEV=METAL / DEV=CPU (tinygrad's own convention) picks Device.DEFAULT
            self.device = Device.canonicalize(device or Device.DEFAULT)
            Device[self.device]
        except Exception as e:
            raise RuntimeError(f"tinygrad could not open device {device or 'default'!r}: {e}. {INSTALL_HINT}") from e
        cfg = self.config = weights.config
        self.block_size, self.num_blocks = block_size, num_blocks
        # smallest buckets: every bucket costs a capture (seconds of tracing and compiling), so a
        # caller that prefers fewer graphs over less padding raises these
        self.min_tokens, self.min_rows, self.min_blocks = min_tokens, min_rows, min_blocks
        self.threads = threads  # unused: tinygrad's devices schedule their own work; kept for the interface
        # fp16 math where the device does it well; the CPU device gets fp32 (clang's half is emulated)
        self.cdtype = dtypes.float32 if self.device.startswith("CPU") else dtypes.float16
        self.kv_dtype = getattr(dtypes, kv_dtype)
        self.inv_freq = cfg.rope_inv_freq().astype(np.float64)
        self.w = {name: self._upload(t) for name, t in weights.tensors.items()}
        self.lm_head = "output.weight" if "output.weight" in self.w else "token_embd.weight"
        self.trash_slot = num_blocks * block_size  # first slot of the extra block
        slots, kvd = (num_blocks + 1) * block_size, cfg.num_kv_heads * cfg.head_dim
        self.k_pool = [Tensor.zeros(slots, kvd, dtype=self.kv_dtype, device=self.device).contiguous().realize()
                       for _ in range(cfg.num_layers)]
        self.v_pool = [Tensor.zeros(slots, kvd, dtype=self.kv_dtype, device=self.device).contiguous().realize()
                       for _ in range(cfg.num_layers)]
        self.jits = {}  # (tokens, blocks, rows) bucket -> TinyJit of _step
        self._copy_jit = TinyJit(self._copy_step)

    kv_bytes_per_block = staticmethod(kv_bytes_per_block)
    extra_kv_blocks = 1  # the write-only block that padded token slots write into

    @staticmethod
    def workspace_bytes(cfg, max_num_batched_tokens: int, max_num_seqs: int, threads: int | None = None) -> int:
        """As the native runner's, at the padded (power-of-two) shapes the JIT runs."""
        return NativeModelRunner.workspace_bytes(cfg, bucket(max_num_batched_tokens), bucket(max_num_seqs))

    @property
    def kv_cache_bytes(self) -> int:
        return sum(p.nbytes() for p in self.k_pool + self.v_pool)

    @property
    def kernel_path(self) -> str:
        return f"tinygrad {self.device}"  # tinygrad generates its kernels for the device

    # ---- weights ----------------------------------------------------------------------------
    def _upload(self, t):
        """(dtype, device tensor): Q4_0/Q4_1/Q8_0 as their raw GGUF blocks (unpacked inside the graph),
        float weights in the compute dtype. Every other GGUF format (K-quants, Q5_0/Q5_1, IQ4_NL) is
        dequantized once here by the gguf package and kept in the compute dtype: correct everywhere,
        but 2-4x the device memory of the stored blocks."""
        if t.dtype in GRAPH_QUANT:
            data = self.Tensor(np.ascontiguousarray(t.data), device=self.device).realize()
        elif t.dtype in (F32, F16) or t.dtype in QUANT_BLOCKS:
            floats = t.data.astype(np.float32) if t.dtype in (F32, F16) else t.dequantize()
            data = self.Tensor(floats, device=self.device).cast(self.cdtype).realize()
            return F32, t.shape[-1], data
        else:
            raise ValueError(f"tensor {t.name}: dtype {t.dtype} is not supported by the tinygrad runner")
        return t.dtype, t.shape[-1], data

    def _dequant(self, dtype: int, cols: int, raw):
        """[..., row_bytes] raw GGUF rows -> [..., cols] in the compute dtype, as tinygrad ops."""
        if dtype not in GRAPH_QUANT:
            return raw
        bs, bb = QUANT_BLOCKS[dtype]
        blocks = raw.reshape(*raw.shape[:-1], cols // bs, bb)
        half = lambda i: (blocks[..., i].cast(self.dtypes.uint16) | (blocks[..., i + 1].cast(self.dtypes.uint16) << 8)) \
            .bitcast(self.dtypes.float16).cast(self.cdtype).unsqueeze(-1)
        if dtype == Q8_0:
            q = blocks[..., 2:].bitcast(self.dtypes.int8).cast(self.cdtype)
            w = q * half(0)
        else:  # 16 bytes of nibbles: low nibbles are values 0..15 of the block, high nibbles 16..31
            qs = blocks[..., bb - 16:]
            q = (qs & 15).cat(qs >> 4, dim=-1).cast(self.cdtype)
            w = (q - 8) * half(0) if dtype == Q4_0 else q * half(0) + half(2)
        return w.reshape(*raw.shape[:-1], cols)

    def _linear(self, x, name: str):
        dtype, cols, data = self.w[name + ".weight"]
        y = x @ self._dequant(dtype, cols, data).T
        return y + self.w[name + ".bias"][2] if name + ".bias" in self.w else y

    def _norm(self, x, name: str):
        x32 = x.cast(self.dtypes.float32)
        y = x32 * (x32.square().mean(axis=-1, keepdim=True) + self.config.rms_norm_eps).rsqrt()
        return (y * self.w[name][2].cast(self.dtypes.float32)).cast(self.cdtype)

    def _rope(self, x, cos, sin):
        """x [T, heads, head_dim]; cos/sin [T, 1, head_dim/2]. Rotates (x0, x1) by the angle."""
        T, h, d = x.shape
        if self.config.rope_interleaved:  # GGUF llama: pairs (x[2i], x[2i+1])
            x = x.reshape(T, h, d // 2, 2)
            x0, x1 = x[..., 0], x[..., 1]
            return (x0 * cos - x1 * sin).unsqueeze(-1).cat((x0 * sin + x1 * cos).unsqueeze(-1), dim=-1).reshape(T, h, d)
        x0, x1 = x[..., :d // 2], x[..., d // 2:]  # HF / NeoX: halves (x[i], x[i + d/2])
        return (x0 * cos - x1 * sin).cat(x0 * sin + x1 * cos, dim=-1)

    # ---- the step (traced once per bucket, then replayed by the JIT) --------------------------
    def _write_kv(self, pool, new, write):
        """write: the slots as bound variables (a few tokens), or the slot -> token map (many)."""
        new = new.reshape(-1, pool.shape[1]).cast(self.kv_dtype)
        if isinstance(write[0], self.Tensor):  # one select over the whole pool
            src = write[0]
            pool.assign((src >= 0).unsqueeze(1).where(new[src.maximum(0)], pool))
        else:  # store each token's row at its slot: tiny kernels, and no recompiles as slots change
            for i, slot in enumerate(write):
                pool[slot:slot + 1].assign(new[i:i + 1])

    def _step(self, tokens, cos, sin, tables, positions, rows, *write):
        cfg, T = self.config, tokens.shape[0]
        H, KVH, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        keys = tables.shape[1] * self.block_size
        dtype, cols, embd = self.w["token_embd.weight"]
        x = self._dequant(dtype, cols, embd[tokens]).cast(self.cdtype)
        cos, sin = cos.cast(self.cdtype).unsqueeze(1), sin.cast(self.cdtype).unsqueeze(1)
        # a token sees keys 0..its own position of its own sequence (padding tokens see key 0)
        visible = (self.Tensor.arange(keys).to(self.device).unsqueeze(0) <= positions.unsqueeze(1)).reshape(T, 1, 1, keys)
        for l in range(cfg.num_layers):
            p = f"blk.{l}."
            h = self._norm(x, p + "attn_norm.weight")
            q = self._rope(self._linear(h, p + "attn_q").reshape(T, H, hd), cos, sin)
            k = self._rope(self._linear(h, p + "attn_k").reshape(T, KVH, hd), cos, sin)
            v = self._linear(h, p + "attn_v")
            # write this step's K/V into their slots first, so a chunk's tokens see each other
            self._write_kv(self.k_pool[l], k, write)
            self._write_kv(self.v_pool[l], v, write)
            K, V = ((pool.reshape(self.num_blocks + 1, self.block_size * KVH * hd)[tables])
                    .reshape(T, keys, KVH, hd).permute(0, 2, 1, 3).cast(self.cdtype)  # [T, KVH, keys, hd]
                    for pool in (self.k_pool[l], self.v_pool[l]))
            q = q.reshape(T, KVH, H // KVH, hd)  # grouped-query: G query heads share one KV head
            scores = (q @ K.transpose(-1, -2)).cast(self.dtypes.float32) * (1.0 / math.sqrt(hd))
            probs = visible.where(scores, -math.inf).softmax(-1).cast(self.cdtype)
            x = x + self._linear((probs @ V).reshape(T, H * hd), p + "attn_output")
            h = self._norm(x, p + "ffn_norm.weight")
            x = x + self._linear(self._linear(h, p + "ffn_gate").silu() * self._linear(h, p + "ffn_up"), p + "ffn_down")
        out = self._norm(x[rows], "output_norm.weight")
        dtype, cols, w = self.w[self.lm_head]
        return (out @ self._dequant(dtype, cols, w).T).cast(self.dtypes.float32).realize()

    def _copy_step(self, src, dst):
        """Copy-on-write: block src -> block dst in every pool (a gather over the block axis)."""
        blocks = self.Tensor.arange(self.num_blocks + 1).to(self.device)
        which = (blocks == dst).where(src, blocks)
        for pool in self.k_pool + self.v_pool:
            view = pool.reshape(self.num_blocks + 1, -1)
            pool.assign(view[which].reshape(pool.shape))
        self.Tensor.realize(*(self.k_pool + self.v_pool))

    def copy_block(self, src: int, dst: int) -> None:
        for b in (src, dst):
            if not 0 <= b < self.num_blocks:
                raise ValueError(f"block {b} out of range [0, {self.num_blocks})")
        self._copy_jit(*(self.Tensor([b], dtype=self.dtypes.int32, device=self.device) for b in (src, dst)))

    # ---- host side: validate, pad to the bucket, run -------------------------------------------
    def forward(self, tokens, positions, seq_ids, block_tables, logits_rows) -> np.ndarray:
        """One step. block_tables is [n_seqs, max_blocks] int32; returns [len(logits_rows), vocab] float32."""
        tok, pos, sid, rows = (np.asarray(a, dtype=np.int64).reshape(-1) for a in (tokens, positions, seq_ids, logits_rows))
        tables = np.asarray(block_tables, dtype=np.int64)
        self._validate(tok, pos, sid, tables, rows)
        T, bs = len(tok), self.block_size
        Tb, MBb, Rb = key = self.bucket_key(T, len(rows), int(pos.max()))
        tok_tables = np.zeros((Tb, MBb), dtype=np.int32)  # each token's own sequence's table
        tok_tables[:T, :min(MBb, tables.shape[1])] = tables[sid, :MBb]
        angles = np.zeros((Tb, len(self.inv_freq)))
        angles[:T] = pos[:, None] * self.inv_freq[None, :]
        slots = tables[sid, pos // bs] * bs + pos % bs
        pad = lambda a, n: np.concatenate([a, np.zeros(n - len(a), dtype=a.dtype)]).astype(np.int32)
        args = [self.Tensor(a, device=self.device) for a in (
            pad(tok, Tb), np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32), tok_tables,
            pad(pos, Tb), pad(rows, Rb))]
        if Tb <= MAX_TOKEN_WRITES:  # padding tokens write into the extra block
            slots = np.concatenate([slots, np.full(Tb - T, self.trash_slot)])
            args += [self.UOp.variable(f"slot{i}", 0, self.trash_slot).bind(int(s)) for i, s in enumerate(slots)]
        else:
            src = np.full((self.num_blocks + 1) * bs, -1, dtype=np.int32)  # slot -> token writing it
            src[slots] = np.arange(T)
            args.append(self.Tensor(src, device=self.device))
        if key not in self.jits:
            self.jits[key] = self.TinyJit(self._step)
            # skip TinyJit's eager first call: our weights and pools are already realized, so the
            # first call can capture directly (each extra trace costs seconds of scheduling)
            self.jits[key].cnt = 1
        return self.jits[key](*args).numpy()[:len(rows)]

    def bucket_key(self, n_tokens: int, n_rows: int, max_pos: int) -> tuple[int, int, int]:
        """(tokens, blocks per sequence, logits rows) of the graph a step runs in."""
        blocks = min(bucket(max(self.min_blocks, max_pos // self.block_size + 1)), self.num_blocks)
        return bucket(max(self.min_tokens, n_tokens)), blocks, bucket(max(self.min_rows, n_rows))

    def _validate(self, tok, pos, sid, tables, rows):
        n = len(tok)
        if n == 0:
            raise ValueError("forward needs at least one token")
        if len(pos) != n or len(sid) != n:
            raise ValueError("tokens, positions and seq_ids must have the same length")
        if tables.ndim != 2 or tables.shape[0] == 0 or tables.shape[1] == 0:
            raise ValueError("block_tables must be 2-D [n_seqs, max_blocks]")
        if tok.min() < 0 or tok.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        if pos.min() < 0:
            raise ValueError("positions must be >= 0")
        if sid.min() < 0 or sid.max() >= tables.shape[0]:
            raise ValueError(f"seq_ids must be in [0, {tables.shape[0]})")
        if (pos // self.block_size).max() >= tables.shape[1]:
            raise ValueError("a position needs a block past the end of its block table")
        for s in np.unique(sid):
            p = pos[sid == s]
            if np.any(np.diff(p) <= 0):
                raise ValueError(f"positions of sequence {s} must increase within a batch")
            used = tables[s, :p.max() // self.block_size + 1]
            if used.min() < 0 or used.max() >= self.num_blocks:
                raise ValueError(f"block_tables[{s}] holds a block outside [0, {self.num_blocks})")
        if len(rows) and (rows.min() < 0 or rows.max() >= n):
            raise ValueError(f"logits_rows must be in [0, {n})")


__all__ = ["TinygradModelRunner", "import_tinygrad", "INSTALL_HINT", "bucket"]
