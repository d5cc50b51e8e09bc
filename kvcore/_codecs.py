"""Quantized K/V codecs: int8 and float8 codes with a float32 scale per token and head.

A cache whose ``dtype`` is a codec (``float8_e4m3``, ``float8_e5m2``, ``int8``) keeps
each element of K and V as one byte and, for every token and KV head, one float32
scale: the row's absolute maximum divided by the largest code (127 for int8, 448 for
E4M3, 57344 for E5M2), so the row's largest element maps to the largest code and
nothing clips.  Writes take K/V in the config's ``compute_dtype`` and encode them;
reads decode back to it.  Why per token and head (and not vLLM's per-tensor fp8
scale): a block's codes and scales then decode on their own, whatever was written
before or after, so copy-on-write, swap, prefix sharing and block stores move blocks
exactly as for float caches; see ``docs/quantized-kv.md``.

Codecs live once, here, written with the backend's :class:`~kvcore._array_ops.ArrayOps`
(a constant number of array calls per layer write or read, never a loop per token).
Their arithmetic is IEEE float32 (division, round half to even, float8 conversion
rounding to nearest even), so every library stores the same codes for the same
finite input.

Non-finite input: a (token, head) row holding an infinity or a NaN is stored as code
0 with a non-finite scale, and reads back NaN in every element of that row; the other
rows are unaffected.  (Quantization cannot keep NaN payloads or signed zeros; the
bit-exact promise of kvcore applies to the stored codes and scales.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._array_ops import ArrayOps
from ._device import DType

__all__ = ["CODECS", "Codec", "Float8Codec", "Int8Codec", "codec_for"]

#: float32 machine epsilon / 2 (rounding of one float32 operation).
_U32 = 2.0 ** -24
#: Unit roundoff and half the smallest subnormal of each compute dtype (decoding
#: rounds the float32 product into it).
_ROUNDING = {DType.float16: (2.0 ** -11, 2.0 ** -25), DType.bfloat16: (2.0 ** -8, 2.0 ** -134),
             DType.float32: (_U32, 2.0 ** -150)}
#: An absolute floor covering rows whose scale underflows float32's normal range
#: (absolute maximum below about 1e-34): their codes may clip or vanish.
_FLOOR = 2.0 ** -119


class Codec:
    """One quantized format: how K/V rows become codes and scales and back.

    ``dtype`` is the cache dtype naming it, ``code_dtype`` the storage dtype of its
    codes (``int8``, or ``uint8`` holding float8 bit patterns), ``limit`` the largest
    code magnitude a row's absolute maximum is scaled to.
    """

    dtype: DType
    code_dtype: DType
    scale_dtype = DType.float32
    limit: float

    def encode(self, ops: ArrayOps, x: Any) -> tuple[Any, Any]:
        """``x`` (``[..., dim]``, any float dtype) as ``(codes [..., dim] of code_dtype,
        scales [..., 1] float32)``."""
        x = ops.float32(x)
        scale = ops.amax(ops.abs(x)) / self.limit
        q = ops.clip(ops.divide(x, scale), -self.limit, self.limit)
        q = ops.where(ops.isfinite(q), q, 0.0)  # non-finite rows: code 0, see above
        return self._codes(ops, q), scale

    def decode(self, ops: ArrayOps, codes: Any, scales: Any, dtype: DType) -> Any:
        """Codes and scales as values of the float ``dtype``."""
        return ops.astype(ops.multiply(self._values(ops, codes), scales), dtype)

    def _codes(self, ops: ArrayOps, q: Any) -> Any:
        raise NotImplementedError

    def _values(self, ops: ArrayOps, codes: Any) -> Any:
        raise NotImplementedError

    # --- the declared error -----------------------------------------------------------

    def error_bound(self, x: np.ndarray, compute: DType) -> np.ndarray:
        """The most ``|decode(encode(x)) - x|`` may be, per element, for finite ``x``
        (``[..., dim]`` host values) read back in ``compute``."""
        raise NotImplementedError

    @property
    def precision(self) -> str:
        """The bound in words (for docs and reports)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.dtype.value}>"


