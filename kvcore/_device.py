"""Devices and dtypes, named the same way for every backend."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["CODEC_DTYPES", "DEVICE_TYPE_RE", "FLOAT_DTYPES", "Device", "DType", "DeviceLike",
           "DTypeLike"]

#: A device type: a lower-case identifier (``cpu``, ``cuda``, ``mps``, ``xla``, ``tpu``...).
DEVICE_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_DEVICE_RE = re.compile(r"^(?P<type>[a-z][a-z0-9_]*)(?::(?P<index>[0-9]+))?$")
#: DLPack's ``DLDeviceType`` numbers of the device types that have one.
_DLPACK_TYPES = {"cpu": 1, "cuda": 2, "cuda_host": 3, "opencl": 4, "vulkan": 7, "mps": 8,
                 "metal": 8, "vpi": 9, "rocm": 10, "hip": 10, "rocm_host": 11,
                 "cuda_managed": 13, "oneapi": 14, "xpu": 14, "webgpu": 15, "hexagon": 16,
                 "maia": 17}
_DLPACK_NAMES = {1: "cpu", 2: "cuda", 3: "cuda_host", 4: "opencl", 7: "vulkan", 8: "mps",
                 9: "vpi", 10: "rocm", 11: "rocm_host", 13: "cuda_managed", 14: "oneapi",
                 15: "webgpu", 16: "hexagon", 17: "maia"}


@dataclass(frozen=True, slots=True, init=False)
class Device:
    """Where an array lives: a device type and an index.

    ``Device("cpu")``, ``Device("cuda", 1)`` and ``Device("cuda:1")`` all work, as do
    types kvcore itself does not use (``Device("mps")``, ``Device("tpu:3")``): which
    types a pool may live on is for each backend to declare
    (:attr:`BackendCapabilities.device_types`).  A type is a lower-case identifier;
    ``"cuda"`` without an index means index 0; ``cpu`` takes no other index.
    ``str(device)`` gives the canonical form back (``"cpu"``, ``"cuda:1"``), so a
    device round-trips through configs and JSON.
    """

    type: str
    index: int

    def __init__(self, type: str, index: int | None = None) -> None:  # noqa: A002 - the field's name
        if not isinstance(type, str):
            raise TypeError(f"device type must be a str, got {type!r}")
        match = _DEVICE_RE.match(type.strip().lower())
        if match is None:
            raise ValueError(f"device {type!r} is not a device type with an optional index, "
                             "such as 'cpu', 'cuda', 'cuda:1' or 'mps'")
        kind, text_index = match.group("type"), match.group("index")
        if text_index is not None:
            if index is not None and index != int(text_index):
                raise ValueError(f"device {type!r} names index {text_index} but index="
                                 f"{index!r} was also given")
            index = int(text_index)
        if index is None:
            index = 0
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ValueError(f"device index {index!r} must be an integer >= 0")
        if kind == "cpu" and index != 0:
            raise ValueError(f"device 'cpu' takes no index, got {index!r}")
        object.__setattr__(self, "type", kind)
        object.__setattr__(self, "index", int(index))

    @classmethod
    def parse(cls, value: DeviceLike) -> Device:
        """Turn ``"cpu"``, ``"cuda:1"``, a :class:`Device`, a torch device or anything
        whose ``str()`` is ``type[:index]`` into a Device."""
        if isinstance(value, Device):
            return value
        return cls(str(value))

    @classmethod
    def from_dlpack(cls, dl_type: int, dl_id: int) -> Device:
        """The Device of a DLPack ``(device_type, device_id)`` pair (``__dlpack_device__``)."""
        name = _DLPACK_NAMES.get(int(dl_type))
        if name is None:
            raise ValueError(f"DLPack device type {int(dl_type)} has no kvcore name")
        return cls(name, 0 if name == "cpu" else int(dl_id))

    @property
    def is_cuda(self) -> bool:
        return self.type == "cuda"

    @property
    def is_cpu(self) -> bool:
        return self.type == "cpu"

    def __str__(self) -> str:
        return "cpu" if self.type == "cpu" else f"{self.type}:{self.index}"

    def __repr__(self) -> str:
        return f"Device({str(self)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Device, (self.type, self.index))

    def dlpack_device(self) -> tuple[int, int]:
        """The ``(device_type, device_id)`` pair DLPack uses (kDLCPU=1, kDLCUDA=2, ...);
        ``ValueError`` for a type DLPack has no number for."""
        number = _DLPACK_TYPES.get(self.type)
        if number is None:
            raise ValueError(f"device type {self.type!r} has no DLPack device number")
        return (number, self.index)


class DType(str, enum.Enum):
    """Element types a KV cache can hold; every backend uses these names.

    Three roles (see ``docs/quantized-kv.md``):

    * **float dtypes** (``float16``, ``bfloat16``, ``float32``): a cache of one stores
      K/V as they are written, and K/V are written and read in it;
    * **codecs** (``float8_e4m3``, ``float8_e5m2``, ``int8``): a cache of one stores
      one byte per element plus a float32 scale per token and head
      (:mod:`kvcore._codecs`); K/V are written and read in the config's
      ``compute_dtype``.  ``float8_e4m3`` is the OCP E4M3 format without infinities
      (``torch.float8_e4m3fn``, ``ml_dtypes.float8_e4m3fn``);
    * **storage dtypes** of codec pools: ``uint8`` (the bit patterns of float8
      codes) and ``int8`` (int8 codes).  ``uint8`` is never a cache's dtype.
    """

    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"
    float8_e4m3 = "float8_e4m3"
    float8_e5m2 = "float8_e5m2"
    int8 = "int8"
    uint8 = "uint8"

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.value]

    @property
    def is_float(self) -> bool:
        """A float dtype: stored as written, and the dtype K/V are computed in."""
        return self.value in _FLOATS

    @property
    def is_codec(self) -> bool:
        """A quantized codec: a cache of it stores codes plus scales."""
        return self.value in _CODECS

    @classmethod
    def parse(cls, value: DTypeLike) -> DType:
        """Accept a DType, its name, or anything whose ``str()`` ends in the name
        (``numpy.dtype('float16')``, ``torch.bfloat16``, ``torch.float8_e4m3fn``)."""
        if isinstance(value, DType):
            return value
        if isinstance(value, type):  # numpy.float16 and friends are classes
            value_text = value.__name__
        else:
            value_text = str(value)
        text = value_text.rsplit(".", 1)[-1].strip().lower()
        text = _ALIASES.get(text, text)
        try:
            return cls(text)
        except ValueError:
            names = ", ".join(d.value for d in cls)
            raise ValueError(f"dtype {value!r} is not one of {names}") from None

    def __str__(self) -> str:
        return self.value


_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float8_e4m3": 1, "float8_e5m2": 1,
             "int8": 1, "uint8": 1}
_FLOATS = frozenset({"float16", "bfloat16", "float32"})
_CODECS = frozenset({"float8_e4m3", "float8_e5m2", "int8"})
_ALIASES = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16",
            "fp32": "float32", "fp8": "float8_e4m3", "fp8_e4m3": "float8_e4m3",
            "float8_e4m3fn": "float8_e4m3", "fp8_e5m2": "float8_e5m2"}
#: The float dtypes, the codecs and the storage dtypes of codec pools, in order.
FLOAT_DTYPES = tuple(DType(v) for v in ("float16", "bfloat16", "float32"))
CODEC_DTYPES = tuple(DType(v) for v in ("float8_e4m3", "float8_e5m2", "int8"))


DeviceLike = Device | str | Any
DTypeLike = DType | str | Any
