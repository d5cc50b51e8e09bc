"""A batch's rows as kvcore sequences: prompts from a left-padded batch, allocation
with prefix sharing, the part of the batch the pool already holds, and the first
forward pass on new rows (from scratch, after a reused prefix, or, for
encoder-decoder models, once the encoder's length is known).

**Reuse rule.**  transformers slices a ``generate`` call's input by the cache's
``get_seq_length()``, one number for the whole batch, so a batch can skip only the
columns *every* row already holds.  Left padding counts as held (it is never
attended), so the batch skips ``min over rows of (padding + tokens already in the
pool)`` columns, never the last one (its logits are the next token's).  "Already in
the pool" means written by an earlier sequence: blocks a row shares with another row
of the same batch, whose prefill has not run yet (``join_pending``), do not count.  A
row that holds more than the batch skips computes the difference again but does not
write it: its cached K/V stay, and are what later columns read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CacheError, ShapeMismatchError
from ..models import AllocationRequest, GroupKind
from ._torch_arrays import to_numpy

if TYPE_CHECKING:
    from .._paged_handle import PagedKvCacheHandle

#: A :class:`~kvcore.integrations.transformers.KvCoreCache`: named, not imported, since
#: the cache's module imports this one.
KvCoreCache = Any

__all__ = ["PREFILL", "RESUME", "STEP", "allocate_rows", "allocate_waiting", "first_pass",
           "left_padded_prompts"]

# What a KvCoreCache's current forward pass does (its ``_mode``).
PREFILL = "prefill"   # rows' first pass from scratch: write, hand the model its own K/V
RESUME = "resume"     # rows' first pass after a reused prefix: write the rest, read
STEP = "step"         # a pass on rows that ran before: extend, write_slots, read


def left_padded_prompts(input_ids: Any, attention_mask: Any) -> tuple[list[tuple[int, ...]],
                                                                      np.ndarray, int]:
    """``(prompts without padding, left padding per row, width)`` of a batch; a mask
    with zeros after ones (right padding) is refused."""
    ids = np.asarray(to_numpy(input_ids), dtype=np.int64)
    if ids.ndim != 2:
        raise ShapeMismatchError(f"input_ids has shape {list(ids.shape)}, expected "
                                 "[batch, prompt_len]")
    if attention_mask is None:
        mask = np.ones_like(ids, dtype=bool)
    else:
        mask = np.asarray(to_numpy(attention_mask)).astype(bool)
        if mask.shape != ids.shape:
            raise ShapeMismatchError(f"attention_mask has shape {list(mask.shape)}, "
                                     f"input_ids {list(ids.shape)}")
    # Left padding: once a row's mask turns on it stays on.
    if np.any(mask[:, :-1] & ~mask[:, 1:]):
        row = int(np.argmax(np.any(mask[:, :-1] & ~mask[:, 1:], axis=1)))
        raise ValueError(f"attention_mask row {row} is {mask[row].astype(int).tolist()}: "
                         "expected left padding (zeros only before the prompt); build "
                         "the batch with tokenizer.padding_side='left'")
    pads = (ids.shape[1] - mask.sum(axis=1)).astype(np.int64)
    prompts = [tuple(int(t) for t in row[p:]) for row, p in zip(ids, pads)]
    return prompts, pads, int(ids.shape[1])


def first_pass(cache: KvCoreCache, batch: int, n: int) -> None:
    """Start a forward pass of ``batch`` rows of ``n`` tokens on a cache whose rows
    have not run yet: set_prompts' rows (:func:`_resume`), or none (:func:`_prefill`)."""
    if cache._fresh:
        _resume(cache, batch, n)
    elif cache._waiting is not None:
        raise CacheError("an encoder-decoder cache got a second decoder pass before any "
                         "cross-attention K/V: call the model with encoder outputs")
    else:
        _prefill(cache, batch, n)


def _set_repeat(cache: KvCoreCache, batch: int, rows: int) -> None:
    """A first pass of ``batch`` rows over ``rows`` kvcore rows: generate repeats
    each prompt for beams and return sequences (``repeat_interleave``).  Each
    kvcore row writes once for its copies, which are forked from it after the
    pass (``KvCoreCache._materialize``): the prompt's blocks are stored once."""
    if batch % rows:
        raise ShapeMismatchError(
            f"the first forward pass has {batch} rows, but set_prompts got {rows} "
            "prompts (rows must be a multiple of the prompts: generate repeats each "
            "prompt for beams and return sequences)")
    cache._repeat = batch // rows

