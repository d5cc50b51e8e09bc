"""The cupy backend's device paths: the kernel probe, stream order, staged transfers and
pinned swap pools of the asked size.  What each guarantees is in the backend's module
docstring and ``docs/backends.md``; none of it has run on a GPU in this repository's CI
(see there for what is verified where).
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import cupy
import cupyx
import numpy as np

from kvcore._staging import StagingOps

__all__ = ["CupyStagingOps", "StreamOrder", "allocate_pinned", "probe_kernels"]


def probe_kernels(device_index: int) -> None:
    """Run the backend's indexed kernels once on ``device_index`` and check the result.

    A pool is allocated with a memset, which needs no compiler; the first scatter and
    gather are CuPy kernels compiled at run time by NVRTC (and need the CUDA headers),
    which CuPy 14 wheels do not bring unless installed with the ``[ctk]`` extra.  So
    this is what proves cupy can serve a cache here; whatever it raises is the reason.
    """
    rows = np.array([[1.5, -2.0], [3.25, 0.5]], np.float16)
    with cupy.cuda.Device(device_index):
        index = cupy.asarray(np.array([2, 0], np.int64))
        pool = cupy.zeros((3, 2), np.float16)
        pool[index] = cupy.asarray(rows)          # scatter kernel
        back = cupy.asnumpy(pool.take(index, axis=0))  # gather kernel, then a blocking copy
    if not np.array_equal(back, rows):
        raise RuntimeError(f"a scatter then gather on cuda:{device_index} returned "
                           f"{back.tolist()}, expected {rows.tolist()}")


# --- stream order per pool ----------------------------------------------------------------


class _WeakIdTable:
    """``obj -> list`` keyed by identity, dropping entries when ``obj`` dies (cupy
    arrays take no attributes and compare element-wise, so no WeakKeyDictionary)."""

    def __init__(self) -> None:
        self._data: dict[int, list[Any]] = {}

    def get(self, obj: Any) -> list[Any] | None:
        entry = self._data.get(id(obj))
        return entry if entry is not None and entry[0]() is obj else None

    def put(self, obj: Any, *values: Any) -> None:
        entry = self.get(obj)
        if entry is not None:
            entry[1:] = values
            return
        key, data = id(obj), self._data
        self._data[key] = [weakref.ref(obj, lambda _r: data.pop(key, None)), *values]


class StreamOrder:
    """This backend's operations on each pool, in call order across streams.

    Every operation runs under ``with pool.device`` on that device's current stream;
    when the pool's previous operation ran on another stream, the new one first waits
    for it on the GPU (``Stream.wait_event``; the host never blocks).  Index arrays
    remember the stream their copy was enqueued on, and a use on another stream waits
    for it.  Call :meth:`begin` and :meth:`end` with the pool's device current.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pools = _WeakIdTable()  # pool -> [ref, stream, event or None]
        self._made = _WeakIdTable()  # index -> [ref, stream, ptrs of streams that waited]
        self._dirty: dict[int, dict[int, tuple[Any, Any]]] = {}

    def made(self, index: Any) -> None:
        """``index`` was just copied to the device on the current stream."""
        with self._lock:
            self._made.put(index, cupy.cuda.get_current_stream(), set())

    def begin(self, pool: Any, *indices: Any) -> Any:
        stream = cupy.cuda.get_current_stream()
        with self._lock:
            last = self._pools.get(pool)
            if last is not None and last[1] != stream:
                stream.wait_event(last[2] if last[2] is not None else last[1].record())
            for index in indices:
                made = self._made.get(index)
                if made is not None and made[1] != stream and stream.ptr not in made[2]:
                    stream.wait_event(made[1].record())
                    made[2].add(stream.ptr)
        return stream

    def end(self, pool: Any, stream: Any, event: Any = None) -> None:
        with self._lock:
            self._pools.put(pool, stream, event)
            self._dirty.setdefault(int(pool.device.id), {})[stream.ptr] = (stream, event)

    def synchronize(self, device_index: int) -> None:
        """Block until the last operation on each stream used on the device has run
        (the transfer's own event where that was a transfer); never the whole device."""
        with self._lock:
            work = self._dirty.pop(device_index, {})
        if work:
            with cupy.cuda.Device(device_index):
                for stream, event in work.values():
                    (event if event is not None else stream.record()).synchronize()


