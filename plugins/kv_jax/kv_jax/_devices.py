"""JAX devices as kvcore :class:`~kvcore.Device`s, the CPU device pools live on, and
fast transfers of small fixed-shape host arrays to it."""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from kvcore import Device
from kvcore.errors import DeviceMismatchError

__all__ = ["CPU", "cpu_device", "device_of", "kv_device", "put_fixed"]

#: JAX platform names -> kvcore device types.  Only ``cpu`` is served (see the
#: README); the others are named so that an array on them is reported correctly.
_TYPES = {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda", "rocm": "rocm", "tpu": "tpu",
          "METAL": "mps"}
#: The kvcore Device of JAX's CPU: one object, so the hot path compares identity.
CPU = Device("cpu")
#: Sharding -> Device, for the hot path (a few distinct shardings per process).
_BY_SHARDING: dict[Any, Device] = {}


@functools.cache
def cpu_device() -> Any:
    """JAX's first CPU device: where every pool, index and imported array is put
    explicitly, so a JAX whose default backend is a GPU still keeps them here."""
    return jax.devices("cpu")[0]


@functools.cache
def kv_device(device: Any) -> Device:
    """The kvcore Device of a JAX device (cached: JAX devices are long-lived)."""
    kind = _TYPES.get(device.platform, device.platform.lower())
    return CPU if kind == "cpu" else Device(kind, device.id)


def device_of(array: jax.Array) -> Device:
    """The one device ``array`` lives on, or :class:`DeviceMismatchError`."""
    sharding = array.sharding
    found = _BY_SHARDING.get(sharding)
    if found is not None:
        return found
    devices = sharding.device_set
    if len(devices) != 1:
        raise DeviceMismatchError(f"jax array is spread over {len(devices)} devices; the cache "
                                  "lives on one, put it there with jax.device_put")
    found = kv_device(next(iter(devices)))
    if len(_BY_SHARDING) < 64:
        _BY_SHARDING[sharding] = found
    return found


@functools.cache
def _identity() -> Any:
    return jax.jit(lambda x: x,
                   out_shardings=jax.sharding.SingleDeviceSharding(cpu_device()))


def put_fixed(host: np.ndarray) -> jax.Array:
    """``host`` as a committed array on the CPU device, through jit's C++ argument
    path: about 4 us where ``jax.device_put`` costs about 20 us.  Compiles once per
    shape and dtype, so only for arrays of a few fixed shapes (bucketed indices and
    rows).  ``host`` must be private to the caller: it may be aliased."""
    return _identity()(host)