def _row_scale(x: np.ndarray, limit: float) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    amax = np.max(np.abs(x), axis=-1, keepdims=True)
    return amax, amax / limit


class Int8Codec(Codec):
    """Symmetric int8: ``code = round(x / scale)`` in -127..127 (vLLM's and
    transformers' int8 KV variants use the same absmax scaling per token and head)."""

    dtype = DType.int8
    code_dtype = DType.int8
    limit = 127.0

    def _codes(self, ops: ArrayOps, q: Any) -> Any:
        return ops.astype(ops.rint(q), DType.int8)

    def _values(self, ops: ArrayOps, codes: Any) -> Any:
        return ops.astype(codes, DType.float32)

    def error_bound(self, x: np.ndarray, compute: DType) -> np.ndarray:
        u, tiny = _ROUNDING[compute]
        amax, scale = _row_scale(x, self.limit)
        # Rounding to the nearest code: half a step (the scale), plus the float32
        # division before it; then the float32 product and the cast to ``compute``.
        bound = scale * (0.5 + 2.0 ** -16) + amax * (u + 4 * _U32) + tiny + _FLOOR
        return np.broadcast_to(bound, np.shape(x))

    @property
    def precision(self) -> str:
        return ("|error| <= max|row| / 254 per element (half a code step), plus the "
                "rounding into the compute dtype")


class Float8Codec(Codec):
    """A float8 format scaled so the row's absolute maximum is the format's largest
    finite value: about 2**-(mantissa bits + 1) relative error per element, and
    ``scale * 2**-(subnormal bits + 1)`` absolute below the smallest normal."""

    code_dtype = DType.uint8

    def __init__(self, dtype: DType, limit: float, mantissa_bits: int,
                 smallest_subnormal: float) -> None:
        self.dtype = dtype
        self.limit = limit
        self.mantissa_bits = mantissa_bits
        self.smallest_subnormal = smallest_subnormal

    def _codes(self, ops: ArrayOps, q: Any) -> Any:
        return ops.float8_bits(q, self.dtype)

    def _values(self, ops: ArrayOps, codes: Any) -> Any:
        return ops.float8_values(codes, self.dtype)

    def error_bound(self, x: np.ndarray, compute: DType) -> np.ndarray:
        u, tiny = _ROUNDING[compute]
        x64 = np.abs(np.asarray(x, dtype=np.float64))
        amax, scale = _row_scale(x, self.limit)
        relative = 2.0 ** -(self.mantissa_bits + 1)  # half an ulp, relative
        step = scale * self.smallest_subnormal / 2  # half a subnormal step, absolute
        coded = x64 * (1 + relative) + step  # the largest the decoded value can be
        bound = (x64 * (relative + 2 * _U32) + step + amax * 2 * _U32
                 + coded * (u + 2 * _U32) + tiny + _FLOOR)
        return bound

    @property
    def precision(self) -> str:
        m = self.mantissa_bits
        return (f"|error| <= 2**-{m + 1} * |x| + scale * {self.smallest_subnormal / 2:g} "
                f"per element (half an ulp of a {m}-bit mantissa; half a subnormal step "
                "below the smallest normal), plus the rounding into the compute dtype")


#: The codec of each codec dtype.
CODECS: dict[DType, Codec] = {
    DType.int8: Int8Codec(),
    DType.float8_e4m3: Float8Codec(DType.float8_e4m3, 448.0, 3, 2.0 ** -9),
    DType.float8_e5m2: Float8Codec(DType.float8_e5m2, 57344.0, 2, 2.0 ** -16),
}


def codec_for(dtype: DType) -> Codec | None:
    """The codec of a cache ``dtype``; ``None`` for the float dtypes."""
    return CODECS.get(dtype)
