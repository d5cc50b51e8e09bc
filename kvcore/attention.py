"""Reference paged attention, read straight from a kvcore pool through a page table.

This is the attention an engine built on kvcore computes, written once for every
array library: the pool (``manager.layer_pool(layer)``, shaped ``[2, num_blocks,
block_size, kv_heads, head_dim]``) is gathered through the batch's page table into a
padded ``[batch, tokens, kv_heads, head_dim]`` rectangle, and attention is two batched
matmuls with a mask.  No kernels, no Python loop over tokens or sequences: it is the
correctness reference that fused kernels (FlashInfer, vLLM's paged attention) are
checked against, and fast enough for tests, demos and small models.

Array operations come from the backend that owns the pool (:meth:`Backend.array_ops`):
numpy, torch and cupy provide them, and so may any third-party backend.  Importing
this module never imports torch or cupy.

>>> pages = manager.vllm_block_table(handles)            # or flashinfer_page_table
>>> out = paged_attention(query, manager.layer_pool(0), pages)   # query [B, Q, H, D]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ._array_ops import ArrayOps
from ._registry import backend_for_array
from ._slot_mapping import FlashInferPageTable, VllmBlockTable
from ._tensor_ref import TensorRef
from .errors import ArrayMismatchError, ShapeMismatchError

if TYPE_CHECKING:
    from ._manager import KvCacheManager
    from ._paged_handle import PagedKvCacheHandle

__all__ = ["PagedLayout", "gather_kv", "paged_attention"]

Pages = Any  # PagedLayout | VllmBlockTable | FlashInferPageTable | array [batch, max_blocks]


def _native(array: Any) -> Any:
    return array.native if isinstance(array, TensorRef) else array


def _ops(array: Any) -> ArrayOps:
    """The array operations of the backend owning ``array``: the backend a
    :class:`TensorRef` names, else the available backend of the array's library
    (found without importing any library that is not imported already)."""
    backend = array.backend if isinstance(array, TensorRef) else None
    if backend is None:
        backend = backend_for_array(_native(array))
    return backend.array_ops()


# --- where a batch's tokens are ------------------------------------------------------


class PagedLayout:
    """A batch's tokens as a ``[batch, width]`` rectangle of pool slots.

    Row ``i`` holds sequence ``i``'s ``seq_lens[i]`` tokens in logical order, starting
    at column 0 (``left_padded=False``) or ending at the last column
    (``left_padded=True``, the layout Hugging Face ``generate`` uses).  ``valid`` marks
    the columns that hold a token.  Build one per batch step and reuse it for every
    layer: the device copies of the indices and of the attention mask are made once
    per library, device and stream (through pinned memory, without blocking the
    host, on torch and cupy), not once per layer.
    """

    def __init__(self, block_tables: Any, seq_lens: Any, block_size: int, *,
                 width: int | None = None, left_padded: bool = False) -> None:
        tables = np.asarray(block_tables, dtype=np.int64)
        lens = np.asarray(seq_lens, dtype=np.int64).reshape(-1)
        if tables.ndim != 2 or tables.shape[0] != lens.shape[0]:
            raise ShapeMismatchError(f"block_tables has shape {list(tables.shape)}, expected "
                                     f"[{lens.shape[0]}, max_blocks] (one row per sequence "
                                     "of seq_lens)")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if lens.size and lens.min() < 0:
            raise ValueError(f"seq_lens must be >= 0, got {lens.tolist()}")
        capacity = tables.shape[1] * block_size
        if lens.size and lens.max() > capacity:
            i = int(np.argmax(lens))
            raise ShapeMismatchError(f"sequence {i} has {int(lens[i])} tokens but its block "
                                     f"table row holds {tables.shape[1]} blocks of "
                                     f"{block_size} ({capacity} tokens)")
        longest = int(lens.max(initial=0))
        width = longest if width is None else int(width)
        if width < longest:
            raise ShapeMismatchError(f"width {width} is shorter than the longest sequence "
                                     f"({longest} tokens)")
        pos = np.arange(width, dtype=np.int64)[None, :]
        if left_padded:
            pos = pos - (width - lens)[:, None]
        valid = (pos >= 0) & (pos < lens[:, None])
        pos = np.where(valid, pos, 0)
        if tables.shape[1]:
            blocks = np.take_along_axis(tables, pos // block_size, axis=1)
        else:  # every sequence is empty: no slot is read
            blocks = np.zeros_like(pos)
        self.slots = np.where(valid, blocks * block_size + pos % block_size, 0)
        self.valid = valid
        self.seq_lens = lens
        self.block_size = int(block_size)
        self.width = width
        self.left_padded = left_padded
        self.max_block = int(blocks[valid].max(initial=-1))
        self._native: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._masks: dict[tuple[Any, ...], Any] = {}

    @property
    def batch_size(self) -> int:
        return int(self.seq_lens.shape[0])

    @classmethod
    def from_pages(cls, pages: Pages, seq_lens: Any = None, *, block_size: int | None = None,
                   width: int | None = None, left_padded: bool = False) -> PagedLayout:
        """A layout from a :class:`~kvcore.VllmBlockTable`, a
        :class:`~kvcore.FlashInferPageTable`, or a ``[batch, max_blocks]`` block table
        with ``seq_lens`` and ``block_size``."""
        if isinstance(pages, PagedLayout):
            return pages
        if isinstance(pages, VllmBlockTable):
            return cls(pages.block_tables, pages.seq_lens if seq_lens is None else seq_lens,
                       pages.block_size, width=width, left_padded=left_padded)
        if isinstance(pages, FlashInferPageTable):
            tables, lens = _csr_to_block_tables(pages)
            return cls(tables, lens, pages.page_size, width=width, left_padded=left_padded)
        if seq_lens is None or block_size is None:
            raise ValueError("a plain block table needs seq_lens and block_size")
        return cls(pages, seq_lens, block_size, width=width, left_padded=left_padded)

    @classmethod
    def from_manager(cls, manager: KvCacheManager,
                     handles: Sequence[PagedKvCacheHandle | str], *, width: int | None = None,
                     left_padded: bool = False) -> PagedLayout:
        """The layout of live sequences of ``manager`` (their block tables now)."""
        return cls.from_pages(manager.vllm_block_table(handles), width=width,
                              left_padded=left_padded)

    def native(self, like: Any, ops: ArrayOps | None = None) -> tuple[Any, Any]:
        """``(slots, valid)`` as arrays of ``like``'s library on ``like``'s device:
        ``slots`` flattened to ``[batch * width]``, ``valid`` as ``[batch, width]``."""
        ops = _ops(like) if ops is None else ops
        key = (ops.name, ops.device_key(like))
        cached = self._native.get(key)
        if cached is None:  # slots flattened: gathers take one index axis
            cached = (ops.from_host(self.slots.reshape(-1), like),
                      ops.from_host(self.valid, like))
            self._native[key] = cached
        return cached

    def mask(self, like: Any, ops: ArrayOps, q_len: int, query_lens: np.ndarray,
             causal: bool) -> Any:
        """The attention mask ``[batch, 1, 1, q_len, width]`` (True where query ``j``
        of sequence ``i`` may read key ``t``) on ``like``'s device, made once per
        query shape and reused for every layer: a host -> device copy per layer would
        cost a launch each, and a blocking one on libraries that copy synchronously."""
        key = (ops.name, ops.device_key(like), q_len, causal, query_lens.tobytes())
        cached = self._masks.get(key)
        if cached is None:
            lens = self.seq_lens
            t = np.arange(self.width)[None, None, :]
            j = np.arange(q_len)[None, :, None]
            qpos = (lens - query_lens)[:, None, None] + j
            allowed = (t < lens[:, None, None]) & (j < query_lens[:, None, None])
            if causal:
                allowed = allowed & (t <= qpos)
            cached = ops.from_host(allowed[:, None, None, :, :], like)
            self._masks[key] = cached
        return cached


def _csr_to_block_tables(pages: FlashInferPageTable) -> tuple[np.ndarray, np.ndarray]:
    indptr = np.asarray(pages.indptr, dtype=np.int64)
    counts = np.diff(indptr)
    batch = counts.shape[0]
    tables = np.zeros((batch, int(counts.max(initial=0))), dtype=np.int64)
    rows = np.repeat(np.arange(batch), counts)
    cols = np.arange(int(indptr[-1])) - np.repeat(indptr[:-1], counts)
    tables[rows, cols] = np.asarray(pages.indices, dtype=np.int64)[:int(indptr[-1])]
    last = np.asarray(pages.last_page_len, dtype=np.int64)
    lens = np.where(counts > 0, (counts - 1) * pages.page_size + last, 0)
    return tables, lens


def _check_pool(pool: Any, layout: PagedLayout) -> tuple[int, int, int]:
    shape = tuple(pool.shape)
    if len(shape) != 5 or shape[0] != 2:
        raise ShapeMismatchError(f"kv_pool has shape {list(shape)}, expected [2, num_blocks, "
                                 "block_size, kv_heads, head_dim] (manager.layer_pool(layer))")
    if shape[2] != layout.block_size:
        raise ShapeMismatchError(f"the page table uses blocks of {layout.block_size} tokens, "
                                 f"the pool's blocks hold {shape[2]}")
    if layout.max_block >= shape[1]:
        raise ArrayMismatchError(f"the page table names block {layout.max_block}, the pool has "
                                 f"{shape[1]} blocks (0..{shape[1] - 1})")
    return shape[1] * shape[2], shape[3], shape[4]


def gather_kv(kv_pool: Any, pages: Pages, seq_lens: Any = None, *,
              width: int | None = None, left_padded: bool = False) -> tuple[Any, Any]:
    """K and V of a batch as ``[batch, width, kv_heads, head_dim]`` arrays of the pool's
    library, dtype and device, zero where a row holds no token.

    ``pages`` is a :class:`PagedLayout` (reused as is), a page table the manager
    exported, or a plain block table with ``seq_lens``.  One gather per K and V,
    however many sequences the batch holds.
    """
    pool = _native(kv_pool)
    ops = _ops(kv_pool)
    block_size = int(pool.shape[2]) if len(pool.shape) == 5 else None
    layout = PagedLayout.from_pages(pages, seq_lens, block_size=block_size, width=width,
                                    left_padded=left_padded)
    rows, heads, dim = _check_pool(pool, layout)
    with ops.device_scope(pool):  # cupy launches on the current device: make it the pool's
        slots, valid = layout.native(pool, ops)
        # K and V in one gather along the slot axis of [2, slots, heads, dim].
        both = ops.take1(pool.reshape(2, rows, heads, dim), slots)
        both = both.reshape(2, layout.batch_size, layout.width, heads, dim)
        both = ops.cast_like(ops.where(valid[None, :, :, None, None], both, 0), pool)
    return both[0], both[1]


def paged_attention(query: Any, kv_pool: Any, pages: Pages, seq_lens: Any = None, *,
                    query_lens: Any = None, causal: bool = True,
                    scale: float | None = None) -> Any:
    """Attention of ``query`` over K/V read from ``kv_pool`` through ``pages``.

    ``query`` is ``[batch, q_len, num_heads, head_dim]``; ``num_heads`` is a multiple
    of the pool's ``kv_heads`` (grouped-query attention: head ``h`` reads KV head
    ``h // (num_heads // kv_heads)``, the convention of Llama and ``repeat_kv``).
    Sequence ``i``'s queries are its *last* ``query_lens[i]`` tokens (default
    ``q_len`` for every sequence): a decode step is ``q_len == 1``, a prefill is
    ``query_lens == seq_lens`` with queries padded on the right to ``q_len``, and
    anything between is chunked prefill.  With ``causal`` a query at position ``p``
    sees keys ``0..p``, otherwise the whole sequence.  Rows past ``query_lens[i]``
    come back as zeros.

    Computed in float32 whatever the dtype, returned in ``query``'s dtype, library and
    device.  ``scale`` defaults to ``1 / sqrt(head_dim)``.
    """
    q = _native(query)
    pool = _native(kv_pool)
    ops = _ops(kv_pool)
    q_library = type(q).__module__.split(".", 1)[0]
    if not hasattr(q, "shape"):
        raise TypeError(f"query must be a {ops.name} array like the pool, got "
                        f"{type(q).__name__}")
    if q_library not in ops.array_modules:
        raise ArrayMismatchError(f"query is a {q_library} array but kv_pool is a "
                                 f"{ops.name} array; use one library for both")
    if len(q.shape) != 4:
        raise ShapeMismatchError(f"query has shape {list(q.shape)}, expected [batch, q_len, "
                                 "num_heads, head_dim]")
    batch, q_len, heads, dim = (int(s) for s in q.shape)
    block_size = int(pool.shape[2]) if len(pool.shape) == 5 else None
    layout = PagedLayout.from_pages(pages, seq_lens, block_size=block_size)
    _, kv_heads, pool_dim = _check_pool(pool, layout)
    if layout.batch_size != batch:
        raise ShapeMismatchError(f"query holds {batch} sequences, the page table "
                                 f"{layout.batch_size}")
    if dim != pool_dim:
        raise ShapeMismatchError(f"query head_dim is {dim}, the pool's is {pool_dim}")
    if heads % kv_heads:
        raise ShapeMismatchError(f"query has {heads} heads, not a multiple of the pool's "
                                 f"{kv_heads} kv heads")
    lens = layout.seq_lens
    qlens = (np.full(batch, q_len, dtype=np.int64) if query_lens is None
             else np.asarray(query_lens, dtype=np.int64).reshape(-1))
    if qlens.shape[0] != batch or (batch and (qlens.min() < 0 or qlens.max() > q_len)):
        raise ShapeMismatchError(f"query_lens {qlens.tolist()} must hold {batch} values in "
                                 f"0..{q_len} (the query's q_len)")
    if np.any(qlens > lens):
        i = int(np.argmax(qlens > lens))
        raise ShapeMismatchError(f"sequence {i} has {int(qlens[i])} queries but only "
                                 f"{int(lens[i])} tokens in the cache; write the new tokens' "
                                 "K/V before attending")
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    with ops.device_scope(pool):  # every launch below on the pool's device
        return _attend(ops, q, kv_pool, layout, qlens, causal, scale, kv_heads)


def _attend(ops: ArrayOps, q: Any, kv_pool: Any, layout: PagedLayout, qlens: np.ndarray,
            causal: bool, scale: float, kv_heads: int) -> Any:
    batch, q_len, heads, dim = (int(s) for s in q.shape)
    groups = heads // kv_heads
    width = layout.width
    mask = layout.mask(q, ops, q_len, qlens, causal)              # [B, 1, 1, Q, T]
    key, value = gather_kv(kv_pool, layout)                        # [B, T, Hkv, D]
    qf = ops.float32(q).reshape(batch, q_len, kv_heads, groups, dim)
    qf = ops.permute(qf, (0, 2, 3, 1, 4)).reshape(batch, kv_heads, groups * q_len, dim)
    kf = ops.permute(ops.float32(key), (0, 2, 3, 1))            # [B, Hkv, D, T]
    scores = (qf @ kf).reshape(batch, kv_heads, groups, q_len, width) * scale
    scores = ops.where(mask, scores, -math.inf)
    peak = ops.amax(scores)
    # A query row with no key (a padded query) has peak -inf; 0 keeps exp() at 0, not NaN.
    peak = ops.where(ops.isfinite(peak), peak, 0.0)
    weights = ops.exp(scores - peak)
    total = ops.sum(weights)
    total = ops.where(total > 0, total, 1.0)
    vf = ops.permute(ops.float32(value), (0, 2, 1, 3))          # [B, Hkv, T, D]
    out = (weights.reshape(batch, kv_heads, groups * q_len, width) @ vf)
    out = out.reshape(batch, kv_heads, groups, q_len, dim) / total
    out = ops.permute(out, (0, 3, 1, 2, 4)).reshape(batch, q_len, heads, dim)
    return ops.cast_like(out, q)
