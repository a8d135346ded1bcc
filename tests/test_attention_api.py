"""The standalone attention entry points of the C ABI (tv_attention, tv_kv_cache_write,
tv_attention_paged) against a float64 numpy attention: the same flash kernel that runs inside
tv_model_forward, on contiguous K/V (prefill and decode) and on paged K/V with shuffled blocks."""
import numpy as np
import pytest

from tinyvllm import _native as nat

F32, F16 = 0, 1


def reference(q, k, v, q_pos):
    """Causal GQA attention in float64. q [n_q, H, D] at positions q_pos; k/v [n_kv, Hkv, D] at 0..n_kv-1."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[2])
    s = np.where(np.arange(k.shape[0])[None, None, :] <= np.asarray(q_pos)[None, :, None], s, -np.inf)
    p = np.exp(s - s.max(axis=2, keepdims=True))
    return np.einsum("hqk,khd->qhd", p / p.sum(axis=2, keepdims=True), v)


def stored(a, kv_dtype):
    """What the cache holds: fp16 rounding for TV_F16."""
    return a.astype(np.float16).astype(np.float32) if kv_dtype == F16 else a


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("kv_dtype", [F32, F16])
@pytest.mark.parametrize("n_head,n_head_kv,hd,n_kv,n_q", [
    (9, 3, 64, 37, 37),     # SmolLM2's heads, ragged prefill (head_dim 64: the hand-written AVX-512 block)
    (9, 3, 64, 300, 1),     # decode over many blocks
    (4, 4, 32, 50, 17),     # no GQA, another head_dim (generic loops), queries = the last 17 positions
    (6, 2, 16, 1, 1),       # a single token
])
def test_contiguous_matches_float64(kv_dtype, n_head, n_head_kv, hd, n_kv, n_q):
    rng = np.random.default_rng(n_kv * 7 + n_q)
    q = rand(rng, n_q, n_head, hd, scale=2.0)  # sharp softmax: the online max rescaling matters
    k, v = rand(rng, n_kv, n_head_kv, hd), rand(rng, n_kv, n_head_kv, hd)
    out = np.full((n_q, n_head, hd), np.nan, np.float32)
    nat.check(nat.lib.tv_attention(n_q, n_kv, n_head, n_head_kv, hd, nat.ptr(q), nat.ptr(k), nat.ptr(v), kv_dtype,
                                   nat.ptr(out), 2))
    ref = reference(q, stored(k, kv_dtype), stored(v, kv_dtype), np.arange(n_kv - n_q, n_kv))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=2e-5)


class Paged:
    """A raw paged cache plus tv_batch structs for it (arrays kept alive while in use)."""

    def __init__(self, n_head_kv, hd, n_blocks, block_size, kv_dtype):
        p = nat.ffi.new("tv_kv_cache **")
        nat.check(nat.lib.tv_kv_cache_create_raw(1, n_head_kv, hd, n_blocks, block_size, kv_dtype, p))
        self.cache = nat.ffi.gc(p[0], nat.lib.tv_kv_cache_free)
        self.keep = []

    def batch(self, positions, seq_ids, tables):
        arrays = [np.ascontiguousarray(a, np.int32) for a in (positions, seq_ids, tables)]
        self.keep.append(arrays)
        pos, seq, tab = arrays
        return nat.ffi.new("tv_batch *", dict(n_tokens=len(pos), tokens=nat.ffi.NULL, positions=nat.ptr(pos, "int32_t *"),
                                              seq_ids=nat.ptr(seq, "int32_t *"), n_seqs=tab.shape[0],
                                              max_blocks=tab.shape[1], block_tables=nat.ptr(tab, "int32_t *"),
                                              n_logits=0, logits_rows=nat.ffi.NULL))


@pytest.mark.parametrize("kv_dtype", [F32, F16])
def test_paged_mixed_prefill_and_decode(kv_dtype):
    """Two sequences in shuffled physical blocks: a prefill chunk of one, then a batch mixing the
    other's prefill with the first one's next decode token, each checked against float64."""
    rng = np.random.default_rng(3)
    H, Hkv, hd, bs = 9, 3, 64, 16
    lens = [45, 20]  # tokens of each sequence
    perm = rng.permutation(8)
    tables = np.full((2, 4), -1, np.int32)
    tables[0, :3], tables[1, :2] = perm[:3], perm[3:5]
    pc = Paged(Hkv, hd, 8, bs, kv_dtype)
    q = [rand(rng, n, H, hd, scale=2.0) for n in lens]
    k = [rand(rng, n, Hkv, hd) for n in lens]
    v = [rand(rng, n, Hkv, hd) for n in lens]

    def run(tokens):  # tokens: list of (seq, pos); writes their K/V, then attends
        b = pc.batch([p for _, p in tokens], [s for s, _ in tokens], tables)
        kk = np.stack([k[s][p] for s, p in tokens]).reshape(len(tokens), -1)
        vv = np.stack([v[s][p] for s, p in tokens]).reshape(len(tokens), -1)
        qq = np.ascontiguousarray(np.stack([q[s][p] for s, p in tokens]))
        nat.check(nat.lib.tv_kv_cache_write(pc.cache, 0, b, nat.ptr(kk), nat.ptr(vv)))
        out = np.full(qq.shape, np.nan, np.float32)
        nat.check(nat.lib.tv_attention_paged(pc.cache, 0, b, H, nat.ptr(qq), nat.ptr(out), 2))
        for i, (s, p) in enumerate(tokens):
            ref = reference(q[s][p:p + 1], stored(k[s][:p + 1], kv_dtype), stored(v[s][:p + 1], kv_dtype), [p])
            np.testing.assert_allclose(out[i:i + 1], ref, rtol=1e-4, atol=2e-5, err_msg=f"seq {s} pos {p}")

    run([(0, p) for p in range(44)])                          # prefill chunk of sequence 0
    run([(1, p) for p in range(20)] + [(0, 44)])              # sequence 1's prefill + sequence 0's decode


def test_bad_input_raises():
    q = np.zeros((2, 4, 8), np.float32)
    kv = np.zeros((1, 4, 8), np.float32)
    with pytest.raises(nat.NativeError, match="n_q"):  # more queries than keys
        nat.check(nat.lib.tv_attention(2, 1, 4, 4, 8, nat.ptr(q), nat.ptr(kv), nat.ptr(kv), F32, nat.ptr(q), 1))
    with pytest.raises(nat.NativeError, match="multiple of n_head_kv"):
        nat.check(nat.lib.tv_attention(1, 1, 3, 2, 8, nat.ptr(q), nat.ptr(kv), nat.ptr(kv), F32, nat.ptr(q), 1))
    with pytest.raises(nat.NativeError, match="kv_dtype"):
        nat.check(nat.lib.tv_attention(1, 1, 4, 4, 8, nat.ptr(q), nat.ptr(kv), nat.ptr(kv), 5, nat.ptr(q), 1))
    pc = Paged(4, 8, 2, 4, F32)
    k = np.zeros((2, 32), np.float32)
    for positions, table, msg in [([0, 5], [[0, 7]], "out of range"),       # block 7 of 2
                                  ([3, 2], [[0, 1]], "increase"),           # positions go back
                                  ([0, 8], [[0, 1]], "max_blocks")]:        # position 8 needs block 2
        b = pc.batch(positions, [0, 0], np.array(table))
        with pytest.raises(nat.NativeError, match=msg):
            nat.check(nat.lib.tv_kv_cache_write(pc.cache, 0, b, nat.ptr(k), nat.ptr(k)))
    b = pc.batch([0], [0], np.array([[0, 1]]))
    with pytest.raises(nat.NativeError, match="layer"):
        nat.check(nat.lib.tv_attention_paged(pc.cache, 1, b, 4, nat.ptr(q), nat.ptr(q), 1))