def _prefill(cache: KvCoreCache, batch: int, n: int) -> None:
    """Allocate one sequence per prompt (per row without set_prompts) for a first
    forward pass from scratch."""
    if cache._prompts is None:
        prompts: list[tuple[int, ...] | None] = [None] * batch
        pads = np.zeros(batch, dtype=np.int64)
    else:
        if n != cache._prompt_width:
            raise ShapeMismatchError(
                f"the first forward pass has {batch} rows of {n} tokens, but "
                f"set_prompts got {len(cache._prompts)} prompts padded to "
                f"{cache._prompt_width}")
        prompts = list(cache._prompts)
        pads = np.asarray([n - len(p) for p in prompts], dtype=np.int64)
    _set_repeat(cache, batch, len(prompts))
    cache._length = n
    cache._mode = PREFILL
    if cache._cross_group is not None:
        cache._waiting = (prompts, pads)  # rows need the encoder's length
        return
    cache._handles, cache._cached, _ = allocate_rows(cache, prompts, pads, n, reuse=False)
    cache._pads = pads

def allocate_waiting(cache: KvCoreCache, encoder_tokens: int) -> None:
    """Encoder-decoder models: allocate the rows of the first pass now that the
    encoder's length is known, and write what the decoder layers held back."""
    prompts, pads = cache._waiting  # type: ignore[misc]
    cache._handles, cache._cached, _ = allocate_rows(cache, prompts, pads, cache._length,
                                                   reuse=False,
                                                   encoder_tokens=encoder_tokens)
    cache._pads = pads
    cache._encoder_tokens = encoder_tokens
    cache._waiting = None
    held, cache._held_back = cache._held_back, []
    for layer, key, value in held:
        cache._write_rows(layer, key, value)

def _resume(cache: KvCoreCache, batch: int, n: int) -> None:
    """The first pass on rows set_prompts allocated: ``n`` is the columns after the
    reused part (or the whole width: the caller fed every column)."""
    cache._fresh = False
    _set_repeat(cache, batch, len(cache._handles))
    width = cache._prompt_width
    if n == width:  # every column fed: compute them all, as a plain prefill
        cache._mode = PREFILL
    elif cache._length + n == width:
        cache._mode = RESUME
    else:
        raise ShapeMismatchError(f"the first forward pass has {n} tokens per row; the "
                                 f"prompts are {width} wide and the cache holds "
                                 f"{cache._length} of them: expected {width - cache._length}"
                                 f" (or {width})")
    cache._length = width


def allocate_rows(cache: KvCoreCache, prompts: list[tuple[int, ...] | None], pads: np.ndarray,
                  width: int, *, reuse: bool = True, encoder_tokens: int | None = None
                  ) -> tuple[list[PagedKvCacheHandle], np.ndarray, int]:
    """One sequence per row, all or nothing: ``(handles, cached tokens per row,
    columns the batch may skip)`` (0 unless ``reuse``).  A row with a prompt is
    allocated with its token ids; a row without (``None``) holds ``width`` positions,
    padding included."""
    manager = cache._manager
    sliding = any(g.kind is GroupKind.sliding for g in manager.config.groups)
    handles: list[PagedKvCacheHandle] = []
    try:
        for prompt in prompts:
            rid = cache._new_id()
            if prompt is None:
                request = AllocationRequest(request_id=rid, num_tokens=width,
                                            encoder_tokens=encoder_tokens)
            else:
                # Rows of one batch share the prompt blocks they have in common at
                # once: a row joins blocks an earlier row writes in this same forward
                # pass, whose update() writes every row of a layer before any row
                # reads it (the promise join_pending asks for).  A prompt cached whole
                # is served whole (allow_full_hit), except with sliding windows: a
                # window releases what the first *uncached* token no longer reads,
                # and the prompt's last token is always computed again.
                request = AllocationRequest(request_id=rid, prompt_token_ids=prompt,
                                            extra_key=cache._extra_key, join_pending=True,
                                            allow_full_hit=not sliding,
                                            encoder_tokens=encoder_tokens)
            handles.append(manager.allocate(request))
    except BaseException:
        for handle in handles:  # all or nothing
            manager.deallocate(handle)
        raise
    cached = np.asarray([h.num_cached_tokens() for h in handles], dtype=np.int64)
    if not reuse or not handles or any(p is None for p in prompts):
        return handles, cached, 0
    ready = _ready_tokens(manager, handles, cached)
    return handles, cached, int(min(int((pads + ready).min()), width - 1))


def _ready_tokens(manager: Any, handles: list[PagedKvCacheHandle],
                  cached: np.ndarray) -> np.ndarray:
    """Per row: the leading cached tokens whose K/V are already written, i.e. not in a
    block an earlier row of this batch allocated fresh (and has yet to write)."""
    bs = manager.block_size
    group = next(g.index for g in manager.config.groups if g.kind is not GroupKind.cross)
    table = manager.vllm_block_table(handles, group=group, pad_value=-1)
    blocks, lens = table.block_tables, table.seq_lens
    fresh = np.zeros(0, dtype=blocks.dtype)
    ready = np.zeros(len(handles), dtype=np.int64)
    for row in range(len(handles)):
        hit = int(cached[row]) // bs
        own = blocks[row, :-(-int(lens[row]) // bs)]
        pending = np.isin(own[:hit], fresh) & (own[:hit] >= 0)
        ready[row] = (int(np.argmax(pending)) if pending.any() else hit) * bs
        fresh = np.concatenate([fresh, own[hit:]])
    return np.minimum(ready, cached)
