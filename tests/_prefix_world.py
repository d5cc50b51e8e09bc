"""A tiny engine over :class:`kvcore.KvCacheManager` for prefix-cache scenarios.

The K/V an engine writes at position ``p`` are a function of the salt, the layer and
the token ids ``0..p`` (what a transformer's K/V depend on), so a block served from
the wrong prefix, the wrong tenant or a stale copy reads different numbers and every
read is compared with what the tokens imply.  Every step reads every live sequence
back and runs ``check_invariants()``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from kvcore import AllocationRequest, CacheConfig, KvCacheManager
from kvcore.errors import PendingPrefixError

__all__ = ["World", "prefix_kv"]

_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                 0xD6E8FEB86659FD93], dtype=np.uint64)


def _chain(tokens: Sequence[int], salt: str | None) -> np.ndarray:
    """One 64-bit value per position, depending on the salt and every token up to it."""
    h = int.from_bytes(hashlib.blake2b(repr(salt).encode(), digest_size=8).digest(), "little")
    out = np.empty(len(tokens), dtype=np.uint64)
    for i, tok in enumerate(tokens):
        h = hash((h, int(tok))) & (2**64 - 1)
        out[i] = h
    return out


def prefix_kv(tokens: Sequence[int], salt: str | None, layer: int,
              heads: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """K and V (``[len(tokens), heads, dim]`` float32) of ``tokens`` at ``layer``."""
    h = _chain(tokens, salt)
    n, width = h.size, heads * dim
    planes = []
    for plane in (0, 1):
        salt_mix = np.uint64((layer * 2 + plane + 1) * 0x2545F4914F6CDD1D & (2**64 - 1))
        cols = _MIX[np.arange(width) % _MIX.size] + np.arange(width, dtype=np.uint64)
        with np.errstate(over="ignore"):
            mixed = (h[:, None] ^ salt_mix) * cols[None, :]
        values = (mixed >> np.uint64(40)).astype(np.float32) / np.float32(2**24)
        planes.append(values.reshape(n, heads, dim))
    return planes[0], planes[1]


class World:
    """One manager plus what each live request's tokens are."""

    def __init__(self, *, num_blocks: int, block_size: int = 4, num_layers: int = 2,
                 prefix_caching: bool = True, swap_blocks: int = 0) -> None:
        self.config = CacheConfig(num_layers=num_layers, num_kv_heads=1, head_dim=2,
                                  dtype="float32", block_size=block_size,
                                  num_blocks=num_blocks, swap_blocks=swap_blocks,
                                  enable_prefix_caching=prefix_caching, hash_seed=17)
        self.mgr = KvCacheManager(self.config, backend="numpy")
        self.bs = block_size
        self.tokens: dict[str, list[int]] = {}
        self.salt: dict[str, str | None] = {}

    # --- requests -----------------------------------------------------------------

    def allocate(self, rid: str, tokens: Sequence[int], *, extra_key: str | None = None,
                 **kw: object):
        """Allocate ``rid`` for the prompt ``tokens``; check what it got served."""
        handle = self.mgr.allocate(AllocationRequest(
            request_id=rid, prompt_token_ids=list(tokens), extra_key=extra_key, **kw))
        self.tokens[rid] = list(tokens)
        self.salt[rid] = extra_key
        self.step()
        return handle

    def allocate_empty(self, rid: str, *, extra_key: str | None = None):
        """A request that reads nothing from the cache but publishes its prompt:
        allocated with no prompt tokens, its prompt arrives through ``extend``."""
        handle = self.mgr.allocate(AllocationRequest(request_id=rid, prompt_token_ids=[],
                                                     extra_key=extra_key))
        self.tokens[rid] = []
        self.salt[rid] = extra_key
        self.step()
        return handle

    def extend(self, rid: str, tokens: Sequence[int]) -> None:
        """Append ``tokens`` (ids known) without writing their K/V yet."""
        self.mgr.extend(rid, len(tokens), token_ids=list(tokens))
        self.tokens[rid].extend(tokens)
        self.step()

    def write(self, rid: str, upto: int | None = None, *,
              layers: Sequence[int] | None = None) -> None:
        """Compute (write) ``rid``'s positions from where each layer stands up to
        ``upto`` (default: everything it holds), layer by layer."""
        handle = self.mgr.get_handle(rid)
        end = len(self.tokens[rid]) if upto is None else upto
        for layer in range(self.config.num_layers) if layers is None else layers:
            start = handle.num_written(layer)
            if start >= end:
                continue
            k, v = self.expected(rid, layer, end)
            self.mgr.write(handle, layer, k[start:], v[start:], start=start)
        self.step()

    def decode(self, rid: str, token: int) -> None:
        """One decode step: a new token, its K/V written on every layer."""
        self.extend(rid, [token])
        self.write(rid)

    def free(self, rid: str) -> None:
        self.mgr.deallocate(rid)
        del self.tokens[rid]
        del self.salt[rid]
        self.step()

    # --- checks -------------------------------------------------------------------

    def expected(self, rid: str, layer: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        c = self.config
        return prefix_kv(self.tokens[rid][:n], self.salt[rid], layer, c.num_kv_heads,
                         c.head_dim)

    def check(self, rid: str) -> None:
        """Every layer of ``rid`` reads exactly what its tokens imply.  A layer still
        waiting for a joined prefill (``PendingPrefixError``) is skipped."""
        handle = self.mgr.get_handle(rid)
        if handle.is_swapped():
            return
        for layer in range(self.config.num_layers):
            n = handle.num_written(layer)
            try:
                pair = handle.kv_cache(layer)
            except PendingPrefixError:
                continue
            if n == 0:
                if pair is not None:
                    raise AssertionError(f"{rid}: layer {layer} reads data, none written")
                continue
            k, v = self.expected(rid, layer, n)
            np.testing.assert_array_equal(pair[0].native, k, err_msg=f"{rid} K layer {layer}")
            np.testing.assert_array_equal(pair[1].native, v, err_msg=f"{rid} V layer {layer}")

    def step(self) -> None:
        """After every operation: every live request reads right, the parts agree."""
        for rid in self.tokens:
            self.check(rid)
        self.mgr.check_invariants()

    def blocks(self, rid: str) -> list[int]:
        return self.mgr.get_handle(rid).block_table().physical_blocks

    def served(self, rid: str) -> int:
        return self.mgr.get_handle(rid).num_cached_tokens()

    def tokens_of(self, *block_fills: int) -> list[int]:
        """A prompt whose block ``i`` is ``block_size`` copies of ``block_fills[i]``
        (vLLM's tests build prompts this way); a trailing partial block is not
        expressible here, append it yourself."""
        return [t for t in block_fills for _ in range(self.bs)]
