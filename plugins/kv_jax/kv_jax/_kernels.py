"""The jitted kernels: every pool-changing operation is one XLA computation that
donates the pool(s) it changes, so XLA writes into the old buffer instead of copying
the pool.

Shapes are static in XLA, so every kernel is compiled once per combination of pool
shape, dtype and index length.  Index arrays therefore arrive padded to a few bucket
lengths (:mod:`kv_jax._index`): padding entries are ``-1``, which the writes drop
(``mode="drop"`` with ``wrap_negative_indices=False``: a negative index is out of
bounds instead of counting from the end) and the reads clamp to slot 0 (their rows
are sliced off afterwards).  A new batch size inside a bucket therefore reuses the
compiled kernel.

Pure data movement, bit for bit: XLA:CPU has no native bfloat16 arithmetic and its
``float-normalization-bf16`` pass rewrites *every* bfloat16 instruction, data
movement included, as float32: a scatter into a bfloat16 pool would convert the whole
pool to float32 and back (measured: 220 ms for one decode write into a 256 MiB pool)
and canonicalise NaN payloads on the way.  The kernels contain no arithmetic on K/V
at all (scatter with a "replace" combiner, gather, slicing), so they are compiled
with that pass disabled; float16 and float32 are moved natively either way.
:mod:`kv_jax._selfcheck` proves at run time, per dtype, that the compiled kernels
move NaN payloads, subnormals and signed zeros unchanged, and the backend declares
only the dtypes that pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax

from ._devices import cpu_device

__all__ = ["COMPILER_OPTIONS", "Kernels", "default_kernels"]

#: Per-computation XLA options of every kernel (see the module docstring).
COMPILER_OPTIONS = {"xla_disable_hlo_passes": "float-normalization-bf16"}

#: Out-of-bounds handling: padding (-1) is dropped by writes, clamped by reads.
_DROP = {"mode": "drop", "wrap_negative_indices": False}
_CLIP = {"mode": "clip", "wrap_negative_indices": False}


def _slot_rows(pool: Any) -> Any:
    """``[P, blocks, block_size, H, D]`` as ``[P, slots, H, D]`` (a free reshape)."""
    planes, blocks, block_size, heads, dim = pool.shape
    return pool.reshape(planes, blocks * block_size, heads, dim)


def _write(pool: Any, slots: Any, rows: Sequence[Any]) -> Any:
    flat = _slot_rows(pool)
    for plane, values in enumerate(rows):
        flat = flat.at[plane, slots].set(values, **_DROP)
    return flat.reshape(pool.shape)


def _read(pool: Any, plane: int, slots: Any) -> Any:
    return _slot_rows(pool)[plane].at[slots].get(**_CLIP)


def _copy(pool: Any, src: Any, dst: Any) -> Any:
    # The gather completes before the scatter reads its operand, so overlapping
    # src/dst lists would still copy the old contents (the contract forbids them).
    return pool.at[:, dst].set(pool.at[:, src].get(**_CLIP), **_DROP)


def _move(src_pool: Any, src: Any, dst_pool: Any, dst: Any) -> Any:
    return dst_pool.at[:, dst].set(src_pool.at[:, src].get(**_CLIP), **_DROP)


def _write_layers(pools: tuple[Any, ...], slots: Any,
                  rows: tuple[tuple[Any, ...], ...]) -> tuple[Any, ...]:
    return tuple(_write(pool, slots, r) for pool, r in zip(pools, rows))


def _copy_layers(pools: tuple[Any, ...], src: Any, dst: Any) -> tuple[Any, ...]:
    return tuple(_copy(pool, src, dst) for pool in pools)


def _move_layers(src_pools: tuple[Any, ...], src: Any, dst_pools: tuple[Any, ...],
                 dst: Any) -> tuple[Any, ...]:
    return tuple(_move(s, src, d, dst) for s, d in zip(src_pools, dst_pools))


def _zeros(shape: tuple[int, ...], dtype: Any) -> Any:
    return jax.numpy.zeros(shape, dtype)


class Kernels:
    """The compiled kernels (one ``jax.jit`` object each, so each keeps its own cache
    of executables, which the tests count).

    ``compiler_options`` replace :data:`COMPILER_OPTIONS` (the tests build kernels
    without them to show what the self-check catches)."""

    def __init__(self, compiler_options: dict[str, Any] | None = None) -> None:
        options = COMPILER_OPTIONS if compiler_options is None else compiler_options

        def _jit(fn: Callable[..., Any], **kwargs: Any) -> Any:
            return jax.jit(fn, compiler_options=options, **kwargs)

        #: ``scatter(pool, slots, rows) -> pool``; donates ``pool``.
        self.scatter = _jit(_write, donate_argnums=0)
        #: ``scatter_layers(pools, slots, rows) -> pools``; donates every pool.
        self.scatter_layers = _jit(_write_layers, donate_argnums=0)
        #: ``gather(pool, plane, slots) -> [len(slots), H, D]``; ``plane`` is static.
        self.gather = _jit(_read, static_argnums=1)
        #: ``copy_blocks(pool, src, dst) -> pool``; donates ``pool``.
        self.copy_blocks = _jit(_copy, donate_argnums=0)
        self.copy_blocks_layers = _jit(_copy_layers, donate_argnums=0)
        #: ``transfer_blocks(src_pool, src, dst_pool, dst) -> dst_pool``; donates
        #: ``dst_pool`` only (the source pool stays the caller's).
        self.transfer_blocks = _jit(_move, donate_argnums=2)
        self.transfer_blocks_layers = _jit(_move_layers, donate_argnums=2)
        #: ``zeros(shape, dtype)``: a pool XLA owns (never one aliasing numpy memory,
        #: which JAX could not donate), *committed* to the CPU device like every
        #: kernel output, so the first write finds the executable the later ones use
        #: (jit's cache tells committed and uncommitted arguments apart).
        self.zeros = jax.jit(_zeros, static_argnums=(0, 1),
                             out_shardings=jax.sharding.SingleDeviceSharding(cpu_device()))

    def cache_sizes(self) -> dict[str, int]:
        """Compiled executables per kernel (``jax.jit``'s own cache)."""
        return {name: fn._cache_size() for name, fn in vars(self).items()}


@functools.cache
def default_kernels() -> Kernels:
    """The process-wide kernels: compiled executables are shared by every backend
    instance and every manager.  Made on first use (it needs JAX's CPU device)."""
    return Kernels()
