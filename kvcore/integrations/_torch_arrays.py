"""torch tensors as the manager takes them, and back."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["kv_rows", "to_numpy"]


def to_numpy(array: Any) -> np.ndarray:
    """A tensor (any device) or array-like as a host numpy array."""
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def kv_rows(states: torch.Tensor) -> torch.Tensor:
    """``[kv_heads, tokens, head_dim]`` -> the ``[tokens, kv_heads, head_dim]`` kvcore writes."""
    return states.transpose(0, 1).contiguous()
