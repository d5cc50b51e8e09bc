"""PagedKvCacheHandle: the handle a :class:`~kvcore.KvCacheManager` hands out.

Backends subclass it (``NumpyKvCacheHandle``, ``TorchKvCacheHandle``, ...) to add
methods that return their own array type; ``handle.as_any(TorchKvCacheHandle)``
reaches them.  All state lives in the manager; a handle is a reference to one
sequence there, so clones are cheap and see the same data.  It reaches the manager
only through :class:`~kvcore._handle_host.HandleHost`.

After the sequence is deallocated (or its manager closed) every method raises
:class:`~kvcore.errors.InvalidHandleError` except :meth:`is_valid` and
:meth:`cache_id`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from ._block_table import BlockTable
from ._device import Device
from ._handle import KvCacheHandle
from ._tensor_ref import TensorRef
from .errors import NotCopyableError
from .models import CacheHandleStats

if TYPE_CHECKING:
    from ._handle_host import HandleHost
    from ._sequence_table import SequenceRecord

__all__ = ["PagedKvCacheHandle"]

H = TypeVar("H", bound=KvCacheHandle)


class PagedKvCacheHandle(KvCacheHandle):
    """A reference to one sequence in a :class:`~kvcore.KvCacheManager`."""

    __slots__ = ("_manager", "_seq")

    def __init__(self, manager: HandleHost, seq: SequenceRecord) -> None:
        self._manager = manager
        self._seq = seq

    def _live(self, op: str) -> HandleHost:
        manager = self._manager
        manager._access.require_live(self._seq, op)
        return manager

    # --- identity -----------------------------------------------------------------

    @property
    def request_id(self) -> str:
        return self._seq.request_id

    @property
    def manager(self) -> Any:
        """The :class:`~kvcore.KvCacheManager` this handle belongs to."""
        return self._manager

    def cache_id(self) -> str:
        return self._seq.cache_id

    def is_valid(self) -> bool:
        return self._seq.valid

    def as_any(self, cls: type[H] | None = None) -> Any:
        self._live("as_any")
        return super().as_any(cls)  # type: ignore[arg-type]

    def is_swapped(self) -> bool:
        """Whether the blocks are in the swap pool (``swap_in`` before data access)."""
        return self._live("is_swapped")._access.lengths(self._seq)[2]

    def clone_handle(self) -> PagedKvCacheHandle:
        self._live("clone_handle")
        return type(self)(self._manager, self._seq)

    # --- shape --------------------------------------------------------------------

    def device(self) -> Device:
        return self._live("device").config.device

    def num_layers(self) -> int:
        return self._live("num_layers").config.num_layers

    def num_heads(self) -> int:
        return self._live("num_heads").config.num_kv_heads

    def head_dim(self) -> int:
        return self._live("head_dim").config.head_dim

    # --- table --------------------------------------------------------------------

    def block_table(self) -> BlockTable:
        return self._manager._access.table(self._seq)

    def block_table_mut(self) -> BlockTable:
        """The live table, guarded: ``extend_sequence`` goes through the manager
        (copy-on-write included) and ``add_blocks`` is refused, because physical
        blocks come only from the manager's pool."""
        return self._manager._access.live_table(self._seq)

    def num_tokens(self) -> int:
        return self._live("num_tokens")._access.lengths(self._seq)[0]

    def num_cached_tokens(self) -> int:
        """Prompt tokens served from the prefix cache at allocation; their K/V were
        already written by an earlier sequence (or, when it joined a prefill in
        flight, will be), so prefill may skip them."""
        return self._live("num_cached_tokens")._access.lengths(self._seq)[1]

    def num_written(self, layer: int) -> int:
        """Tokens whose K/V have been written for ``layer`` (what a read returns)."""
        return self._manager._access.num_written(self._seq, layer)

    def token_ids(self) -> tuple[int, ...] | None:
        """The sequence's token ids, when every one was given (prompt and extends);
        ``None`` once a token was added without its id."""
        return self._manager._access.token_ids(self._seq)

    # --- data ---------------------------------------------------------------------

    def key_cache(self, layer: int) -> TensorRef | None:
        return self._manager._access.read(self._seq, layer, 0)

    def value_cache(self, layer: int) -> TensorRef | None:
        return self._manager._access.read(self._seq, layer, 1)

    def kv_cache(self, layer: int) -> tuple[TensorRef, TensorRef] | None:
        return self._manager._access.read_pair(self._seq, layer)

    def write(self, layer: int, key: Any, value: Any, *, start: int | None = None) -> None:
        """Shorthand for ``manager.write(self, layer, key, value, start=start)``."""
        self._manager.write(self, layer, key, value, start=start)

    def stats(self) -> CacheHandleStats:
        return self._manager._access.stats(self._seq)

    # --- copying ------------------------------------------------------------------

    def __copy__(self) -> PagedKvCacheHandle:
        raise NotCopyableError("a kvcore handle is a reference into its manager and is not "
                               "copied: use handle.clone_handle() for a second reference, "
                               "manager.fork(handle, new_id) for a copy-on-write copy")

    def __deepcopy__(self, memo: dict[int, Any]) -> PagedKvCacheHandle:
        return self.__copy__()

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise NotCopyableError("a kvcore handle cannot be pickled: it refers to a live "
                               "manager; use handle.clone_handle() for a second reference, "
                               "manager.fork(handle, new_id) for a copy-on-write copy, or "
                               "save the sequence with manager.save(path, [handle])")

    def __repr__(self) -> str:
        seq = self._seq
        if not seq.valid:
            return f"{type(self).__name__}(request_id={seq.request_id!r}, deallocated)"
        try:
            length, _, swapped = self._manager._access.lengths(seq)
        except Exception:  # noqa: BLE001 - repr must not raise
            return f"{type(self).__name__}(request_id={seq.request_id!r})"
        state = "swapped" if swapped else "valid"
        return f"{type(self).__name__}(request_id={seq.request_id!r}, tokens={length}, {state})"
