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

Cross-device transfers (swap, ``move``):

* host -> GPU: the picked blocks are gathered straight into a pinned staging buffer,
  then copied with ``non_blocking=True``; the scatter on the GPU is stream-ordered
  after the copy, so nothing waits on the host.  PyTorch's pinned-memory allocator
  keeps the staging buffer alive until the copy has finished.
* GPU -> host: the blocks are gathered on the GPU and copied ``non_blocking`` into a
  pinned staging buffer; a CUDA event marks the end.  The host-side scatter into the
  destination pool must wait for that event, so it is deferred: :meth:`synchronize`
  (which the manager calls once after transferring every layer) waits and finishes
  it, and so does every other operation of this backend before it touches data.
  That way the copies of all layers overlap, and no caller can see half a transfer.
* GPU -> GPU (another index): ``Tensor.to`` orders the two devices' streams itself.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvcore import Backend, BackendCapabilities, Device, DType
from kvcore._array_ops import ArrayOps
from kvcore._backend import check_bits
from kvcore.errors import (DeviceMismatchError, DtypeMismatchError, PoolAllocationError,
                           UnsupportedError)

from ._array_ops import TorchOps
from ._handle import TorchKvCacheHandle

__all__ = ["TorchBackend"]

_TORCH_DTYPES = {DType.float16: torch.float16, DType.bfloat16: torch.bfloat16,
                 DType.float32: torch.float32}
_FROM_TORCH = {v: k for k, v in _TORCH_DTYPES.items()}
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
            else:
                plan = (n, torch.from_numpy(ids).to(slots.device), 0)
    try:
        setattr(slots, _PLAN_ATTR, (block_size, version, plan))
    except (AttributeError, RuntimeError):  # a tensor subclass refusing attributes
        pass
    return plan


@dataclass
class _PendingHostScatter:
    """A GPU -> host transfer whose data is still in flight (see the module docstring)."""

    done: Any  # torch.cuda.Event recorded after the copy into ``staging``
    staging: torch.Tensor
    dst_layer: torch.Tensor
    dst: torch.Tensor