# --- transfers ---------------------------------------------------------------------------


class CupyStagingOps(StagingOps):
    """:class:`kvcore._staging.StagingOps` over cupy pools and numpy host pools.

    Device -> host copies are ``ndarray.get(out=pinned, blocking=False)`` and host ->
    device ``ndarray.set(pinned, stream)``: asynchronous because the host side is
    pinned (the swap pool itself, or a staging buffer from CuPy's pinned pool that the
    transfer keeps referenced until the copy's event has completed).
    """

    def take(self, pool: Any, index: Any) -> Any:
        with pool.device:
            return pool.take(index, axis=1)

    def put(self, pool: Any, index: Any, values: Any) -> None:
        with pool.device:
            pool[:, index] = values

    def part(self, index: Any, lo: int, hi: int) -> Any:
        return index[lo:hi]

    def to_host(self, src: Any, parts: Sequence[np.ndarray]) -> None:
        with src.device:
            stream = cupy.cuda.get_current_stream()
            for p, part in enumerate(parts):
                src[p].get(stream=stream, out=part, blocking=False)

    def to_device(self, parts: Sequence[np.ndarray], like: Any) -> Any:
        with like.device:
            stream = cupy.cuda.get_current_stream()
            out = cupy.empty((len(parts), *parts[0].shape), like.dtype)
            for p, part in enumerate(parts):
                out[p].set(part, stream=stream)
            return out

    def to_peer(self, src: Any, like: Any) -> Any:
        with src.device:
            src_stream = cupy.cuda.get_current_stream()
            ready = src_stream.record()
        with like.device:
            dst_stream = cupy.cuda.get_current_stream()
            dst_stream.wait_event(ready)
            out = cupy.empty(src.shape, src.dtype)
            out.data.copy_from_device_async(src.data, src.nbytes, dst_stream)
            done = dst_stream.record()
        with src.device:
            # src's memory returns to its stream's pool when freed: nothing queued there
            # later may reuse it before the copy has read it.
            src_stream.wait_event(done)
        return out

    def record(self, like: Any) -> Any:
        with like.device:
            return cupy.cuda.get_current_stream().record()

    def wait(self, event: Any) -> None:
        event.synchronize()

    def pinned(self, numel: int, like: Any) -> np.ndarray:
        return cupyx.empty_pinned((numel,), like.dtype)

    def view(self, buffer: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return buffer[:math.prod(shape)].reshape(shape)

    def host_take(self, pool: np.ndarray, ids: np.ndarray, out: np.ndarray) -> None:
        np.take(pool, ids, axis=1, out=out)

    def host_put(self, pool: np.ndarray, ids: np.ndarray, values: np.ndarray) -> None:
        pool[:, ids] = values

    def plane(self, array: Any, p: int, lo: int | None = None, hi: int | None = None) -> Any:
        return array[p, lo:hi]


# --- swap pools of the asked size --------------------------------------------------------


def allocate_pinned(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A zero-filled numpy array of ``shape`` in pinned host memory of exactly its size.

    ``cupyx.zeros_pinned`` draws from CuPy's pinned memory pool, which rounds every
    block up to a power of two and keeps it for the process; a swap pool gets its own
    ``cudaHostAlloc`` (portable: page-locked for every GPU), freed with the array.
    """
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype)
    memory = cupy.cuda.PinnedMemory(nbytes, cupy.cuda.runtime.hostAllocPortable)
    array = np.ndarray(shape, dtype, buffer=cupy.cuda.PinnedMemoryPointer(memory, 0))
    array[...] = 0  # cudaHostAlloc does not clear
    return array
