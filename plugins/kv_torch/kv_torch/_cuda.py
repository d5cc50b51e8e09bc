"""The torch backend's CUDA paths: index staging, stream order, transfers, pinned pools.

Nothing here runs for CPU pools.  What each part guarantees (also in
``docs/backends.md``):

* **Indices without a host sync.**  A pageable host -> device copy makes the host wait
  for the stream to drain (``torch`` calls ``cudaStreamSynchronize`` after a blocking
  copy).  :func:`to_device` copies the numpy data into pinned memory from torch's
  caching host allocator and enqueues a ``non_blocking`` copy: the host moves on at
  once, and the allocator keeps the pinned block until the copy has run (it records an
  event on it).
* **Stream order per pool.**  Every operation on a CUDA pool is enqueued on the
  *current stream of the pool's device* at the time of the call.  :class:`StreamOrder`
  remembers, on the pool tensor itself, the stream of the last operation (and the
  event of the last transfer); an operation on another stream first makes its stream
  wait for that one on the GPU (``wait_event`` / ``wait_stream``, never the host), so
  this backend's operations on one pool happen in call order whatever streams the
  callers use.  Index tensors remember the stream their copy was enqueued on, and a use
  on another stream waits for it too.
* **synchronize(device) waits on events, not the device.**  It waits, for every stream
  this backend used on ``device`` since the last call, for the last operation it queued
  there: the transfer's own event when that was a transfer, else an event recorded at
  the call.  Kernels others queued on other streams are not waited for.
* **Swap pools of exactly the asked size.**  torch's pinned allocator rounds every
  block up to a power of two and caches it for the life of the process (a 5 GiB swap
  pool would pin 8 GiB for good).  :func:`allocate_pinned` maps exactly the pool's
  bytes and page-locks them with ``cudaHostRegister``; :func:`release_pinned` (from
  ``release_layer``) unlocks them.
"""

from __future__ import annotations

import math
import mmap
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvcore._staging import StagingOps
from kvcore.errors import PoolAllocationError

__all__ = ["StreamOrder", "TorchStagingOps", "allocate_pinned", "ready", "release_pinned",
           "to_device"]

#: Attribute on a CUDA pool: ``(stream, event or None)`` of the last operation on it.
_LAST = "_kvcore_last_use"
#: Attribute on a CUDA index tensor: ``[stream it was copied on, keys of streams that
#: already waited for it]``.
_MADE_ON = "_kvcore_made_on"
#: Attribute on a swap pool pinned by :func:`allocate_pinned`: its unregistering finalizer.
_PINNED = "_kvcore_pinned"
#: ``cudaHostRegisterPortable``: page-locked for every CUDA context, not only the
#: current device's (a swap pool may serve a pool on any GPU).
_REGISTER_PORTABLE = 1


def _set(tensor: torch.Tensor, name: str, value: Any) -> None:
    try:
        setattr(tensor, name, value)
    except (AttributeError, RuntimeError):  # a tensor subclass refusing attributes
        pass


# --- host -> device without a host sync ----------------------------------------------------


def to_device(host: np.ndarray, device: torch.device) -> torch.Tensor:
    """A copy of ``host`` on CUDA ``device``, enqueued on that device's current stream
    without blocking the host (staged through pinned memory)."""
    src = torch.from_numpy(np.ascontiguousarray(host))
    if src.numel() == 0:
        return torch.empty(src.shape, dtype=src.dtype, device=device)
    try:
        pinned = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
    except RuntimeError:  # no pinned memory left: a blocking copy still gives the data
        return src.to(device)
    pinned.copy_(src)
    out = pinned.to(device, non_blocking=True)
    _set(out, _MADE_ON, [torch.cuda.current_stream(device), set()])
    return out


def ready(index: torch.Tensor, stream: Any) -> None:
    """Make ``stream`` wait (on the GPU) for the copy that filled ``index`` when that
    copy was enqueued on another stream, and tell the caching allocator the tensor is
    used there.  Free when ``index`` was made on ``stream`` or has already waited."""
    made = getattr(index, _MADE_ON, None)
    if made is None or made[0] == stream:
        return
    key = stream.cuda_stream
    if key not in made[1]:
        stream.wait_stream(made[0])
        index.record_stream(stream)
        made[1].add(key)


# --- stream order per pool -----------------------------------------------------------------


