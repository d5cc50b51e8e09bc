"""Test data and bit-exact comparison against a dense numpy reference.

The cache never does arithmetic on K/V, so the contract is bit-identity: what comes
back must have exactly the bits that went in.  Two kinds of data serve two kinds of
clause:

* *Ordinary* rows (:func:`hashed_kv`, :func:`random_kv`): arbitrary bit patterns of
  normal finite numbers (random sign, exponent and mantissa).  Tests of where rows go
  (scatter, gather order, block copies, the manager) use them, so a backend that
  mishandles only special values does not fail those clauses: it fails the ``bits.*``
  clause of the route that loses the bits.
* *Special* rows (:func:`special_kv`): fixed rows of -0.0, subnormals, the largest
  finite values, infinities and NaNs with payloads, quiet and signalling, for every
  dtype.  The ``bits.*`` clauses carry them through every round trip.

Host-side dtypes: ``float16`` and ``float32`` are themselves; ``bfloat16`` travels as
``float32`` whose low 16 bits are zero (``Backend.to_numpy`` widens it that way, and
the widening is exact, so the float32 bits still decide the bfloat16 bits).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvcore import Backend, Device, DType

from ._clauses import Clause, fail

__all__ = ["assert_same_bits", "hashed_kv", "host_dtype", "random_kv", "special_bits",
           "special_kv", "to_bits"]

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)

# (bits, name) of every special value, per kvcore dtype; bfloat16 as its 16 bits.
_SPECIAL_F16 = (
    (0x0000, "+0.0"), (0x8000, "-0.0"), (0x0001, "smallest subnormal"),
    (0x8001, "-smallest subnormal"), (0x03FF, "largest subnormal"),
    (0x83FF, "-largest subnormal"), (0x0155, "subnormal"), (0x0400, "smallest normal"),
    (0x7BFF, "largest finite"), (0xFBFF, "-largest finite"), (0x7C00, "+inf"),
    (0xFC00, "-inf"), (0x7E00, "quiet NaN"), (0xFE00, "-quiet NaN"),
    (0x7E2A, "quiet NaN with payload"), (0xFFFF, "-quiet NaN with payload"),
    (0x7C01, "signalling NaN"), (0x7D55, "signalling NaN with payload"),
    (0xFC3C, "-signalling NaN with payload"), (0x3C00, "1.0"))
_SPECIAL_BF16 = (
    (0x0000, "+0.0"), (0x8000, "-0.0"), (0x0001, "smallest subnormal"),
    (0x8001, "-smallest subnormal"), (0x007F, "largest subnormal"),
    (0x807F, "-largest subnormal"), (0x0055, "subnormal"), (0x0080, "smallest normal"),
    (0x7F7F, "largest finite"), (0xFF7F, "-largest finite"), (0x7F80, "+inf"),
    (0xFF80, "-inf"), (0x7FC0, "quiet NaN"), (0xFFC0, "-quiet NaN"),
    (0x7FD5, "quiet NaN with payload"), (0xFFFF, "-quiet NaN with payload"),
    (0x7F81, "signalling NaN"), (0x7FA5, "signalling NaN with payload"),
    (0xFF9A, "-signalling NaN with payload"), (0x3F80, "1.0"))
_SPECIAL_F32 = (
    (0x00000000, "+0.0"), (0x80000000, "-0.0"), (0x00000001, "smallest subnormal"),
    (0x80000001, "-smallest subnormal"), (0x007FFFFF, "largest subnormal"),
    (0x807FFFFF, "-largest subnormal"), (0x00123456, "subnormal"),
    (0x00800000, "smallest normal"), (0x7F7FFFFF, "largest finite"),
    (0xFF7FFFFF, "-largest finite"), (0x7F800000, "+inf"), (0xFF800000, "-inf"),
    (0x7FC00000, "quiet NaN"), (0xFFC00000, "-quiet NaN"),
    (0x7FC12345, "quiet NaN with payload"), (0xFFFFFFFF, "-quiet NaN with payload"),
    (0x7F800001, "signalling NaN"), (0x7FA5A5A5, "signalling NaN with payload"),
    (0xFF812345, "-signalling NaN with payload"), (0x3F800000, "1.0"))
_SPECIAL = {DType.float16: _SPECIAL_F16, DType.bfloat16: _SPECIAL_BF16,
            DType.float32: _SPECIAL_F32}


def host_dtype(dtype: DType) -> np.dtype:
    """The numpy dtype ``to_numpy`` must return for a cache of ``dtype``."""
    return np.dtype(np.float16) if dtype is DType.float16 else np.dtype(np.float32)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # A well-mixed, vectorised hash: every input bit flips about half the output bits.
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return z ^ (z >> np.uint64(31))


def _normal(bits: np.ndarray, exponent: int, lowest: int) -> np.ndarray:
    """``bits`` with an all-zero exponent (zero, subnormal) or an all-ones exponent
    (inf, NaN) moved into the normal range: the lowest exponent bit is set, or cleared,
    without touching sign or mantissa."""
    kind = bits.dtype.type
    exp = bits & kind(exponent)
    bits = np.where(exp == 0, bits | kind(lowest), bits)
    return np.where(exp == kind(exponent), bits & kind(~lowest & int(np.iinfo(kind).max)),
                    bits).astype(kind)


def hashed_kv(keys: np.ndarray, heads: int, dim: int, dtype: DType) -> np.ndarray:
    """``[len(keys), heads, dim]`` host rows of ordinary values: row ``i`` is a fixed
    function of ``keys[i]``.

    The same key always gives the same row, different keys (almost surely) different
    rows, so a row that shows up in the wrong place is recognisable.  Every element is
    a normal finite number (no zero, subnormal, infinity or NaN: :func:`special_kv`
    has those), with random sign, exponent and mantissa bits.
    """
    keys = np.asarray(keys, dtype=np.uint64).reshape(-1, 1)
    lanes = np.arange(heads * dim, dtype=np.uint64).reshape(1, -1)
    with np.errstate(over="ignore"):
        h = _splitmix64(keys * np.uint64(0x100000001B3) + lanes)
    shape = (keys.shape[0], heads, dim)
    if dtype is DType.float32:
        b = _normal((h >> np.uint64(32)).astype(np.uint32), 0x7F800000, 0x00800000)
        return b.view(np.float32).reshape(shape)
    b16 = (h >> np.uint64(48)).astype(np.uint16)
    if dtype is DType.float16:
        return _normal(b16, 0x7C00, 0x0400).view(np.float16).reshape(shape)
    b16 = _normal(b16, 0x7F80, 0x0080)
    return (b16.astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(shape)


def random_kv(rng: np.random.Generator, n: int, heads: int, dim: int,
              dtype: DType) -> np.ndarray:
    """``n`` rows of ordinary values (see :func:`hashed_kv`) representable in ``dtype``."""
    keys = rng.integers(0, 2**62, size=n, dtype=np.int64)
    return hashed_kv(keys, heads, dim, dtype)


def special_bits(dtype: DType) -> tuple[tuple[int, str], ...]:
    """``(bits, name)`` of every special value of ``dtype`` (bfloat16: its 16 bits)."""
    return _SPECIAL[dtype]


def _as_host(bits: np.ndarray, dtype: DType) -> np.ndarray:
    if dtype is DType.float16:
        return bits.astype(np.uint16).view(np.float16)
    if dtype is DType.bfloat16:
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return bits.astype(np.uint32).view(np.float32)


def special_kv(n: int, heads: int, dim: int, dtype: DType, *, shift: int = 0) -> np.ndarray:
    """``[n, heads, dim]`` host rows made only of the special values of ``dtype``,
    cycled so that every value appears in many rows and lanes; ``shift`` starts the
    cycle elsewhere (K and V get different rows)."""
    values = np.array([b for b, _ in _SPECIAL[dtype]], dtype=np.uint64)
    index = (np.arange(n * heads * dim) * 7 + shift) % len(values)
    return _as_host(values[index], dtype).reshape(n, heads, dim)


def to_bits(array: np.ndarray) -> np.ndarray:
    """The raw bits of a float16 / float32 host array, as unsigned integers."""
    if array.dtype == np.float16:
        return array.view(np.uint16)
    if array.dtype == np.float32:
        return array.view(np.uint32)
    raise TypeError(f"expected a float16 or float32 host array, got {array.dtype}")


def native(backend: Backend, host: np.ndarray, dtype: DType, device: Device) -> Any:
    """``host`` as the backend's array of ``dtype`` on ``device``."""
    return backend.from_numpy(host, dtype, device)


