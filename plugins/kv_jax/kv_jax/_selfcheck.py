"""Proof, on this machine and this jaxlib, that the kernels move bits unchanged.

The cache never does arithmetic on K/V, so it must hand back exactly the bits it was
given: signed zeros, subnormals, infinities and NaN payloads included.  Whether XLA
does depends on the compiler (see :mod:`kv_jax._kernels`: XLA:CPU turns bfloat16
data movement into float32 arithmetic unless told not to), so the backend does not
take it on trust for bfloat16, the dtype that depends on a compiler option: before
declaring it the backend runs the real operations once on a tiny pool filled with
such bit patterns and declares it only if they came back intact.  A jaxlib that stops
honouring the option therefore loses bfloat16 with the reason shown, instead of
silently corrupting NaN payloads.  (The check works for any dtype; float16 and
float32, which XLA moves natively, are left to the test suite to save start-up time.)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import jax
import numpy as np

from kvcore import DType

from ._convert import JAX_DTYPES, host_view
from ._devices import cpu_device

if TYPE_CHECKING:
    from ._backend import JaxBackend

__all__ = ["PATTERNS", "bit_exact_problems"]

#: Per dtype, raw bit patterns that a lossy path changes: -0.0, the smallest and the
#: largest subnormal, a signalling NaN with a payload, a quiet NaN with a payload, a
#: negative NaN, +inf, -inf, 1.0 and an arbitrary normal number.
PATTERNS = {
    DType.float16: np.array([0x8000, 0x0001, 0x03FF, 0x7C01, 0x7E55, 0xFD23, 0x7C00,
                             0xFC00, 0x3C00, 0xABCD], np.uint16),
    DType.bfloat16: np.array([0x8000, 0x0001, 0x007F, 0x7F81, 0x7FC5, 0xFF93, 0x7F80,
                              0xFF80, 0x3F80, 0xABCD], np.uint16),
    DType.float32: np.array([0x80000000, 0x00000001, 0x007FFFFF, 0x7F800001, 0x7FC01234,
                             0xFFA00005, 0x7F800000, 0xFF800000, 0x3F800000, 0xABCDEF01],
                            np.uint32),
}
_BLOCKS, _BLOCK_SIZE = 4, 4


def _rows(bits: np.ndarray, shifts: Iterable[int]) -> np.ndarray:
    """Rows ``[n, 1, len(bits)]`` of the patterns, each rotated, as host bits."""
    return np.stack([np.roll(bits, s) for s in shifts])[:, None, :]


def _check(backend: JaxBackend, dtype: DType) -> str | None:
    bits = PATTERNS[dtype]
    uint, host_dtype = bits.dtype, JAX_DTYPES[dtype]
    dim = bits.shape[0]
    shape = (2, _BLOCKS, _BLOCK_SIZE, 1, dim)
    want = np.zeros(shape, uint)
    flat = want.reshape(2, -1, 1, dim)
    slots = np.array([5, 2, 9], np.int64)
    k, v = _rows(bits, (0, 3, 7)), _rows(bits[::-1], (1, 4, 8))
    flat[0, slots], flat[1, slots] = k, v
    dev, cpu = backend.default_device(), cpu_device()

    def idx(ids: np.ndarray):  # noqa: ANN202 - a JaxIndex
        return backend.index_array(np.asarray(ids, np.int64), dev)

    rows = [jax.device_put(np.ascontiguousarray(r).view(host_dtype), cpu) for r in (k, v)]

    pool = backend._zeros(shape, dtype)
    pool = backend.scatter(pool, idx(slots), rows)
    order = slots[::-1].copy()
    got_k, want_k = backend.gather(pool, 0, idx(order)), flat[0, order].copy()
    src, dst = np.array([0, 2], np.int64), np.array([1, 3], np.int64)
    pool = backend.copy_blocks(pool, idx(src), idx(dst))
    want[:, dst] = want[:, src]
    other = backend._zeros(shape, dtype)
    other = backend.transfer_blocks(pool, idx([3]), other, idx([0]))
    want_other = np.zeros_like(want)
    want_other[:, 0] = want[:, 3]
    steps = (("gather", got_k, want_k), ("scatter + copy_blocks", pool, want),
             ("transfer_blocks", other, want_other))
    for what, array, expected in steps:
        seen = host_view(array).view(uint)
        if not np.array_equal(seen, expected):
            bad = np.flatnonzero(seen.reshape(-1) != expected.reshape(-1))[0]
            return (f"jax {jax.__version__} changes bits: after {what}, pattern "
                    f"{hex(int(expected.reshape(-1)[bad]))} came back as "
                    f"{hex(int(seen.reshape(-1)[bad]))} (the kernels must be pure data "
                    "movement; see kv_jax._kernels)")
    return None


def bit_exact_problems(backend: JaxBackend, dtypes: Iterable[DType]) -> dict[DType, str]:
    """The dtypes whose operations do not move every bit pattern unchanged, with the
    reason (the first pattern that changed, or the error raised)."""
    problems = {}
    for dtype in dtypes:
        try:
            problem = _check(backend, dtype)
        except Exception as exc:  # noqa: BLE001 - any failure means: do not declare it
            problem = f"jax {jax.__version__} failed the bit-exactness check: " \
                      f"{type(exc).__name__}: {exc}"
        if problem is not None:
            problems[dtype] = problem
    return problems
