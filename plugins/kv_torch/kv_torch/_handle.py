"""The handle class the torch backend's managers hand out."""

from __future__ import annotations

import torch

from kvcore import PagedKvCacheHandle
from kvcore.errors import HandleSwappedError


class TorchKvCacheHandle(PagedKvCacheHandle):
    """A :class:`kvcore.PagedKvCacheHandle` whose reads come back as ``torch.Tensor``.

    Reach it with ``handle.as_any(TorchKvCacheHandle)``.  Two ways to read:

    * :meth:`key_tensor` / :meth:`value_tensor`: a new ``[tokens, heads, head_dim]``
      tensor in logical order (one ``index_select`` on the pool).  Goes through the
      manager's lock, so inside a ``torch.compile``'d function it is a graph break.
    * :meth:`pool_tensor` + :meth:`slot_tensor`: the raw pool and the slots of the
      sequence, taken *outside* the compiled region; the gather itself
      (``pool.flatten(1, 2)[0].index_select(0, slots)``) then compiles with
      ``fullgraph=True``.
    """

    __slots__ = ()

    def key_tensor(self, layer: int) -> torch.Tensor | None:
        """Keys of ``layer`` as ``[tokens, heads, head_dim]``, or ``None`` if none
        were written yet."""
        ref = self.key_cache(layer)
        return None if ref is None else ref.native

    def value_tensor(self, layer: int) -> torch.Tensor | None:
        """Values of ``layer`` as ``[tokens, heads, head_dim]``, or ``None``."""
        ref = self.value_cache(layer)
        return None if ref is None else ref.native

    def kv_tensors(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(keys, values)`` of ``layer``, or ``None`` if none were written yet."""
        pair = self.kv_cache(layer)
        return None if pair is None else (pair[0].native, pair[1].native)

    def pool_tensor(self, layer: int) -> torch.Tensor:
        """The whole pool of ``layer`` (``[2, num_blocks, block_size, heads, dim]``,
        K at 0, V at 1), shared with the cache: writes through it change the cache."""
        return self._manager.layer_pool(layer).native

    def slot_tensor(self, layer: int) -> torch.Tensor:
        """The pool slots (``block * block_size + offset``) of the tokens written to
        ``layer``, in logical order, as an ``int64`` tensor on the cache's device.

        Valid until the sequence's blocks move (copy-on-write, fork, swap); take a new
        one after each ``extend``/``write``.
        """
        with self._manager._lock:  # table and written count must come from one moment
            if self.is_swapped():
                raise HandleSwappedError(f"slot_tensor: request {self.request_id!r} is "
                                         "swapped out; call swap_in first")
            n = self.num_written(layer)
            slots = self.block_table().slots(0, n)
        device = self.device()
        target = torch.device("cpu") if device.type == "cpu" else torch.device("cuda", device.index)
        return torch.as_tensor(slots, dtype=torch.int64, device=target)