def _kind(bits: int, dtype: DType) -> str:
    """One element's host bits and what they are: ``0x8000 (-0.0)``, ``0x7d55
    (+signalling NaN payload 0x155)``...  bfloat16 is shown as its own 16 bits."""
    if dtype is DType.float16:
        sign, exp, man, quiet, top, shown = bits & 0x8000, (bits >> 10) & 0x1F, bits & 0x3FF, 0x200, 0x1F, f"0x{bits:04x}"
    else:
        if dtype is DType.bfloat16 and bits & 0xFFFF:
            return f"0x{bits:08x} (not a bfloat16: the low 16 bits are set)"
        sign, exp, man, quiet, top = bits & 0x80000000, (bits >> 23) & 0xFF, bits & 0x7FFFFF, 0x400000, 0xFF
        shown = f"0x{bits >> 16:04x}" if dtype is DType.bfloat16 else f"0x{bits:08x}"
    s = "-" if sign else "+"
    if exp == 0:
        name = f"{s}0.0" if man == 0 else f"{s}subnormal"
    elif exp == top and man == 0:
        name = f"{s}inf"
    elif exp == top:
        payload = man & (quiet - 1)
        if dtype is DType.bfloat16:
            payload >>= 16
        name = (f"{s}{'quiet' if man & quiet else 'signalling'} NaN"
                + (f" payload 0x{payload:x}" if payload else ""))
    else:
        name = f"{s}normal"
    return f"{shown} ({name})"


