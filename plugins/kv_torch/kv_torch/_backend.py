"""The torch backend: every contract operation is one or two tensor ops.

Pools are ``torch.Tensor``s on ``cpu`` or ``cuda:N``.  Scatter is ``index_copy_`` on
the pool viewed as ``[2, slots, heads, dim]``, gather is ``index_select``, block copies
are ``index_select`` + ``index_copy_`` along the block axis: no Python loop over tokens
or blocks anywhere.

Two fast paths, both exact (they move the same bytes as the plain ops):

* **Wide scatter.** ``index_copy_`` costs per *element* (~0.6 ns each for float16 on
  the CPU, dispatch-bound at decode sizes), so K/V rows are reinterpreted as the widest
  element whose size divides ``head_dim * itemsize`` (``complex128``: 16 bytes, down
  to ``int32``) before the copy.  A copy never does arithmetic on its elements, so the
  bits arrive unchanged; the view is taken only when the strides and the alignment of
  every tensor allow it, otherwise the native dtype is used.
* **Whole-block gather.** ``index_select`` copies one slice per index, with a fixed
  cost per slice; a read in logical order is runs of whole blocks starting on block
  boundaries, so it selects blocks (``block_size`` rows each) on the
  ``[2, blocks, block_size, H, D]`` layout and returns the first ``n`` rows, or clones
  one slice when the blocks are consecutive.  Whether an index is such a run is
  decided once per index tensor (on the host copy :meth:`TorchBackend.index_array`
  keeps, so a GPU index costs no device sync) and remembered on the tensor; the
  manager reuses a sequence's read index for every layer and for K and V.

CUDA pools (the code is in :mod:`kv_torch._cuda`; ``docs/backends.md`` says what is
verified on which hardware):

* **Streams.**  Every operation is enqueued on the current stream of the *pool's*
  device (whatever device is current), after this backend's previous operation on
  the same pool even when that ran on another stream (a GPU-side wait, never a host
  one).  K/V passed in must be ready on that stream, as for any torch op.
* **No hidden host sync.**  Index tensors are copied to the GPU through pinned memory
  with ``non_blocking=True``; a decode step's writes never block the host.
* **Swap** moves blocks in chunks of ``transfer_chunk_bytes`` (64 MiB by default;
  ``KVCORE_TRANSFER_CHUNK_BYTES``), so the GPU never holds more than two chunks of
  temporaries, asynchronously through pinned memory (directly into or out of the
  pinned swap pool when the host blocks are consecutive).  Host-side landings of
  GPU -> host copies are deferred: :meth:`TorchBackend.synchronize` (which the manager
  calls once after every swap) waits on the transfer's own events and lands them, and
  so does every other operation of this backend before it touches data.
* **synchronize(device)** waits for this backend's last operation on each stream it
  used on ``device`` (the transfer's event, or one recorded at the call), never
  ``torch.cuda.synchronize``: other streams' work is not waited for.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvcore import Backend, BackendCapabilities, Device, DType, TensorRef
from kvcore._array_ops import ArrayOps
from kvcore._backend import check_bits
from kvcore._staging import Pending, Transfer, chunk_bytes_from_env
from kvcore.errors import (DeviceMismatchError, DtypeMismatchError, PoolAllocationError,
                           UnsupportedError)

from . import _cuda
from ._array_ops import TORCH_DTYPES, TorchOps
from ._handle import TorchKvCacheHandle

__all__ = ["TorchBackend"]

#: Element types of pools and arrays (float8 values exist only inside the codecs).
_TORCH_DTYPES = {d: TORCH_DTYPES[d] for d in (DType.float16, DType.bfloat16, DType.float32,
                                              DType.uint8, DType.int8)}
_FROM_TORCH = {v: k for k, v in _TORCH_DTYPES.items()}
_CODECS = tuple(d for d in (DType.float8_e4m3, DType.float8_e5m2, DType.int8)
                if d in TORCH_DTYPES)
_CPU = Device("cpu")
#: Reads of at least this many blocks try the whole-block gather (below it the check
#: on a fresh index costs about what it saves).
_WHOLE_BLOCKS_FROM = 2
#: Element types to reinterpret K/V rows as for scatter, widest first (see the module
#: docstring), by element size in bytes.
_WIDE = ((16, torch.complex128), (8, torch.int64), (4, torch.int32))
#: Attribute names on index tensors made by :meth:`TorchBackend.index_array`.
_HOST_ATTR = "_kvcore_host"
_PLAN_ATTR = "_kvcore_gather_plan"


@functools.cache
def cuda_problem() -> str | None:
    """Why torch cannot use CUDA here, in torch's own words; ``None`` if it can.

    ``torch.cuda.is_available()`` is cheap and creates no context but says only
    ``False``; ``torch.cuda.init()`` raises with the reason (a CPU-only build, no
    driver, a driver too old), so it is called only once CUDA is known to be unusable.
    Cached: CUDA does not appear or vanish during a process.
    """
    if torch.cuda.is_available():
        return None
    try:
        torch.cuda.init()
    except Exception as exc:  # noqa: BLE001 - AssertionError, RuntimeError, ...: all are the reason
        return f"{type(exc).__name__}: {exc}"
    return "torch.cuda.is_available() returned False"


@functools.cache
def _torch_device(device: Device) -> torch.device:
    return torch.device("cpu") if device.type == "cpu" else torch.device("cuda", device.index)


def _kv_device(device: torch.device) -> Device:
    """The kvcore :class:`Device` of a torch device (``cuda`` without an index is the
    current CUDA device)."""
    if device.type == "cpu":
        return _CPU
    if device.type == "cuda" and device.index is None:
        return Device("cuda", torch.cuda.current_device())
    return Device(device.type, device.index or 0)


def _dlpack_device_name(dl_type: int, dl_id: int) -> str:
    try:
        return str(Device.from_dlpack(dl_type, dl_id))
    except ValueError:
        return f"DLPack device type {int(dl_type)}:{int(dl_id)}"


def _wide_dtype(pool: torch.Tensor, rows: Sequence[torch.Tensor]) -> torch.dtype | None:
    """The widest element type the pool and every row tensor can be viewed as along
    their last dim (``head_dim``) for a bit-exact copy, or ``None`` to copy in the
    native dtype."""
    row = pool.shape[-1] * pool.element_size()
    for size, dtype in _WIDE:
        if row % size == 0:
            # Aligned data (a misaligned wide element is undefined behaviour on the CPU
            # and a fault on CUDA) and a unit last stride; view() checks the rest.
            ptrs = pool.data_ptr()
            for r in rows:
                if r.stride(-1) != 1:
                    return None
                ptrs |= r.data_ptr()
            return dtype if ptrs % size == 0 else None
    return None


def _version(tensor: torch.Tensor) -> int | None:
    """The in-place version counter (inference tensors have none)."""
    return None if tensor.is_inference() else tensor._version


def _gather_plan(slots: torch.Tensor, block_size: int) -> tuple[int, Any, int] | None:
    """How to gather ``slots`` by whole blocks, or ``None`` to gather rows.

    The slots qualify when they are ``n`` consecutive rows of blocks ``b_0, b_1, ...``
    from the start of ``b_0``: ``slots[i] == b_(i // bs) * bs + i % bs``.  The plan is
    ``(n, blocks, first)``: ``blocks`` is the index of the blocks on the slots' device,
    or ``None`` when they are ``first, first + 1, ...`` (a slice).  Decided on the host
    once per index tensor (made by :meth:`TorchBackend.index_array`) and block size,
    and remembered on the tensor; a CPU index modified in place since is re-checked
    (its version counter moved).
    """
    n = slots.shape[0] if slots.dim() == 1 else -1
    if n < _WHOLE_BLOCKS_FROM * block_size or n <= 0:
        return None
    version = _version(slots)
    cached = getattr(slots, _PLAN_ATTR, None)
    if cached is not None and cached[0] == block_size and cached[1] == version:
        return cached[2]
    kept = getattr(slots, _HOST_ATTR, None)
    if kept is not None and kept[1] == version:
        host = kept[0]
    elif slots.device.type == "cpu" and slots.dtype == torch.int64:
        host = slots.numpy()
    else:
        return None  # a device index without its host copy: rows, no sync
    plan = None
    firsts = host[::block_size]
    if not (firsts % block_size).any():
        runs = firsts[:, None] + np.arange(block_size, dtype=np.int64)
        if np.array_equal(runs.reshape(-1)[:n], host):
            ids = firsts // block_size
            if ids.shape[0] == 1 or (np.diff(ids) == 1).all():
                plan = (n, None, int(ids[0]))
            elif slots.is_cuda:
                plan = (n, _cuda.to_device(ids, slots.device), 0)
            else:
                plan = (n, torch.from_numpy(ids), 0)
    try:
        setattr(slots, _PLAN_ATTR, (block_size, version, plan))
    except (AttributeError, RuntimeError):  # a tensor subclass refusing attributes
        pass
    return plan


class TorchBackend(Backend):
    """Paged K/V pools as torch tensors on the CPU or a CUDA device."""

    name = "torch"
    array_library = "torch"
    api_version = 2
    handle_class = TorchKvCacheHandle

    def __init__(self) -> None:
        self._caps: BackendCapabilities | None = None
        #: Transfers still in flight (host-side landings of GPU -> host copies, events
        #: of host -> GPU ones), finished before any operation touches data.
        self._pending: list[Pending] = []
        self._pending_lock = threading.Lock()
        self._order = _cuda.StreamOrder()
        self._staging_ops = _cuda.TorchStagingOps()
        #: Bytes one chunk of a swap moves (see :mod:`kvcore._staging`).
        self.transfer_chunk_bytes = chunk_bytes_from_env()

    # --- availability -------------------------------------------------------------

    def capabilities(self) -> BackendCapabilities:
        if self._caps is None:
            cuda = cuda_problem() is None
            devices = ("cpu", "cuda") if cuda else ("cpu",)
            self._caps = BackendCapabilities(
                device_types=devices,
                dtypes=(DType.float16, DType.bfloat16, DType.float32, DType.uint8, DType.int8),
                codecs=_CODECS,
                unsupported_codecs={d: f"torch {torch.__version__} has no {d.value} dtype"
                                    for d in (DType.float8_e4m3, DType.float8_e5m2)
                                    if d not in _CODECS},
                swap_device_types=devices,
                dlpack=True,
                pinned_memory=cuda,
            )
        return self._caps

    def check_device(self, device: Device) -> None:
        """Accept ``cpu`` always and ``cuda:N`` when torch can use CUDA device ``N``;
        otherwise raise :class:`~kvcore.errors.UnsupportedError` with torch's reason."""
        if device.type == "cpu":
            return
        problem = cuda_problem()
        if problem is not None:
            raise UnsupportedError(f"backend 'torch' cannot place a pool on {device}: torch "
                                   f"cannot use CUDA here ({problem}); use device 'cpu'")
        count = torch.cuda.device_count()
        if device.index >= count:
            raise UnsupportedError(f"backend 'torch' cannot place a pool on {device}: torch "
                                   f"sees {count} CUDA device(s), cuda:0..cuda:{count - 1}")

    # --- pools --------------------------------------------------------------------

    def allocate_layer(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int, dtype: DType, device: Device, *,
                       pinned: bool = False, planes: int = 2) -> torch.Tensor:
        """A zeroed pool layer.  ``pinned`` host memory is used only when CUDA is usable
        (pinning needs the CUDA driver); without CUDA there is no GPU pool to serve."""
        self.check_device(device)
        self.check_dtype(dtype)
        pin = pinned and device.type == "cpu" and cuda_problem() is None
        shape = (planes, num_blocks, block_size, num_kv_heads, head_dim)
        # A manager built inside ``torch.inference_mode()`` must still be writable
        # outside it: inference tensors refuse in-place updates in normal mode.
        try:
            with torch.inference_mode(False):
                if pin:  # exactly the asked bytes, not torch's power-of-two block
                    return _cuda.allocate_pinned(shape, _TORCH_DTYPES[dtype])
                pool = torch.zeros(shape, dtype=_TORCH_DTYPES[dtype],
                                   device=_torch_device(device))
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
            raise PoolAllocationError(f"torch could not allocate a pool of {nbytes} bytes on "
                                      f"{device} (shape {list(shape)}, {dtype.value}): "
                                      f"{exc}") from exc
        if pool.is_cuda:  # the zero fill is queued: a first use on another stream waits
            self._order.end(pool, torch.cuda.current_stream(pool.device))
        return pool

    def release_layer(self, pool: torch.Tensor) -> None:
        """Unlock the pages of a pinned swap pool now (other pools: garbage collection)."""
        if pool.device.type == "cpu":
            _cuda.release_pinned(pool)

    def index_array(self, indices: np.ndarray, device: Device) -> torch.Tensor:
        # Copied (np.array) so the index never aliases an array the caller may reuse.
        host = np.array(indices, dtype=np.int64, copy=True)
        if device.type != "cpu":
            # Through pinned memory, non_blocking: a pageable copy would wait for the
            # GPU's queue to drain, once per write.
            index = _cuda.to_device(host, _torch_device(device))
            # The host copy, for the whole-block check in gather (no device sync), with
            # the version it matches (an index changed in place since is not trusted).
            setattr(index, _HOST_ATTR, (host, _version(index)))
            return index
        return torch.from_numpy(host)

    @staticmethod
    def _flat(pool: torch.Tensor) -> torch.Tensor:
        # [P, blocks, block_size, H, D] -> [P, blocks * block_size, H, D]: a view, since
        # pools are contiguous, so a slot is a plain row index.
        return pool.flatten(1, 2)

    def scatter(self, pool: torch.Tensor, slots: torch.Tensor,
                rows: Sequence[torch.Tensor]) -> torch.Tensor:
        if self._pending:
            self._finish_pending()
        if pool.is_cuda:
            stream = self._order.begin(pool, slots)
            self._scatter_rows(pool, slots, rows)
            self._order.end(pool, stream)
            return pool
        return self._scatter_rows(pool, slots, rows)

    def _scatter_rows(self, pool: torch.Tensor, slots: torch.Tensor,
                      rows: Sequence[torch.Tensor]) -> torch.Tensor:
        # detach: a K/V that requires grad must not drag the pool into the autograd graph.
        rows = [r.detach() for r in rows]
        wide = _wide_dtype(pool, rows)
        if wide is not None:
            try:
                planes = pool.view(wide).flatten(1, 2).unbind(0)
                wide_rows = [r.view(wide) for r in rows]
            except RuntimeError:  # strides a dtype view cannot express: copy natively
                pass
            else:
                for plane, values in zip(planes, wide_rows):
                    plane.index_copy_(0, slots, values)
                return pool
        for plane, values in zip(self._flat(pool).unbind(0), rows):
            plane.index_copy_(0, slots, values)
        return pool

    def gather(self, pool: torch.Tensor, plane: int, slots: torch.Tensor) -> torch.Tensor:
        if self._pending:
            self._finish_pending()
        if pool.is_cuda:
            stream = self._order.begin(pool, slots)
            out = self._gather_rows(pool, plane, slots)
            self._order.end(pool, stream)  # a later write on another stream waits for it
            return out
        return self._gather_rows(pool, plane, slots)

    def gather_blocks(self, pool: torch.Tensor, plane: int,
                      blocks: torch.Tensor) -> torch.Tensor:
        if self._pending:
            self._finish_pending()
        if pool.is_cuda:
            stream = self._order.begin(pool, blocks)
            out = self._gather_whole(pool, plane, blocks)
            self._order.end(pool, stream)
            return out
        return self._gather_whole(pool, plane, blocks)

    @staticmethod
    def _gather_whole(pool: torch.Tensor, plane: int, blocks: torch.Tensor) -> torch.Tensor:
        # One indexed read of whole blocks (block_size rows per index), then its shape.
        flat = pool[plane].index_select(0, blocks.reshape(-1))
        return flat.reshape(*blocks.shape, *pool.shape[2:])

    def _gather_rows(self, pool: torch.Tensor, plane: int, slots: torch.Tensor) -> torch.Tensor:
        if slots.dim() != 1:  # a rectangle of slots: one indexed read, then its shape
            flat = self._flat(pool)[plane].index_select(0, slots.reshape(-1))
            return flat.reshape(*slots.shape, *pool.shape[3:])
        gather_plan = _gather_plan(slots, pool.shape[2])
        if gather_plan is not None:
            n, blocks, first = gather_plan
            if blocks is None:  # consecutive blocks: one slice, one copy
                whole = pool[plane, first:first + -(-n // pool.shape[2])].clone()
            else:
                if blocks.is_cuda:  # a plan made earlier, maybe on another stream
                    _cuda.ready(blocks, torch.cuda.current_stream(blocks.device))
                whole = pool[plane].index_select(0, blocks)
            return whole.flatten(0, 1)[:n]
        return self._flat(pool)[plane].index_select(0, slots)

    def copy_blocks(self, pool: torch.Tensor, src: torch.Tensor,
                    dst: torch.Tensor) -> torch.Tensor:
        if self._pending:
            self._finish_pending()
        if pool.is_cuda:
            stream = self._order.begin(pool, src, dst)
            pool.index_copy_(1, dst, pool.index_select(1, src))
            self._order.end(pool, stream)
            return pool
        # index_select makes a new tensor first, so overlapping src/dst copy correctly.
        pool.index_copy_(1, dst, pool.index_select(1, src))
        return pool

    def transfer_blocks(self, src_pool: torch.Tensor, src: torch.Tensor,
                        dst_pool: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        if self._pending:
            self._finish_pending()
        if src_pool.is_cuda or dst_pool.is_cuda:
            return self._transfer_cuda([src_pool], src, [dst_pool], dst)[0]
        dst_pool.index_copy_(1, dst, src_pool.index_select(1, src))
        return dst_pool

    def transfer_blocks_layers(self, src_pools: Sequence[torch.Tensor], src: torch.Tensor,
                               dst_pools: Sequence[torch.Tensor],
                               dst: torch.Tensor) -> list[torch.Tensor]:
        """Every layer of a swap in one call: the chunks of all layers share two
        pinned staging buffers, and the host lands each chunk while the next copies."""
        if src_pools and (src_pools[0].is_cuda or dst_pools[0].is_cuda):
            if self._pending:
                self._finish_pending()
            return self._transfer_cuda(src_pools, src, dst_pools, dst)
        return super().transfer_blocks_layers(src_pools, src, dst_pools, dst)

    def _transfer_cuda(self, src_pools: Sequence[torch.Tensor], src: torch.Tensor,
                       dst_pools: Sequence[torch.Tensor], dst: torch.Tensor) -> list[torch.Tensor]:
        """Chunked transfers with a GPU on at least one side (see :mod:`kvcore._staging`)."""
        transfer = Transfer(self._staging_ops, self.transfer_chunk_bytes)
        order = self._order
        s_dev, d_dev = src_pools[0].device, dst_pools[0].device
        try:
            if d_dev.type == "cpu":  # swap out
                ids = _cuda.host_ids(dst)
                for s_pool, d_pool in zip(src_pools, dst_pools):
                    stream = order.begin(s_pool, src)
                    transfer.d2h(s_pool, src, d_pool, ids)
                    order.end(s_pool, stream)
            elif s_dev.type == "cpu":  # swap in
                ids = _cuda.host_ids(src)
                for s_pool, d_pool in zip(src_pools, dst_pools):
                    stream = order.begin(d_pool, dst)
                    transfer.h2d(s_pool, ids, d_pool, dst)
                    order.end(d_pool, stream, transfer.last_event)
            else:
                for s_pool, d_pool in zip(src_pools, dst_pools):
                    s_stream = order.begin(s_pool, src)
                    d_stream = order.begin(d_pool, dst)
                    transfer.d2d(s_pool, src, d_pool, dst, peer=s_dev != d_dev)
                    order.end(d_pool, d_stream)
                    order.end(s_pool, s_stream)
        except BaseException as exc:
            transfer.abort()
            if isinstance(exc, torch.OutOfMemoryError) or (
                    isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()):
                raise PoolAllocationError(
                    f"torch ran out of memory moving {int(src.numel())} blocks per layer "
                    f"from {s_dev} to {d_dev} in chunks of {self.transfer_chunk_bytes} "
                    f"bytes: {exc}; the destination blocks hold partial data") from exc
            raise
        jobs = transfer.close()
        if jobs:
            with self._pending_lock:
                self._pending.extend(jobs)
        return list(dst_pools)

    def _finish_pending(self) -> None:
        """Wait for in-flight transfers and land GPU -> host copies in their pools."""
        with self._pending_lock:
            pending, self._pending = self._pending, []
            for job in pending:
                job.finish(self._staging_ops)

    def synchronize(self, device: Device) -> None:
        """Wait until every operation this backend queued for ``device`` has run and
        every transfer to it has landed: the last operation on each CUDA stream it used
        there (the transfer's own event, never the whole device), and the deferred
        host-side landings of GPU -> host copies."""
        if device.is_cuda and cuda_problem() is None:
            self._order.synchronize(device.index)
        if self._pending:
            self._finish_pending()

    # --- arrays -------------------------------------------------------------------

    def describe(self, array: Any) -> tuple[tuple[int, ...], DType | None, Device]:
        if not isinstance(array, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(array).__name__}")
        return tuple(array.shape), _FROM_TORCH.get(array.dtype), _kv_device(array.device)

    def asarray(self, obj: Any, device: Device) -> torch.Tensor:
        """``obj`` as a tensor on ``device`` without copying.

        Tensors (and :class:`~kvcore.TensorRef`s holding one) pass through; anything
        else speaking DLPack (numpy, cupy, jax) goes through ``torch.from_dlpack`` and
        shares its memory.  A CUDA producer is imported with its GPU made current, so
        a ``cuda:1`` array imports while ``cuda:0`` is current, and the producer orders
        its work before torch's current stream of that GPU.  Read-only numpy arrays are
        shared too (the cache only reads K/V), and so are ``ml_dtypes.bfloat16`` numpy
        arrays (the kv_numpy backend's bfloat16), through an int16 view.  One exception:
        an array with negative strides (``a[::-1]``) is copied once first, keeping its
        dtype, because DLPack import in torch cannot represent it.
        """
        if isinstance(obj, TensorRef) and isinstance(obj.native, torch.Tensor):
            obj = obj.native
        if isinstance(obj, torch.Tensor):
            where = _kv_device(obj.device)
            if where != device:
                raise DeviceMismatchError(f"tensor is on {obj.device}, the cache is on "
                                          f"{device}; move it first with .to({str(device)!r})")
            return obj
        if not (hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__")):
            raise TypeError(f"expected a torch.Tensor or an array speaking DLPack "
                            f"(__dlpack__), got {type(obj).__name__}")
        where = _dlpack_device_name(*obj.__dlpack_device__())
        if where != str(device):
            raise DeviceMismatchError(f"{type(obj).__name__} array is on {where}, the cache "
                                      f"is on {device}; move it to {device} first")
        strides = getattr(obj, "strides", None)
        if isinstance(strides, tuple) and any(s < 0 for s in strides):
            # torch.from_dlpack aborts the process on negative strides (torch 2.x).
            obj = obj.copy()
        if isinstance(obj, np.ndarray) and obj.dtype.name == "bfloat16" and device.is_cpu:
            # ml_dtypes' bfloat16 has no DLPack code; its bits are torch's bfloat16:
            # shared without a copy through a 16-bit integer view (a non-contiguous one
            # is copied once first).
            return torch.from_numpy(np.ascontiguousarray(obj).view(np.int16)).view(torch.bfloat16)
        try:
            if device.is_cuda:
                with torch.cuda.device(device.index):
                    return torch.from_dlpack(obj)
            return torch.from_dlpack(obj)
        except (BufferError, RuntimeError) as exc:
            if isinstance(obj, np.ndarray):  # e.g. a read-only array on numpy < 2
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # "not writable": we only read
                    return torch.as_tensor(obj)
            dtype = str(getattr(obj, "dtype", ""))
            if "Unsupported dtype" in str(exc) or "dtype" in str(exc).lower():
                raise DtypeMismatchError(f"torch could not import the {type(obj).__name__} "
                                         f"of dtype {dtype or '?'} through DLPack: "
                                         f"{exc}") from exc
            raise TypeError(f"torch could not import the {type(obj).__name__} through "
                            f"DLPack: {type(exc).__name__}: {exc}") from exc

    def to_numpy(self, array: torch.Tensor) -> np.ndarray:
        """A host copy; ``bfloat16`` is widened to ``float32`` (numpy has no bf16)."""
        if not isinstance(array, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(array).__name__}")
        if self._pending:
            self._finish_pending()
        if array.is_cuda:  # a pool: after this backend's last operation on it
            self._order.begin(array)
        tensor = array.detach()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return tensor.cpu().numpy().copy()

    def from_numpy(self, array: np.ndarray, dtype: DType, device: Device) -> torch.Tensor:
        self.check_device(device)
        self.check_dtype(dtype)
        if dtype is DType.bfloat16:
            # torch's float32 -> bfloat16 conversion turns every NaN into 0xFFFF; convert
            # the bits here so a NaN keeps its sign and payload (bit-exact K/V).
            bits = _bfloat16_bits(np.asarray(array, dtype=np.float32))
            host = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
            return host.to(device=_torch_device(device))
        # np.array copies: the result must not alias the caller's array.
        host = torch.from_numpy(np.array(array, copy=True, order="C"))
        return host.to(device=_torch_device(device), dtype=_TORCH_DTYPES[dtype])

    def from_bits(self, bits: np.ndarray, dtype: DType, device: Device) -> torch.Tensor:
        """Reinterprets the bits with a view, so bfloat16 NaN payloads survive too (the
        default's float32 -> bfloat16 conversion would canonicalise them)."""
        self.check_device(device)
        self.check_dtype(dtype)
        bits = check_bits(bits, dtype)
        # torch has no unsigned views of every width: the signed twin holds the same bits.
        signed = bits.view({4: np.int32, 2: np.int16, 1: np.int8}[dtype.itemsize])
        host = torch.from_numpy(signed.copy()).view(_TORCH_DTYPES[dtype])
        return host.to(device=_torch_device(device))

    def array_ops(self) -> ArrayOps:
        return _OPS


_OPS = TorchOps(torch)


def _bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """The bfloat16 bits (uint16) of float32 ``values``: rounded to nearest even like
    torch's conversion, but a NaN keeps its sign and the top of its payload (made quiet
    only when truncation would leave no payload, which would read as infinity)."""
    b = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    top = (b >> np.uint32(16)).astype(np.uint16)
    with np.errstate(over="ignore"):
        rounded = ((b + np.uint32(0x7FFF) + (top & np.uint16(1))) >> np.uint32(16)).astype(np.uint16)
    nan = (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    kept = np.where((top & np.uint16(0x7F)) == 0, top | np.uint16(0x40), top)
    return np.where(nan, kept, rounded).astype(np.uint16)
