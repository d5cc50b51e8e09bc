"""Test data and bit-exact comparison against a dense numpy reference.

The cache never does arithmetic on K/V, so the contract is bit-identity: what comes
back must have exactly the bits that went in.  The data here therefore is arbitrary
bit patterns (signed zeros, subnormals, large and tiny exponents), not tidy floats a
lossy copy could reproduce by accident.  NaN and infinity are left out because some
libraries canonicalise NaN payloads when converting from numpy, which is not the
cache's doing.

Host-side dtypes: ``float16`` and ``float32`` are themselves; ``bfloat16`` travels as
``float32`` whose low 16 bits are zero (``Backend.to_numpy`` widens it that way, and
the widening is exact, so the float32 bits still decide the bfloat16 bits).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvcore import Backend, Device, DType

from ._clauses import Clause, fail

__all__ = ["assert_same_bits", "hashed_kv", "host_dtype", "random_kv", "to_bits"]

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


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


def hashed_kv(keys: np.ndarray, heads: int, dim: int, dtype: DType) -> np.ndarray:
    """``[len(keys), heads, dim]`` host data; row ``i`` is a fixed function of ``keys[i]``.

    The same key always gives the same row, different keys (almost surely) different
    rows, so a row that shows up in the wrong place is recognisable.
    """
    keys = np.asarray(keys, dtype=np.uint64).reshape(-1, 1)
    lanes = np.arange(heads * dim, dtype=np.uint64).reshape(1, -1)
    with np.errstate(over="ignore"):
        h = _splitmix64(keys * np.uint64(0x100000001B3) + lanes)
    shape = (keys.shape[0], heads, dim)
    if dtype is DType.float32:
        b = (h >> np.uint64(32)).astype(np.uint32)
        b = np.where((b & 0x7F800000) == 0x7F800000, b & np.uint32(0xBFFFFFFF), b)
        return b.astype(np.uint32).view(np.float32).reshape(shape)
    b16 = (h >> np.uint64(48)).astype(np.uint16)
    if dtype is DType.float16:
        b16 = np.where((b16 & 0x7C00) == 0x7C00, b16 & np.uint16(0xBFFF), b16)
        return b16.astype(np.uint16).view(np.float16).reshape(shape)
    b16 = np.where((b16 & 0x7F80) == 0x7F80, b16 & np.uint16(0xBFFF), b16)
    return (b16.astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(shape)


def random_kv(rng: np.random.Generator, n: int, heads: int, dim: int,
              dtype: DType) -> np.ndarray:
    """``n`` rows of arbitrary bit patterns representable in ``dtype``."""
    keys = rng.integers(0, 2**62, size=n, dtype=np.int64)
    return hashed_kv(keys, heads, dim, dtype)


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


def assert_same_bits(item: Clause, got: np.ndarray, expected: np.ndarray, dtype: DType,
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
    if not np.array_equal(to_bits(got), to_bits(expected.astype(want, copy=False))):
        fail(item, f"{what}: data differs from the dense reference. "
             + _describe_rows(got, expected.astype(want, copy=False)))