def _describe_bits(got: np.ndarray, expected: np.ndarray, dtype: DType) -> str:
    """Say which elements differ, by what kind of value they should have been."""
    g, e = to_bits(got).reshape(-1), to_bits(expected).reshape(-1)
    bad = np.flatnonzero(g != e)
    kinds: dict[str, list[int]] = {}
    for i in bad[:4096].tolist():
        kinds.setdefault(_kind(int(e[i]), dtype).split("(", 1)[-1].rstrip(")"), []).append(i)
    summary = ", ".join(f"{k}: {len(v)}" for k, v in sorted(kinds.items(), key=lambda kv: -len(kv[1])))
    first = [f"element {i}: seen {_kind(int(g[i]), dtype)}, expected {_kind(int(e[i]), dtype)}"
             for i in bad[:3].tolist()]
    return (f"{bad.size} of {e.size} elements differ; expected kinds of the differing "
            f"elements: {summary}; " + "; ".join(first))


def _describe_rows(got: np.ndarray, expected: np.ndarray) -> str:
    """Say how the rows of ``got`` relate to ``expected`` (order, zeros, garbage)."""
    g = to_bits(got).reshape(got.shape[0], -1)
    e = to_bits(expected).reshape(expected.shape[0], -1)
    bad = [i for i in range(g.shape[0]) if not np.array_equal(g[i], e[i])]
    lookup = {row.tobytes(): i for i, row in enumerate(e)}
    where = [lookup.get(g[i].tobytes()) for i in range(g.shape[0])]
    parts = [f"{len(bad)} of {g.shape[0]} token rows differ, first at row {bad[0]}"]
    if all(w is not None for w in where) and sorted(where) == list(range(len(where))):  # type: ignore[type-var]
        parts.append("every expected row is present but out of order: row i holds "
                     f"expected row {where[:16]} (tokens permuted, e.g. physical instead "
                     "of logical order)")
    elif all(not g[i].any() for i in bad):
        parts.append("the differing rows are all zero (data never written there or a "
                     "copy that did not happen)")
    else:
        found = [(i, where[i]) for i in bad if where[i] is not None][:8]
        if found:
            parts.append(f"some differing rows hold other tokens' data (row, source): {found}")
    i = bad[0]
    parts.append(f"row {i}: seen {got[i].reshape(-1)[:6].tolist()} ..., expected "
                 f"{expected[i].reshape(-1)[:6].tolist()} ...")
    return "; ".join(parts)


def assert_same_bits(item: Clause, got: Any, expected: np.ndarray, dtype: DType,
                     what: str) -> None:
    """Fail ``item`` unless host array ``got`` has exactly the bits of ``expected``."""
    want = host_dtype(dtype)
    if not isinstance(got, np.ndarray):
        fail(item, f"{what}: to_numpy did not return a numpy array",
             seen=type(got).__name__, expected="numpy.ndarray")
    if got.dtype != want:
        fail(item, f"{what}: a {dtype.value} cache came back as {got.dtype} (values were cast)",
             seen=str(got.dtype), expected=str(want))
    if got.shape != expected.shape:
        fail(item, f"{what}: wrong shape", seen=got.shape, expected=expected.shape)
    expected = expected.astype(want, copy=False)
    if np.array_equal(to_bits(got), to_bits(expected)):
        return
    if got.ndim >= 2 and got.shape[0] > 0 and np.isfinite(expected).all() and expected.any():
        detail = _describe_rows(got.reshape(got.shape[0], -1), expected.reshape(got.shape[0], -1))
    else:
        detail = _describe_bits(got, expected, dtype)
    fail(item, f"{what}: data differs from the dense reference. {detail}")


def assert_special_bits(item: Clause, got: Any, expected: np.ndarray, dtype: DType,
                        what: str) -> None:
    """:func:`assert_same_bits` for special rows: the report names the kinds of value
    (signed zero, subnormal, NaN payload...) that did not survive."""
    want = host_dtype(dtype)
    if (isinstance(got, np.ndarray) and got.dtype == want and got.shape == expected.shape
            and not np.array_equal(to_bits(got), to_bits(expected.astype(want, copy=False)))):
        fail(item, f"{what}: bits differ. "
             + _describe_bits(got, expected.astype(want, copy=False), dtype))
    assert_same_bits(item, got, expected, dtype, what)
