"""Device and dtype names shared by all backends."""

from __future__ import annotations

import numpy as np
import pytest

from kvcore import Device, DType


@pytest.mark.parametrize("text, want", [("cpu", Device("cpu")), ("cuda", Device("cuda", 0)),
                                        ("cuda:3", Device("cuda", 3)), (" CUDA:1 ", Device("cuda", 1))])
def test_parse_accepts_torch_spellings(text, want):
    assert Device.parse(text) == want


@pytest.mark.parametrize("bad", ["cuda:-1", "cpu:1", "cuda:x", "", "Cuda 1", "9pu", "cuda:1:2"])
def test_parse_rejects_malformed_strings_naming_them(bad):
    with pytest.raises(ValueError, match="device"):
        Device.parse(bad)


@pytest.mark.parametrize("text, kind, index", [("cuda:1", "cuda", 1), ("mps", "mps", 0),
                                               ("tpu:3", "tpu", 3), ("xla", "xla", 0),
                                               ("rocm:2", "rocm", 2)])
def test_the_constructor_takes_any_type_and_index_string(text, kind, index):
    device = Device(text)
    assert (device.type, device.index) == (kind, index)
    assert Device(kind, index) == device and Device.parse(str(device)) == device


def test_a_string_index_and_an_index_argument_must_agree():
    assert Device("cuda:1", 1) == Device("cuda", 1)
    with pytest.raises(ValueError, match="names index 1 but index=2"):
        Device("cuda:1", 2)
    with pytest.raises(TypeError, match="device type must be a str"):
        Device(3)  # type: ignore[arg-type]


def test_dlpack_numbers_cover_the_common_device_types():
    assert Device("mps").dlpack_device() == (8, 0)
    assert Device("rocm:1").dlpack_device() == (10, 1)
    assert Device.from_dlpack(2, 3) == Device("cuda:3")
    with pytest.raises(ValueError, match="'tpu' has no DLPack device number"):
        Device("tpu").dlpack_device()


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
    with pytest.raises(ValueError, match="'int16' is not one of float16, bfloat16, float32, "
                                         "float8_e4m3, float8_e5m2, int8, uint8"):
        DType.parse("int16")


@pytest.mark.parametrize("value, want", [("fp8", DType.float8_e4m3),
                                         ("torch.float8_e4m3fn", DType.float8_e4m3),
                                         ("float8_e5m2", DType.float8_e5m2),
                                         (np.int8, DType.int8), (np.dtype("uint8"), DType.uint8)])
def test_dtype_parse_accepts_codec_and_storage_spellings(value, want):
    assert DType.parse(value) is want


def test_itemsizes():
    assert [d.itemsize for d in DType] == [2, 2, 4, 1, 1, 1, 1]


def test_roles_split_float_codec_and_storage_dtypes():
    assert [d for d in DType if d.is_float] == [DType.float16, DType.bfloat16, DType.float32]
    assert [d for d in DType if d.is_codec] == [DType.float8_e4m3, DType.float8_e5m2, DType.int8]
    assert not DType.uint8.is_float and not DType.uint8.is_codec
