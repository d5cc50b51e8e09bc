"""Moving arrays between numpy, other DLPack producers and JAX, bit-exactly.

* **Into JAX** (:func:`import_array`): a foreign array (numpy, a torch CPU tensor, any
  DLPack producer on the CPU) is copied once into a buffer JAX owns.  Not zero-copy,
  on purpose: a JAX array must never change, and JAX dispatch is asynchronous, so a
  zero-copy import of a *mutable* buffer would let the caller's next in-place change
  (``k[:] = ...`` on a reused numpy buffer) alter K/V the cache had already accepted,
  possibly while the write was still queued.  The copy is of the new rows only.
* **To numpy** (:func:`host_view`, :func:`to_host`): a zero-copy read-only view where
  the dtype allows (DLPack; released as soon as the view dies, so a pool viewed this
  way can still be donated afterwards), a copy for ``to_numpy``.
* **bfloat16** has no numpy dtype; ``ml_dtypes.bfloat16`` (a JAX dependency) stands in
  on the host.  Widening to float32 and narrowing from float32 are done on the bits so
  NaN payloads survive (``ml_dtypes`` and XLA canonicalise them).
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import ml_dtypes
import numpy as np

from kvcore import Device, DType
from kvcore.errors import DeviceMismatchError, DtypeMismatchError

from ._devices import cpu_device

__all__ = ["JAX_DTYPES", "from_jax_dtype", "host_view", "import_array", "narrow",
           "to_host"]

#: kvcore dtype -> the numpy dtype JAX uses for it.
JAX_DTYPES = {DType.float16: np.dtype(np.float16),
              DType.bfloat16: np.dtype(ml_dtypes.bfloat16),
              DType.float32: np.dtype(np.float32)}
_FROM_JAX = {v: k for k, v in JAX_DTYPES.items()}
_BF16 = JAX_DTYPES[DType.bfloat16]
_KDLCPU = 1


def from_jax_dtype(dtype: Any) -> DType | None:
    """The kvcore dtype of a numpy/JAX dtype, or ``None``."""
    return _FROM_JAX.get(np.dtype(dtype))


def host_view(array: jax.Array) -> np.ndarray:
    """A read-only numpy view of a CPU jax array (waits until it is computed).

    Through DLPack for the dtypes numpy can import: the view's hold on the buffer ends
    when the view is garbage, so a pool viewed here can still be donated later.
    bfloat16 (which numpy's DLPack import refuses) goes through ``numpy.asarray``,
    whose view JAX caches on the array for the array's lifetime.
    """
    if array.dtype == _BF16:
        return np.asarray(array)
    return np.from_dlpack(array)


def to_host(array: jax.Array) -> np.ndarray:
    """A numpy copy; bfloat16 widened to float32 exactly (a 16-bit shift)."""
    view = host_view(array)
    if view.dtype == _BF16:
        return (view.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    return np.array(view, copy=True)


def narrow(array: np.ndarray, dtype: DType) -> np.ndarray:
    """``array``'s values as a new C-contiguous host array of ``dtype``.

    Rounds to nearest-even like every library's cast; a NaN keeps its sign and the
    top bits of its payload when narrowing to bfloat16 (``ml_dtypes`` would make every
    NaN the canonical ``0x7fc0``), so a float32 that widened a bfloat16 comes back
    with exactly its original bits.
    """
    target = JAX_DTYPES[dtype]
    if dtype is not DType.bfloat16 or array.dtype not in (np.float16, np.float32):
        return np.array(array, dtype=target, copy=True, order="C")
    wide = np.asarray(array, dtype=np.float32)
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # ml_dtypes on NaN casts
        out = np.array(wide, dtype=_BF16, copy=True, order="C")
    nan = np.isnan(wide)
    if nan.any():
        top = (wide.view(np.uint32) >> np.uint32(16)).astype(np.uint16)
        keep = nan & ((top & np.uint16(0x7F)) != 0)  # the top bits still spell a NaN
        out.view(np.uint16)[keep] = top[keep]
    return out


def _holdable(dtype: np.dtype) -> bool:
    """Whether JAX can hold ``dtype`` as it is (without x64, 64-bit types it cannot:
    ``jax.numpy`` would silently narrow them to 32 bits)."""
    try:
        return np.dtype(jax.dtypes.canonicalize_dtype(dtype)) == dtype
    except (TypeError, ValueError):
        return False


def _dlpack_host_view(obj: Any, device: Device) -> np.ndarray:
    """A zero-copy numpy view of a CPU DLPack producer, or the typed error."""
    dl_type, dl_id = obj.__dlpack_device__()
    if int(dl_type) != _KDLCPU:
        try:
            where = str(Device.from_dlpack(dl_type, dl_id))
        except ValueError:
            where = f"DLPack device type {int(dl_type)}"
        raise DeviceMismatchError(f"{type(obj).__name__} array is on {where}, the cache is on "
                                  f"{device}; move it to the cpu first")
    dtype = str(getattr(obj, "dtype", ""))
    try:
        if "bfloat16" in dtype:
            # numpy cannot import bfloat16 through DLPack; JAX can (zero-copy).
            return np.asarray(jax.dlpack.from_dlpack(obj))
        return np.from_dlpack(obj)
    except (BufferError, RuntimeError, TypeError, ValueError) as exc:
        if "dtype" in str(exc).lower():
            raise DtypeMismatchError(f"{type(obj).__name__} array has dtype {dtype or '?'}, "
                                     f"which the jax backend cannot import: {exc}") from exc
        raise TypeError(f"jax could not import the {type(obj).__name__} through DLPack: "
                        f"{type(exc).__name__}: {exc}") from exc


def import_array(obj: Any, device: Device) -> jax.Array:
    """A foreign array (numpy or a DLPack producer on the CPU) as a new jax array of
    the same dtype, copied once (see the module docstring)."""
    if isinstance(obj, np.ndarray):
        host = obj
    elif hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        host = _dlpack_host_view(obj, device)
    else:
        raise TypeError(f"expected an array (a jax.Array, numpy.ndarray or a DLPack "
                        f"producer), got {type(obj).__name__}")
    if not _holdable(host.dtype):
        raise DtypeMismatchError(f"{type(obj).__name__} array has dtype {host.dtype}, which "
                                 "jax cannot hold without casting it (64-bit types need "
                                 "jax_enable_x64); kvcore does not cast, convert it first")
    private = np.array(host, copy=True, order="C")
    # ``private`` is ours alone: device_put may alias it (zero-copy when aligned).
    return jax.device_put(private, cpu_device())
