"""Devices and dtypes, named the same way for every backend."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["Device", "DType", "DeviceLike", "DTypeLike"]

_DEVICE_RE = re.compile(r"^(?P<type>cpu|cuda)(?::(?P<index>\d+))?$")


@dataclass(frozen=True, slots=True)
class Device:
    """Where an array lives: ``Device("cpu")`` or ``Device("cuda", 0)``.

    Parsed from strings the way torch spells them (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
    ``"cuda"`` without an index means device 0. ``str(device)`` gives the canonical form
    back, so a device round-trips through configs and JSON.
    """

    type: str
    index: int = 0

    def __post_init__(self) -> None:
        if self.type not in ("cpu", "cuda"):
            raise ValueError(f"device type {self.type!r} is not one of 'cpu', 'cuda'")
        if not isinstance(self.index, int) or isinstance(self.index, bool) or self.index < 0:
            raise ValueError(f"device index {self.index!r} must be an integer >= 0")
        if self.type == "cpu" and self.index != 0:
            raise ValueError(f"device 'cpu' takes no index, got {self.index!r}")

    @classmethod
    def parse(cls, value: DeviceLike) -> Device:
        """Turn ``"cpu"``, ``"cuda:1"``, a :class:`Device` or a torch device into a Device."""
        if isinstance(value, Device):
            return value
        text = str(value).strip().lower()
        match = _DEVICE_RE.match(text)
        if match is None:
            raise ValueError(f"device {value!r} is not 'cpu', 'cuda' or 'cuda:N'")
        index = match.group("index")
        return cls(match.group("type"), int(index) if index is not None else 0)

    @property
    def is_cuda(self) -> bool:
        return self.type == "cuda"

    def __str__(self) -> str:
        return "cpu" if self.type == "cpu" else f"cuda:{self.index}"

    def dlpack_device(self) -> tuple[int, int]:
        """The ``(device_type, device_id)`` pair DLPack uses (kDLCPU=1, kDLCUDA=2)."""
        return (1, 0) if self.type == "cpu" else (2, self.index)


class DType(str, enum.Enum):
    """Element types a KV cache can hold; every backend uses these names."""

    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"

    @property
    def itemsize(self) -> int:
        return 4 if self is DType.float32 else 2

    @classmethod
    def parse(cls, value: DTypeLike) -> DType:
        """Accept a DType, its name, or anything whose ``str()`` ends in the name
        (``numpy.dtype('float16')``, ``torch.bfloat16``)."""
        if isinstance(value, DType):
            return value
        if isinstance(value, type):  # numpy.float16 and friends are classes
            value_text = value.__name__
        else:
            value_text = str(value)
        text = value_text.rsplit(".", 1)[-1].strip().lower()
        aliases = {"half": "float16", "float": "float32", "bf16": "bfloat16",
                   "fp16": "float16", "fp32": "float32"}
        text = aliases.get(text, text)
        try:
            return cls(text)
        except ValueError:
            names = ", ".join(d.value for d in cls)
            raise ValueError(f"dtype {value!r} is not one of {names}") from None

    def __str__(self) -> str:
        return self.value


DeviceLike = Device | str | Any
DTypeLike = DType | str | Any
