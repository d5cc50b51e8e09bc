"""A dense numpy reference of the quantized codecs' storage: float8 decoding by table,
and the decode a codec cache's reads must equal (bit for bit, NaN as NaN).

Pure numpy (no ml_dtypes), so the suite judges a backend's float8 arithmetic with an
independent implementation of the formats.
"""

from __future__ import annotations

import numpy as np

from kvcore import DType

__all__ = ["FLOAT8_TABLES", "as_compute", "decode", "float8_table"]


def float8_table(exponent_bits: int, mantissa_bits: int, *, finite_only: bool) -> np.ndarray:
    """float32 values of the 256 bit patterns of a float8 format (sign, exponent,
    mantissa; bias ``2**(e-1) - 1``).  ``finite_only`` (E4M3FN): no infinities, only
    the all-ones pattern is NaN; otherwise (E5M2) IEEE-style inf and NaN."""
    b = np.arange(256, dtype=np.int64)
    sign = np.where(b >> 7, -1.0, 1.0)
    e = (b >> mantissa_bits) & ((1 << exponent_bits) - 1)
    m = b & ((1 << mantissa_bits) - 1)
    bias = (1 << (exponent_bits - 1)) - 1
    frac = m / float(1 << mantissa_bits)
    value = np.where(e == 0, frac * 2.0 ** (1 - bias), (1 + frac) * 2.0 ** (e - bias))
    top = (1 << exponent_bits) - 1
    if finite_only:
        value = np.where((e == top) & (m == (1 << mantissa_bits) - 1), np.nan, value)
    else:
        value = np.where(e == top, np.where(m == 0, np.inf, np.nan), value)
    return (sign * value).astype(np.float32)


FLOAT8_TABLES = {DType.float8_e4m3: float8_table(4, 3, finite_only=True),
                 DType.float8_e5m2: float8_table(5, 2, finite_only=False)}


def as_compute(values: np.ndarray, compute: DType) -> np.ndarray:
    """float32 ``values`` rounded (to nearest even) into ``compute``, on the host the
    way ``Backend.to_numpy`` returns it (bfloat16 as float32 with 16 low zero bits)."""
    values = np.asarray(values, dtype=np.float32)
    if compute is DType.float32:
        return values
    if compute is DType.float16:
        with np.errstate(over="ignore", invalid="ignore"):
            return values.astype(np.float16)
    bits = values.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    out = (rounded & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(values), np.float32(np.nan), out)


def decode(codec: DType, codes: np.ndarray, scales: np.ndarray, compute: DType) -> np.ndarray:
    """What a read of a ``codec`` cache must return for host ``codes`` (uint8 / int8)
    and float32 ``scales`` (broadcast over the last axis)."""
    if codec is DType.int8:
        values = np.asarray(codes).astype(np.float32)
    else:
        values = FLOAT8_TABLES[codec][np.asarray(codes).view(np.uint8)]
    with np.errstate(invalid="ignore", over="ignore"):
        return as_compute(values * np.asarray(scales, dtype=np.float32), compute)
