"""Planted bugs in the torch backend: defects a torch backend makes, one each (see
``broken.py`` for how they are used)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from kv_torch._backend import TorchBackend

from kvcore import Device

from ._planted import Planted


class TorchAddingScatterBackend(TorchBackend):
    """scatter with ``index_add_`` where ``index_copy_`` was meant: right on zeros only."""

    name = "broken-torch-scatter-adds"

    def scatter(self, pool: torch.Tensor, slots: torch.Tensor,
                rows: Sequence[torch.Tensor]) -> torch.Tensor:
        for plane, values in zip(self._flat(pool).unbind(0), rows):
            plane.index_add_(0, slots, values.detach())
        return pool


class TorchFloatStagingBackend(TorchBackend):
    """transfer_blocks stages blocks in float32 (``.float()`` then back): every NaN of
    a float16 or bfloat16 cache arrives canonicalised."""

    name = "broken-torch-float-staging"

    def transfer_blocks(self, src_pool: torch.Tensor, src: torch.Tensor,
                        dst_pool: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        staged = src_pool.index_select(1, src).float().to(dst_pool.device)
        dst_pool.index_copy_(1, dst, staged.to(dst_pool.dtype))
        return dst_pool


class TorchCloningDlpackBackend(TorchBackend):
    """asarray clones what it imports through DLPack ("to own the memory")."""

    name = "broken-torch-dlpack-clone"

    def asarray(self, obj: Any, device: Device) -> torch.Tensor:
        tensor = super().asarray(obj, device)
        return tensor if tensor is obj else tensor.clone()


class TorchTrustingBlocksBackend(TorchBackend):
    """gather reads whole blocks whenever each block's first slot is in place."""

    name = "broken-torch-whole-blocks"

    def gather(self, pool: torch.Tensor, plane: int, slots: torch.Tensor) -> torch.Tensor:
        bs = pool.shape[2]
        host = slots.cpu().numpy()
        if slots.dim() == 1 and len(host) % bs == 0 and not (host[::bs] % bs).any():
            blocks = torch.from_numpy(np.array(host[::bs] // bs)).to(slots.device)
            return pool[plane].index_select(0, blocks).flatten(0, 1)
        return super().gather(pool, plane, slots)


class TorchViewToNumpyBackend(TorchBackend):
    """to_numpy returns ``tensor.numpy()``, which shares the tensor's memory on the cpu."""

    name = "broken-torch-to-numpy"

    def to_numpy(self, array: torch.Tensor) -> np.ndarray:
        if array.dtype == torch.bfloat16:
            return super().to_numpy(array)
        return array.detach().cpu().numpy()


TORCH_BUGS = [
    Planted(TorchAddingScatterBackend, "backend.scatter.overwrite",
            "test_scatter_overwrites_what_was_there"),
    Planted(TorchFloatStagingBackend, "bits.transfer-blocks",
            "test_special_values_survive_transfer_blocks"),
    Planted(TorchCloningDlpackBackend, "backend.asarray.dlpack",
            "test_asarray_imports_dlpack_producers_without_a_copy"),
    Planted(TorchTrustingBlocksBackend, "backend.gather.order",
            "test_gather_returns_rows_in_slot_order"),
    Planted(TorchViewToNumpyBackend, "backend.to-numpy",
            "test_to_numpy_returns_an_independent_copy"),
]
