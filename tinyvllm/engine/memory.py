"""Memory planning: how many KV blocks fit in a budget that also pays for weights and workspace."""
import ctypes
import mmap
import re

import numpy as np

_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(value) -> int:
    """512 / "512MB" / "1.5GiB" -> bytes (MB is 10^6, MiB is 2^20)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read {value!r} as a size in bytes (try 512MB or 1GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


# Measured on the reference model: Python objects of running requests and sampler copies grow the heap by
# ~4 MiB over a long run, and code pages of the native core and tokenizer fault in on first use (~2 MiB).
RUNTIME_RESERVE_BYTES = 8 * 2**20


def rss_bytes() -> int:
    """Resident memory of this process (heap and touched file pages): 0 where /proc is missing.
    glibc keeps freed heap pages; malloc_trim hands them back first so the reading is what is live."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def heap_weight_bytes(tensors) -> int:
    """Bytes of weight arrays that live on the heap (copies, quantized at load); the rest map the file."""
    def on_file(a):
        while isinstance(a, np.ndarray):
            a = a.base
        return isinstance(a, mmap.mmap)
    return sum(t.data.nbytes for t in tensors if not on_file(t.data))


def plan_kv_blocks(*, weight_bytes: int, block_bytes: int, workspace: int, memory_budget=None,
                   kv_cache_bytes=None, default_kv_bytes: int, extra_blocks: int = 0, structured_bytes: int = 0) -> int:
    """Number of usable KV blocks: from kv_cache_bytes if given, else what the budget leaves after weights,
    workspace and structured_bytes (what structured outputs will add: llguidance's tokenizer, built on the
    first constrained request), else a default; the extra_blocks a runner allocates beyond them are paid
    from the same bytes. Refuses budgets that cannot hold the weights."""
    if kv_cache_bytes is not None:
        kv = parse_bytes(kv_cache_bytes)
    elif memory_budget is not None:
        budget = parse_bytes(memory_budget)
        fixed = weight_bytes + workspace + structured_bytes
        if budget <= fixed:
            structured = (f", structured outputs (llguidance's tokenizer) {structured_bytes / 2**20:.1f} MiB "
                          "(without enable_structured_outputs=True they are not reserved)" if structured_bytes else "")
            raise ValueError(f"memory_budget {budget / 2**20:.1f} MiB is too small: the weights take "
                             f"{weight_bytes / 2**20:.1f} MiB, the step workspace and what loading keeps (metadata, "
                             f"tokenizer) {workspace / 2**20:.1f} MiB{structured}, before any KV cache")
        kv = budget - fixed
    else:
        kv = default_kv_bytes
    blocks = kv // block_bytes - extra_blocks
    if blocks < 1:
        raise ValueError(f"KV cache of {kv} bytes holds no block of {block_bytes} bytes")
    return int(blocks)
