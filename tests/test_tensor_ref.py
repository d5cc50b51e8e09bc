"""TensorRef carries facts about a native array and exports it over DLPack without a copy."""

from __future__ import annotations

import numpy as np
import pytest

from kvcore import Device, DType, TensorRef


@pytest.fixture
def ref() -> TensorRef:
    return TensorRef(np.arange(24, dtype=np.float32).reshape(2, 3, 4), (2, 3, 4), "float32", "cpu")


def test_facts(ref):
    assert ref.shape == (2, 3, 4) and ref.dtype is DType.float32 and ref.device == Device("cpu")
    assert ref.ndim == 3 and len(ref) == 2
    assert "shape=(2, 3, 4)" in repr(ref) and "numpy" in repr(ref)


def test_numpy_from_dlpack_shares_memory_not_a_copy(ref):
    view = np.from_dlpack(ref)
    assert np.shares_memory(view, ref.native)
    ref.native[0, 0, 0] = 42.0  # a write through the original is seen through the view
    assert view[0, 0, 0] == 42.0


def test_dlpack_device_is_the_natives(ref):
    assert ref.__dlpack_device__() == ref.native.__dlpack_device__()


def test_dlpack_forwards_only_the_keywords_given(ref):
    capsule = ref.__dlpack__(max_version=(1, 0))
    assert capsule is not None
