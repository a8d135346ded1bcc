"""Every weight format x every kernel path against the golden reference: the `gguf` package's own
dequantize (independent of our code) times a float64 dot.

Random block bytes are valid bits in every format; only the f16 scale fields are set to sane values.
The native matmul quantizes activations to int16 per 32 values (native/src/quant.h), so the tight
check uses exactly those activation values (reproduced here in numpy); a looser one bounds the
distance to the float activations."""
import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from tinyvllm._native import check, ffi, lib, ptr

# dtype: (values per block, bytes per block, f16 d offset, f16 min offset or None, d size, min size)
# Offsets from the GGML block definitions; sizes keep weights O(0.1).
FORMATS = {
    Q.Q4_0: (32, 18, 0, None, 0.02, 0), Q.Q4_1: (32, 20, 0, 2, 0.02, 0.1),
    Q.Q5_0: (32, 22, 0, None, 0.01, 0), Q.Q5_1: (32, 24, 0, 2, 0.01, 0.1),
    Q.Q8_0: (32, 34, 0, None, 0.001, 0), Q.IQ4_NL: (32, 18, 0, None, 0.001, 0),
    Q.Q2_K: (256, 84, 80, 82, 0.004, 0.005), Q.Q3_K: (256, 110, 108, None, 0.001, 0),
    Q.Q4_K: (256, 144, 0, 2, 0.0004, 0.002), Q.Q5_K: (256, 176, 0, 2, 0.0002, 0.002),
    Q.Q6_K: (256, 210, 208, None, 0.00005, 0),
}
PATHS = ("scalar", "avx2", "avx512vnni", "avx512amx", "neon", "neon_dotprod")


def random_blocks(qtype, rows, cols, rng):
    bv, bb, d_at, m_at, d_size, m_size = FORMATS[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // bv, bb), dtype=np.uint8)
    d = (rng.uniform(0.2, 1.0, len(blocks)) * d_size * rng.choice([-1, 1], len(blocks))).astype(np.float16)
    blocks[:, d_at:d_at + 2] = d.view(np.uint8).reshape(-1, 2)
    if m_at is not None:
        m = (rng.uniform(0, 1, len(blocks)) * m_size).astype(np.float16)
        blocks[:, m_at:m_at + 2] = m.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def tensor(qtype, data, cols):
    return ffi.new("tv_tensor *", dict(dtype=int(qtype), rows=data.shape[0], cols=cols,
                                        data=ffi.cast("void *", data.ctypes.data), nbytes=data.nbytes))


def quantize_acts(x):
    """native quantize_row_act in numpy float32: per 32 values d = amax / 32767, q = round-half-even(x / d)."""
    xb = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    d = (amax / np.float32(32767)).astype(np.float32)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    q = np.clip(np.rint(xb * inv), -32767, 32767)
    return (q * d).reshape(x.shape).astype(np.float64)


def runnable_paths():
    restore = ffi.string(lib.tv_kernel_path()).decode()
    found = [p for p in PATHS if lib.tv_select_kernel_path(p.encode()) == 0]
    check(lib.tv_select_kernel_path(restore.encode()))
    return found


def test_expected_kernel_paths_run():
    """CI names the paths its machine must exercise (TINYVLLM_EXPECT_KERNELS): a host that silently
    lacks one fails here instead of passing green on fewer paths."""
    expected = [p for p in os.environ.get("TINYVLLM_EXPECT_KERNELS", "scalar").split(",") if p]
    assert set(expected) <= set(runnable_paths()), (expected, runnable_paths())


@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda q: q.name)
def test_dequantize_matches_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    rows, cols = 7, FORMATS[qtype][0] * 3
    data = random_blocks(qtype, rows, cols, rng)
    golden = dequantize(data, qtype).astype(np.float32)
    out = np.empty((rows, cols), np.float32)
    check(lib.tv_dequantize_rows(tensor(qtype, data, cols), 0, rows, ptr(out)))
    np.testing.assert_allclose(out, golden, rtol=2e-7, atol=1e-12)


@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda q: q.name)
def test_matmul_every_path_matches_gguf(qtype):
    rng = np.random.default_rng(100 + int(qtype))
    bv = FORMATS[qtype][0]
    restore = ffi.string(lib.tv_kernel_path()).decode()
    paths = runnable_paths()
    # ragged shapes: 1-3 rows (decode), 4-20 (panels, partial tiles), odd weight-row counts; 64+ rows: the
    # AMX tile path (kernels_amx.cpp's AMX_MIN), m = 64 with 300 rows: chunks longer than one AMX unpack
    for m, n, nblk in ((1, 1, 1), (1, 37, 3), (2, 9, 2), (3, 17, 5), (4, 300, 2), (5, 23, 2), (8, 8, 1), (13, 19, 4),
                       (20, 41, 3), (64, 300, 2), (71, 23, 3)):
        k = nblk * max(bv, 64)
        w = random_blocks(qtype, n, k, rng)
        wd = dequantize(w, qtype).astype(np.float64)
        x = rng.standard_normal((m, k)).astype(np.float32)
        x[:, 5] *= 30  # an outlier channel, as real activations have
        xq = quantize_acts(x)
        ref_q, ref = xq @ wd.T, x.astype(np.float64) @ wd.T
        mag = np.abs(xq) @ np.abs(wd).T
        qerr = np.abs(x - xq) @ np.abs(wd).T  # what int16 activations may cost at most
        results = {}
        for path in paths:
            check(lib.tv_select_kernel_path(path.encode()))
            y = np.full((m, n), np.nan, np.float32)
            check(lib.tv_matmul(tensor(qtype, w, k), ptr(x), m, ptr(y), 2))
            results[path] = y
            assert np.all(np.abs(y - ref_q) <= 3e-6 * mag + 1e-6), (path, m, n, k, np.abs(y - ref_q).max())
            assert np.all(np.abs(y - ref) <= qerr * 1.001 + 3e-6 * mag + 1e-6), (path, m, n, k)
        if "avx512amx" in results and "avx512vnni" in results:
            # the AMX tiles form the same exact integer dots and the same float sequence: same bits
            np.testing.assert_array_equal(results["avx512amx"], results["avx512vnni"], err_msg=f"m={m} n={n} k={k}")
    check(lib.tv_select_kernel_path(restore.encode()))
    assert "scalar" in results
