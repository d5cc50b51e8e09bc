"""The array operations kvcore's generic code (paged attention) runs on torch tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kvcore._array_ops import ArrayOps

__all__ = ["TorchOps"]


class TorchOps(ArrayOps):
    """:class:`kvcore._array_ops.ArrayOps` for torch; every op runs on the device of the
    tensors it is given (torch's dispatcher makes that device current for the kernel),
    on that device's current stream."""

    name = "torch"

    def __init__(self, module: Any = torch) -> None:
        self.torch = module

    def from_host(self, host: np.ndarray, like: Any) -> Any:
        if like.is_cuda:  # through pinned memory: a pageable copy would block the host
            from ._cuda import to_device
            return to_device(host, like.device)
        return self.torch.from_numpy(np.ascontiguousarray(host)).to(like.device)

    def take1(self, a: Any, index: Any) -> Any:
        return a.index_select(1, index)

    def zero_rows(self, a: Any, mask: np.ndarray) -> Any:
        a[self.from_host(mask, a)] = 0  # in place: a is an array kvcore just made
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

    def device_key(self, a: Any) -> str:
        # With the current stream: arrays staged for one stream are not reused on
        # another before that stream has waited for their copy.
        if a.is_cuda:
            return f"{a.device}@{self.torch.cuda.current_stream(a.device).cuda_stream}"
        return str(a.device)
