"""TensorRef: a backend's array plus the facts kvcore knows about it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from ._device import Device, DType

if TYPE_CHECKING:
    from ._array_ops import ArrayOps


class ArrayOpsSource(Protocol):
    """What a TensorRef needs of the backend that made its array (a
    :class:`~kvcore.Backend`): its array operations, for generic code."""

    name: str

    def array_ops(self) -> ArrayOps: ...


__all__ = ["ArrayOpsSource", "TensorRef"]


class TensorRef:
    """A backend-native array returned by the cache, with its shape, dtype and device.

    ``ref.native`` is the array itself (a ``numpy.ndarray``, ``torch.Tensor``,
    ``cupy.ndarray``, ...).  A TensorRef speaks DLPack, so ``numpy.from_dlpack(ref)``,
    ``torch.from_dlpack(ref)`` and ``cupy.from_dlpack(ref)`` take it without a copy when
    the device allows.
    """

    __slots__ = ("_native", "_shape", "_dtype", "_device", "_backend")

    def __init__(self, native: Any, shape: tuple[int, ...], dtype: DType, device: Device,
                 backend: ArrayOpsSource | None = None):
        self._native = native
        self._shape = tuple(int(s) for s in shape)
        self._dtype = DType.parse(dtype)
        self._device = Device.parse(device)
        self._backend = backend

    @property
    def backend(self) -> ArrayOpsSource | None:
        """The backend that made the array (``None`` when built by hand)."""
        return self._backend

    @property
    def native(self) -> Any:
        """The backend's own array object; no copy was made to produce it."""
        return self._native

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> DType:
        return self._dtype

    @property
    def device(self) -> Device:
        return self._device

    @property
    def ndim(self) -> int:
        return len(self._shape)

    def __len__(self) -> int:
        return self._shape[0] if self._shape else 0

    def __dlpack__(self, *, stream: Any = None, max_version: Any = None,
                   dl_device: Any = None, copy: Any = None) -> Any:
        # Forward only what the caller set: older array libraries reject keywords
        # they do not know, and ``None`` means "library default" for all of them.
        kwargs = {k: v for k, v in (("stream", stream), ("max_version", max_version),
                                     ("dl_device", dl_device), ("copy", copy))
                  if v is not None}
        try:
            return self._native.__dlpack__(**kwargs)
        except TypeError:
            if "max_version" in kwargs:  # a pre-1.0 DLPack producer
                kwargs.pop("max_version")
                return self._native.__dlpack__(**kwargs)
            raise

    def __dlpack_device__(self) -> tuple[int, int]:
        return self._native.__dlpack_device__()

    def __repr__(self) -> str:
        kind = type(self._native).__module__.split(".")[0]
        return (f"TensorRef(shape={self._shape}, dtype={self._dtype.value}, "
                f"device={self._device}, native={kind})")
