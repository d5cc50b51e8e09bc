"""Quantized KV codecs on CUDA: torch (every codec) and cupy (int8) store the very codes
and scales numpy stores for the same input, and decode them alike.  Marked ``gpu``;
not run on real hardware yet (no GPU was available when they were written)."""

from __future__ import annotations

import numpy as np
import pytest

import kvcore
from kvcore import DType, codec_for
from tests.gpu_support import needs_cupy_gpus, needs_torch_gpus

pytestmark = pytest.mark.gpu


def _same_as_numpy(backend: str, codec: DType) -> None:
    be, host = kvcore.get_backend(backend), kvcore.get_backend("numpy")
    c = codec_for(codec)
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((256, 8, 128)) * np.exp2(rng.uniform(-10, 10, (256, 8, 1))))
    x = x.astype(np.float16)
    cuda = kvcore.Device("cuda:0")
    codes, scales = c.encode(be.array_ops(), be.from_numpy(x, DType.float16, cuda))
    want_codes, want_scales = c.encode(host.array_ops(), x)
    be.synchronize(cuda)
    assert np.array_equal(be.to_numpy(codes).view(np.uint8), want_codes.view(np.uint8))
    assert np.array_equal(be.to_numpy(scales).view(np.uint32), want_scales.view(np.uint32))
    back = be.to_numpy(c.decode(be.array_ops(), codes, scales, DType.float16))
    want = c.decode(host.array_ops(), want_codes, want_scales, DType.float16)
    assert np.array_equal(back.view(np.uint16), want.view(np.uint16))


@needs_torch_gpus(1)
@pytest.mark.parametrize("codec", [DType.float8_e4m3, DType.float8_e5m2, DType.int8])
def test_torch_cuda_codes_equal_numpys(codec):
    _same_as_numpy("torch", codec)


@needs_cupy_gpus(1)
def test_cupy_int8_codes_equal_numpys():
    _same_as_numpy("cupy", DType.int8)
