"""Device and dtype names shared by all backends."""

from __future__ import annotations

import numpy as np
import pytest

from kvcore import Device, DType


@pytest.mark.parametrize("text, want", [("cpu", Device("cpu")), ("cuda", Device("cuda", 0)),
                                        ("cuda:3", Device("cuda", 3)), (" CUDA:1 ", Device("cuda", 1))])
def test_parse_accepts_torch_spellings(text, want):
    assert Device.parse(text) == want


@pytest.mark.parametrize("bad", ["gpu", "cuda:-1", "cpu:1", "cuda:x", ""])
def test_parse_rejects_other_strings_naming_them(bad):
    with pytest.raises(ValueError, match="device"):
        Device.parse(bad)


def test_str_round_trips_and_dlpack_pair():
    assert str(Device.parse("cuda:2")) == "cuda:2"
    assert Device.parse(str(Device("cpu"))) == Device("cpu")
    assert Device("cpu").dlpack_device() == (1, 0)
    assert Device("cuda", 2).dlpack_device() == (2, 2)
    assert Device("cuda", 0).is_cuda and not Device("cpu").is_cuda


@pytest.mark.parametrize("value, want", [("float16", DType.float16), (np.float16, DType.float16),
                                         (np.dtype("float32"), DType.float32), ("bf16", DType.bfloat16),
                                         ("torch.bfloat16", DType.bfloat16), ("half", DType.float16)])
def test_dtype_parse_accepts_library_spellings(value, want):
    assert DType.parse(value) is want


def test_dtype_parse_rejects_unknown_listing_choices():
    with pytest.raises(ValueError, match="'int8' is not one of float16, bfloat16, float32"):
        DType.parse("int8")


def test_itemsizes():
    assert [d.itemsize for d in DType] == [2, 2, 4]
