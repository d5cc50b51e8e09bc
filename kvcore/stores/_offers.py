"""The deferred forms of blocks a connector queues: a block of a batch given as planes
(:meth:`StoreConnector.offer_planes`), and a block whose arrays are made on the
writer thread (:meth:`StoreConnector.offer_lazy`)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import StoreKeyError

__all__ = ["LazyBlock", "LazyJob", "PlaneBlock"]


class PlaneBlock:
    """Block ``index`` of :meth:`StoreConnector.offer_planes`' planes, as the sequence
    of arrays its value is made of (K and V of each layer, sliced when encoded, by
    the writer thread)."""

    __slots__ = ("_planes", "_index")

    def __init__(self, planes: Sequence[np.ndarray], index: int) -> None:
        self._planes = planes
        self._index = index

    def __len__(self) -> int:
        return len(self._planes)

    def __iter__(self) -> Any:
        index = self._index
        return (plane[index] for plane in self._planes)


class LazyJob:
    """The arrays of blocks offered with :meth:`StoreConnector.offer_lazy`, made once."""

    __slots__ = ("_produce", "_count", "_result", "_lock")

    def __init__(self, produce: Callable[[], Sequence[Any]], count: int) -> None:
        self._produce = produce
        self._count = count
        self._result: Sequence[Any] | BaseException | None = None
        self._lock = threading.Lock()

    def get(self, index: int) -> Any:
        """Block ``index``'s arrays, ``None`` (changed) or the exception ``produce``
        raised."""
        with self._lock:
            if self._result is None:
                try:
                    made = list(self._produce())
                    if len(made) != self._count:
                        raise StoreKeyError(f"produce returned {len(made)} blocks for "
                                            f"{self._count} offered")
                    self._result = made
                except Exception as exc:  # noqa: BLE001 - reported, never kills the writer
                    self._result = exc
                self._produce = None  # type: ignore[assignment]  # what it held can go
            result = self._result
        return result if isinstance(result, BaseException) else result[index]


class LazyBlock:
    """Block ``index`` of a :class:`LazyJob`."""

    __slots__ = ("job", "index")

    def __init__(self, job: LazyJob, index: int) -> None:
        self.job = job
        self.index = index
