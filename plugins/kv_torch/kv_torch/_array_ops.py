"""The array operations kvcore's generic code (paged attention) runs on torch tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kvcore import DType
from kvcore._array_ops import ArrayOps
from kvcore.errors import UnsupportedError

__all__ = ["TORCH_DTYPES", "TorchOps"]

#: kvcore dtype -> torch dtype, for every kvcore dtype this torch has (the float8
#: formats are the codecs' value types: pools hold their bits as uint8).
TORCH_DTYPES = {d: t for d, t in (
    (DType.float16, torch.float16), (DType.bfloat16, torch.bfloat16),
    (DType.float32, torch.float32), (DType.int8, torch.int8), (DType.uint8, torch.uint8),
    (DType.float8_e4m3, getattr(torch, "float8_e4m3fn", None)),
    (DType.float8_e5m2, getattr(torch, "float8_e5m2", None))) if t is not None}


class TorchOps(ArrayOps):
    """:class:`kvcore._array_ops.ArrayOps` for torch; every op runs on the device of the
    tensors it is given (torch's dispatcher makes that device current for the kernel),
    on that device's current stream."""

    name = "torch"

    def __init__(self, module: Any = torch) -> None:
        self.torch = module
        self._tables: dict[DType, Any] = {}

    def from_host(self, host: np.ndarray, like: Any) -> Any:
        if like.is_cuda:  # through pinned memory: a pageable copy would block the host
            from ._cuda import to_device
            return to_device(host, like.device)
        return self.torch.from_numpy(np.ascontiguousarray(host)).to(like.device)

    def take1(self, a: Any, index: Any) -> Any:
        return a.index_select(1, index)

    def zero_rows(self, a: Any, mask: np.ndarray) -> Any:
        # In place (a is an array kvcore just made), through the padding's (row, token)
        # pairs: a boolean-mask assignment measured 19 ms for both planes of a 35 MB
        # batch read on the CPU (it finds the true entries on the device first), the
        # pairs 3 ms.
        rows, tokens = np.nonzero(mask)
        a[self.from_host(rows, a), self.from_host(tokens, a)] = 0
        return a

    def float32(self, a: Any) -> Any:
        return a.float()

    def cast_like(self, a: Any, like: Any) -> Any:
        return a.to(like.dtype)

    def permute(self, a: Any, axes: tuple[int, ...]) -> Any:
        return a.permute(*axes)

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        return self.torch.where(cond, a, b)

    def amax(self, a: Any) -> Any:
        return a.amax(dim=-1, keepdim=True)

    def sum(self, a: Any) -> Any:
        return a.sum(dim=-1, keepdim=True)

    def exp(self, a: Any) -> Any:
        return self.torch.exp(a)

    def isfinite(self, a: Any) -> Any:
        return self.torch.isfinite(a)

    def abs(self, a: Any) -> Any:
        return a.abs()

    def divide(self, a: Any, b: Any) -> Any:
        return a / b

    def multiply(self, a: Any, b: Any) -> Any:
        return a * b

    def clip(self, a: Any, lo: float, hi: float) -> Any:
        return a.clamp(lo, hi)

    def rint(self, a: Any) -> Any:
        return self.torch.round(a)  # ties to even

    def _dtype(self, dtype: DType) -> Any:
        native = TORCH_DTYPES.get(dtype)
        if native is None:
            raise UnsupportedError(f"torch {self.torch.__version__} has no {dtype.value} dtype")
        return native

    def astype(self, a: Any, dtype: DType) -> Any:
        return a.to(self._dtype(dtype))

    def stack(self, arrays: list[Any]) -> Any:
        return self.torch.stack(arrays)

    def float8_bits(self, a: Any, dtype: DType) -> Any:
        return a.to(self._dtype(dtype)).view(self.torch.uint8)

    def float8_values(self, codes: Any, dtype: DType) -> Any:
        if codes.is_cuda:
            return codes.view(self._dtype(dtype)).float()
        # On the CPU a table of the 256 values: torch's float8 -> float32 cast measured
        # about 3x slower than this gather (same values, exactly).
        table = self._tables.get(dtype)
        if table is None:
            table = self._tables[dtype] = self.torch.arange(
                256, dtype=self.torch.uint8).view(self._dtype(dtype)).float()
        return table.index_select(0, codes.reshape(-1).int()).view(codes.shape)

    def device_key(self, a: Any) -> str:
        # With the current stream: arrays staged for one stream are not reused on
        # another before that stream has waited for their copy.
        if a.is_cuda:
            return f"{a.device}@{self.torch.cuda.current_stream(a.device).cuda_stream}"
        return str(a.device)
