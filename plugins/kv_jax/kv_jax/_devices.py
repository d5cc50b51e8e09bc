"""JAX devices as kvcore :class:`~kvcore.Device`s, and the CPU device pools live on."""

from __future__ import annotations

import functools
from typing import Any

import jax

from kvcore import Device

__all__ = ["cpu_device", "kv_device"]

#: JAX platform names -> kvcore device types.  Only ``cpu`` is served (see the
#: README); the others are named so that an array on them is reported correctly.
_TYPES = {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda", "rocm": "rocm", "tpu": "tpu",
          "METAL": "mps"}


@functools.cache
def cpu_device() -> Any:
    """JAX's first CPU device: where every pool, index and imported array is put
    explicitly, so a JAX whose default backend is a GPU still keeps them here."""
    return jax.devices("cpu")[0]


@functools.cache
def kv_device(device: Any) -> Device:
    """The kvcore Device of a JAX device (cached: JAX devices are long-lived)."""
    kind = _TYPES.get(device.platform, device.platform.lower())
    return Device(kind) if kind == "cpu" else Device(kind, device.id)