class TorchBackend(Backend):
    """Paged K/V pools as torch tensors on the CPU or a CUDA device."""

    name = "torch"
    array_library = "torch"
    api_version = 2
    handle_class = TorchKvCacheHandle

    def __init__(self) -> None:
        self._caps: BackendCapabilities | None = None
        self._pending: list[_PendingHostScatter] = []
        self._pending_lock = threading.Lock()

    # --- availability -------------------------------------------------------------

    def capabilities(self) -> BackendCapabilities:
        if self._caps is None:
            cuda = cuda_problem() is None
            devices = ("cpu", "cuda") if cuda else ("cpu",)
            self._caps = BackendCapabilities(
                device_types=devices,
                dtypes=(DType.float16, DType.bfloat16, DType.float32),
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
                return torch.zeros(shape, dtype=_TORCH_DTYPES[dtype],
                                   device=_torch_device(device), pin_memory=pin)
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
            raise PoolAllocationError(f"torch could not allocate a pool of {nbytes} bytes on "
                                      f"{device} (shape {list(shape)}, {dtype.value}): "
                                      f"{exc}") from exc

    def index_array(self, indices: np.ndarray, device: Device) -> torch.Tensor:
        # Copied (np.array) so the index never aliases an array the caller may reuse.
        host = np.array(indices, dtype=np.int64, copy=True)
        index = torch.from_numpy(host)
        if device.type != "cpu":
            index = index.to(_torch_device(device))
            # The host copy, for the whole-block check in gather (no device sync), with
            # the version it matches (an index changed in place since is not trusted).
            setattr(index, _HOST_ATTR, (host, _version(index)))
        return index

    @staticmethod
    def _flat(pool: torch.Tensor) -> torch.Tensor:
        # [P, blocks, block_size, H, D] -> [P, blocks * block_size, H, D]: a view, since
        # pools are contiguous, so a slot is a plain row index.
        return pool.flatten(1, 2)

    def scatter(self, pool: torch.Tensor, slots: torch.Tensor,
                rows: Sequence[torch.Tensor]) -> torch.Tensor:
        if self._pending:
            self._finish_pending()
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
        if slots.dim() != 1:  # a rectangle of slots: one indexed read, then its shape
            flat = self._flat(pool)[plane].index_select(0, slots.reshape(-1))
            return flat.reshape(*slots.shape, *pool.shape[3:])
        gather_plan = _gather_plan(slots, pool.shape[2])
        if gather_plan is not None:
            n, blocks, first = gather_plan
            if blocks is None:  # consecutive blocks: one slice, one copy
                whole = pool[plane, first:first + -(-n // pool.shape[2])].clone()
            else:
                whole = pool[plane].index_select(0, blocks)
            return whole.flatten(0, 1)[:n]
        return self._flat(pool)[plane].index_select(0, slots)

    def copy_blocks(self, pool: torch.Tensor, src: torch.Tensor,
                    dst: torch.Tensor) -> torch.Tensor:
        if self._pending:
            self._finish_pending()
        # index_select makes a new tensor first, so overlapping src/dst copy correctly.
        pool.index_copy_(1, dst, pool.index_select(1, src))
        return pool

    def transfer_blocks(self, src_pool: torch.Tensor, src: torch.Tensor,
                        dst_pool: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        if self._pending:
            self._finish_pending()
        s_dev, d_dev = src_pool.device, dst_pool.device
        if s_dev == d_dev:
            dst_pool.index_copy_(1, dst, src_pool.index_select(1, src))
        elif d_dev.type == "cpu":
            self._device_to_host(src_pool, src, dst_pool, dst)
        elif s_dev.type == "cpu":
            staging = torch.empty((src_pool.shape[0], src.numel(), *src_pool.shape[2:]),
                                  dtype=src_pool.dtype, pin_memory=True)
            torch.index_select(src_pool, 1, src, out=staging)
            dst_pool.index_copy_(1, dst, staging.to(d_dev, non_blocking=True))
        else:
            moved = src_pool.index_select(1, src).to(d_dev, non_blocking=True)
            dst_pool.index_copy_(1, dst, moved)
        return dst_pool

    def _device_to_host(self, src_layer: torch.Tensor, src: torch.Tensor,
                        dst_layer: torch.Tensor, dst: torch.Tensor) -> None:
        picked = src_layer.index_select(1, src)
        staging = torch.empty(picked.shape, dtype=picked.dtype, pin_memory=True)
        staging.copy_(picked, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(src_layer.device))
        with self._pending_lock:
            self._pending.append(_PendingHostScatter(done, staging, dst_layer, dst))

    def _finish_pending(self) -> None:
        """Wait for in-flight GPU -> host copies and scatter them into their pools."""
        with self._pending_lock:
            pending, self._pending = self._pending, []
            for job in pending:
                job.done.synchronize()
                job.dst_layer.index_copy_(1, job.dst, job.staging)

    def synchronize(self, device: Device) -> None:
        """Wait until every transfer to ``device`` has landed: the CUDA queue of a GPU
        device, and the deferred host-side scatters of GPU -> host copies."""
        if device.is_cuda and cuda_problem() is None:
            torch.cuda.synchronize(_torch_device(device))
        if self._pending:
            self._finish_pending()

    # --- arrays -------------------------------------------------------------------

    def describe(self, array: Any) -> tuple[tuple[int, ...], DType | None, Device]:
        if not isinstance(array, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(array).__name__}")
        return tuple(array.shape), _FROM_TORCH.get(array.dtype), _kv_device(array.device)

    def asarray(self, obj: Any, device: Device) -> torch.Tensor:
        """``obj`` as a tensor on ``device`` without copying.

        Tensors pass through; anything else speaking DLPack (numpy, cupy, jax, a
        :class:`~kvcore.TensorRef`) goes through ``torch.from_dlpack`` and shares its
        memory.  Read-only numpy arrays are shared too (the cache only reads K/V).  One
        exception: an array with negative strides (``a[::-1]``) is copied once first,
        keeping its dtype, because DLPack import in torch cannot represent it.
        """
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
        try:
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
        tensor = array.detach()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return tensor.cpu().numpy().copy()

    def from_numpy(self, array: np.ndarray, dtype: DType, device: Device) -> torch.Tensor:
        self.check_device(device)
        self.check_dtype(dtype)
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
        signed = bits.view(np.int32 if dtype is DType.float32 else np.int16)
        host = torch.from_numpy(signed.copy()).view(_TORCH_DTYPES[dtype])
        return host.to(device=_torch_device(device))

    def array_ops(self) -> ArrayOps:
        return _OPS


_OPS = TorchOps(torch)
