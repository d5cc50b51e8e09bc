"""Paged attention read from the pool equals dense attention, on every backend."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import kvcore
from kvcore.attention import PagedLayout, gather_kv, paged_attention
from kvcore.errors import ArrayMismatchError, ShapeMismatchError, UnsupportedError

BACKENDS = ["numpy", "torch"]
TOLERANCE = {"float32": 2e-5, "float16": 5e-3}


def _manager(backend: str, dtype: str, kv_heads: int = 2, head_dim: int = 8,
             block_size: int = 4) -> kvcore.KvCacheManager:
    cfg = kvcore.CacheConfig(num_layers=2, num_kv_heads=kv_heads, head_dim=head_dim,
                             dtype=dtype, block_size=block_size, num_blocks=64)
    return kvcore.KvCacheManager(cfg, backend=backend)


def _fill(mgr: kvcore.KvCacheManager, lengths: list[int], rng: np.random.Generator,
          *, fork_first: bool = False) -> list[kvcore.PagedKvCacheHandle]:
    """Sequences of ``lengths`` with random K/V in layer 1.  With ``fork_first`` the
    second sequence is a fork of the first that then grows: its block table shares
    blocks and ends in a copy-on-write block, so rows are not contiguous in the pool."""
    cfg, be = mgr.config, mgr.backend
    handles = []
    for i, n in enumerate(lengths):
        if fork_first and i == 1:
            h = mgr.fork(handles[0], "seq-1")
            extra = n - h.num_tokens()
            mgr.extend(h, extra)
            k = rng.standard_normal((extra, cfg.num_kv_heads, cfg.head_dim))
            v = rng.standard_normal((extra, cfg.num_kv_heads, cfg.head_dim))
            for layer in range(cfg.num_layers):
                mgr.write(h, layer, be.from_numpy(k, cfg.dtype, cfg.device),
                          be.from_numpy(v, cfg.dtype, cfg.device))
        else:
            h = mgr.allocate(kvcore.AllocationRequest(request_id=f"seq-{i}", num_tokens=n))
            for layer in range(cfg.num_layers):
                k = rng.standard_normal((n, cfg.num_kv_heads, cfg.head_dim))
                v = rng.standard_normal((n, cfg.num_kv_heads, cfg.head_dim))
                mgr.write(h, layer, be.from_numpy(k, cfg.dtype, cfg.device),
                          be.from_numpy(v, cfg.dtype, cfg.device))
        handles.append(h)
    return handles


def _dense(mgr: kvcore.KvCacheManager, handles: list, layer: int, query: np.ndarray,
           query_lens: list[int], causal: bool) -> np.ndarray:
    """Textbook attention in float64, one sequence at a time, from logical-order K/V."""
    be = mgr.backend
    out = np.zeros(query.shape, dtype=np.float64)
    heads, dim = query.shape[2], query.shape[3]
    for i, h in enumerate(handles):
        k = be.to_numpy(h.key_cache(layer).native).astype(np.float64)
        v = be.to_numpy(h.value_cache(layer).native).astype(np.float64)
        groups = heads // k.shape[1]
        k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
        n, ql = k.shape[0], query_lens[i]
        for j in range(ql):
            pos = n - ql + j
            visible = pos + 1 if causal else n
            scores = np.einsum("hd,thd->ht", query[i, j], k[:visible]) / np.sqrt(dim)
            w = np.exp(scores - scores.max(axis=1, keepdims=True))
            w /= w.sum(axis=1, keepdims=True)
            out[i, j] = np.einsum("ht,thd->hd", w, v[:visible])
    return out


def _query(mgr, rng, batch, q_len, heads):
    cfg, be = mgr.config, mgr.backend
    q = rng.standard_normal((batch, q_len, heads, cfg.head_dim))
    native = be.from_numpy(q, cfg.dtype, cfg.device)
    return native, be.to_numpy(native).astype(np.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("heads", [2, 8], ids=["mha", "gqa"])
def test_decode_step_matches_dense_attention(backend, dtype, heads):
    rng = np.random.default_rng(0)
    mgr = _manager(backend, dtype)
    handles = _fill(mgr, [7, 13, 1, 16], rng)
    native, q = _query(mgr, rng, 4, 1, heads)
    out = paged_attention(native, mgr.layer_pool(1), mgr.vllm_block_table(handles))
    assert type(out) is type(native) and tuple(out.shape) == (4, 1, heads, 8)
    expect = _dense(mgr, handles, 1, q, [1] * 4, causal=True)
    np.testing.assert_allclose(mgr.backend.to_numpy(out), expect, atol=TOLERANCE[dtype],
                               rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_causal_prefill_of_ragged_batch_matches_dense_attention(backend, dtype):
    rng = np.random.default_rng(1)
    mgr = _manager(backend, dtype)
    lengths = [5, 12, 9]
    handles = _fill(mgr, lengths, rng, fork_first=True)
    native, q = _query(mgr, rng, 3, max(lengths), 4)
    pages = mgr.flashinfer_page_table(handles)  # the CSR form works as well
    out = paged_attention(native, mgr.layer_pool(1), pages, query_lens=lengths)
    got = mgr.backend.to_numpy(out)
    expect = _dense(mgr, handles, 1, q, lengths, causal=True)
    np.testing.assert_allclose(got, expect, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    assert not got[0, 5:].any() and not got[2, 9:].any()  # padded queries give zeros


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_prefill_and_non_causal_match_dense_attention(backend):
    rng = np.random.default_rng(2)
    mgr = _manager(backend, "float32")
    handles = _fill(mgr, [10, 6], rng)
    native, q = _query(mgr, rng, 2, 3, 4)
    pages = mgr.vllm_block_table(handles)
    for causal in (True, False):
        out = paged_attention(native, mgr.layer_pool(0), pages, query_lens=[3, 2],
                              causal=causal)
        expect = _dense(mgr, handles, 0, q, [3, 2], causal=causal)
        np.testing.assert_allclose(mgr.backend.to_numpy(out), expect, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_kv_returns_logical_order_with_zero_padding_on_either_side(backend):
    rng = np.random.default_rng(3)
    mgr = _manager(backend, "float32")
    handles = _fill(mgr, [3, 9], rng, fork_first=True)
    be = mgr.backend
    layout = PagedLayout.from_manager(mgr, handles, width=11, left_padded=True)
    key, value = gather_kv(mgr.layer_pool(1), layout)
    key, value = be.to_numpy(key), be.to_numpy(value)
    assert key.shape == (2, 11, 2, 8)
    for i, (h, n) in enumerate(zip(handles, [3, 9])):
        np.testing.assert_array_equal(key[i, 11 - n:], be.to_numpy(h.key_cache(1).native))
        np.testing.assert_array_equal(value[i, 11 - n:], be.to_numpy(h.value_cache(1).native))
        assert not key[i, :11 - n].any()
    right, _ = gather_kv(mgr.layer_pool(1), mgr.vllm_block_table(handles))
    np.testing.assert_array_equal(be.to_numpy(right)[0, :3], key[0, 8:])


def test_layout_is_reused_per_library_and_device():
    layout = PagedLayout(np.array([[2, 0]]), [5], 4)
    assert layout.slots.tolist() == [[8, 9, 10, 11, 0]]
    pool = np.zeros((2, 4, 4, 1, 2), np.float32)
    assert layout.native(pool)[0] is layout.native(pool)[0]
    assert layout.native(pool)[0].tolist() == [8, 9, 10, 11, 0]


def test_bad_shapes_are_refused_naming_the_values():
    mgr = _manager("numpy", "float32")
    handles = _fill(mgr, [4], np.random.default_rng(4))
    pages = mgr.vllm_block_table(handles)
    pool = mgr.layer_pool(0)
    with pytest.raises(ShapeMismatchError, match="3 heads, not a multiple"):
        paged_attention(np.zeros((1, 1, 3, 8), np.float32), pool, pages)
    with pytest.raises(ShapeMismatchError, match="head_dim is 4"):
        paged_attention(np.zeros((1, 1, 2, 4), np.float32), pool, pages)
    with pytest.raises(ShapeMismatchError, match="5 queries but only 4 tokens"):
        paged_attention(np.zeros((1, 5, 2, 8), np.float32), pool, pages)
    with pytest.raises(ShapeMismatchError, match="query holds 2 sequences"):
        paged_attention(np.zeros((2, 1, 2, 8), np.float32), pool, pages)
    with pytest.raises(ShapeMismatchError, match="holds 1 blocks of 4"):
        PagedLayout([[0]], [6], 4)
    with pytest.raises(ArrayMismatchError, match="names block 99"):
        gather_kv(pool, [[99]], [2])
    with pytest.raises(TypeError, match="query must be a numpy array like the pool, got list"):
        paged_attention([[1.0]], pool, pages)


def test_mixing_libraries_is_refused():
    import torch  # CI installs torch; a missing torch must fail, not skip

    mgr = _manager("numpy", "float32")
    handles = _fill(mgr, [4], np.random.default_rng(5))
    with pytest.raises(ArrayMismatchError, match="torch array but kv_pool is a numpy"):
        paged_attention(torch.zeros(1, 1, 2, 8), mgr.layer_pool(0),
                        mgr.vllm_block_table(handles))


def test_importing_attention_imports_no_array_library_but_numpy():
    code = ("import sys, kvcore.attention\n"
            "print(','.join(m for m in ('torch', 'cupy', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""
