"""The KV cache's element types and size rule, shared by every runner."""

KV_DTYPES = {"float16": "float16", "fp16": "float16", "float32": "float32", "fp32": "float32"}  # name -> canonical
KV_DTYPE_BYTES = {"float16": 2, "float32": 4}


def canonical_kv_dtype(name: str) -> str:
    if name not in KV_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {sorted(KV_DTYPES)}, got {name!r}")
    return KV_DTYPES[name]


def kv_bytes_per_block(cfg, block_size: int, kv_dtype: str = "float16") -> int:
    """K and V of every layer for block_size tokens."""
    elt = KV_DTYPE_BYTES[canonical_kv_dtype(kv_dtype)]
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elt