class StreamOrder:
    """This backend's operations on each CUDA pool, in call order across streams (see
    the module docstring).  Holds no pool: the state lives on the pool tensors, plus
    the streams used per device since the last :meth:`synchronize`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dirty: dict[int, dict[int, tuple[Any, Any]]] = {}

    def begin(self, pool: torch.Tensor, *indices: torch.Tensor) -> Any:
        """The stream to enqueue an operation on ``pool`` on, made to wait for the
        pool's previous operation and for ``indices``' copies."""
        stream = torch.cuda.current_stream(pool.device)
        last = getattr(pool, _LAST, None)
        if last is not None and last[0] != stream:
            if last[1] is not None:
                stream.wait_event(last[1])
            else:
                stream.wait_stream(last[0])
        for index in indices:
            if index.is_cuda:
                ready(index, stream)
        return stream

    def end(self, pool: torch.Tensor, stream: Any, event: Any = None) -> None:
        """Record that the last operation on ``pool`` was enqueued on ``stream``
        (``event``: recorded right after it, for a transfer)."""
        _set(pool, _LAST, (stream, event))
        with self._lock:
            self._dirty.setdefault(pool.device.index, {})[stream.cuda_stream] = (stream, event)

    def synchronize(self, device_index: int) -> None:
        """Block until the last operation on every stream used on the device has run."""
        with self._lock:
            work = self._dirty.pop(device_index, {})
        for stream, event in work.values():
            (event if event is not None else stream.record_event()).synchronize()


# --- transfers ---------------------------------------------------------------------------


class TorchStagingOps(StagingOps):
    """:class:`kvcore._staging.StagingOps` over torch tensors (CUDA pools, CPU pools)."""

    def take(self, pool: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return pool.index_select(1, index)

    def put(self, pool: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
        pool.index_copy_(1, index, values)

    def part(self, index: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return index[lo:hi]

    def to_host(self, src: torch.Tensor, parts: Sequence[torch.Tensor]) -> None:
        for p, part in enumerate(parts):
            part.copy_(src[p], non_blocking=True)

    def to_device(self, parts: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        out = torch.empty((len(parts), *parts[0].shape), dtype=like.dtype, device=like.device)
        for p, part in enumerate(parts):
            out[p].copy_(part, non_blocking=True)
        return out

    def to_peer(self, src: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # torch orders a device-to-device copy after both devices' current streams.
        return src.to(like.device, non_blocking=True)

    def record(self, like: torch.Tensor) -> Any:
        return torch.cuda.current_stream(like.device).record_event()

    def wait(self, event: Any) -> None:
        event.synchronize()

    def pinned(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(numel, dtype=like.dtype, pin_memory=True)

    def view(self, buffer: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return buffer[:math.prod(shape)].view(shape)

    def host_take(self, pool: torch.Tensor, ids: np.ndarray, out: torch.Tensor) -> None:
        torch.index_select(pool, 1, torch.from_numpy(ids), out=out)

    def host_put(self, pool: torch.Tensor, ids: np.ndarray, values: torch.Tensor) -> None:
        pool.index_copy_(1, torch.from_numpy(ids), values)

    def plane(self, array: torch.Tensor, p: int, lo: int | None = None,
              hi: int | None = None) -> torch.Tensor:
        return array[p, lo:hi]


def host_ids(index: torch.Tensor) -> np.ndarray:
    """The numpy ids of a CPU index tensor (or the host copy a CUDA one keeps)."""
    if index.is_cuda:
        kept = getattr(index, "_kvcore_host", None)
        if kept is not None:
            return kept[0]
        return index.cpu().numpy()  # a caller-made CUDA index: one sync to read it
    return index.numpy()


# --- swap pools of the asked size --------------------------------------------------------


def _unregister(ptr: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # noqa: BLE001, S110 - the memory is freed either way
        pass


def allocate_pinned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled host tensor of exactly ``shape``, page-locked for CUDA.

    Anonymous ``mmap`` gives page-aligned, zeroed pages that no other allocation
    shares (``cudaHostRegister`` locks whole pages), and exactly the bytes asked for
    (rounded up to a page); ``cudaHostRegister`` locks them.  The pages are unlocked
    by :func:`release_pinned`, or when the tensor is garbage collected.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = math.prod(shape) * itemsize
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    try:
        buffer = mmap.mmap(-1, nbytes)
    except (OSError, ValueError, OverflowError) as exc:
        raise PoolAllocationError(f"could not map {nbytes} bytes of host memory for a "
                                  f"pinned swap pool: {exc}") from exc
    flat = torch.frombuffer(buffer, dtype=torch.uint8)
    ptr = flat.data_ptr()
    cudart = torch.cuda.cudart()
    status = cudart.cudaHostRegister(ptr, nbytes, _REGISTER_PORTABLE)
    if status != cudart.cudaError.success:
        raise PoolAllocationError(
            f"cudaHostRegister could not page-lock {nbytes} bytes for a pinned swap pool "
            f"(error {int(status)}: {cudart.cudaGetErrorString(status)}); the host needs "
            "that much lockable memory free")
    pool = flat.view(dtype).view(shape)
    finalizer = weakref.finalize(pool, _unregister, ptr)
    finalizer.atexit = False  # at exit the process frees the pages anyway
    _set(pool, _PINNED, finalizer)
    return pool


def release_pinned(pool: torch.Tensor) -> None:
    """Unlock a pool made by :func:`allocate_pinned` now (a no-op for other tensors)."""
    finalizer = getattr(pool, _PINNED, None)
    if finalizer is not None:
        finalizer()
