"""Bad input, across the public API: a typed error that names the value, and nothing
changes (issue 10).

One table, one test.  Every case runs on a freshly populated manager (written
prompts, a prefix shared through the cache, a fork, a swapped-out request, a
deallocated handle, fresh, stale and foreign slot mappings, another manager, a closed
one).  The test asserts the exception's exact type, that its message names the
offending value (or what was asked of it), and that the manager's whole observable
state (:func:`tests._observe.observe`: statistics, every live table, written counts,
token ids, every resident request's K/V and every layer pool bit for bit) is as it
was, except ``allocation_failures``, which must count each ``OutOfBlocksError``.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydantic
import pytest
import torch

from kvcore import AllocationRequest, CacheConfig, KvCacheManager
from kvcore.errors import (CacheError, CapacityError, DeviceMismatchError, DtypeMismatchError,
                           DuplicateRequestError, HandleSwappedError, InvalidHandleError,
                           LayerIndexError, ManagerClosedError, NotCopyableError,
                           OutOfBlocksError, PendingPrefixError, PoolAllocationError,
                           ShapeMismatchError, StaleSlotMappingError, UnknownBackendError,
                           UnknownRequestError, UnsupportedError, WriteOrderError)

from ._diff_model import SPECIAL_BITS
from ._observe import describe_difference, observe

CONFIG = dict(num_layers=2, num_kv_heads=2, head_dim=4, dtype="float32", block_size=4,
              num_blocks=16, swap_blocks=3, hash_seed=5)
HEADS, DIM = 2, 4
ValidationError = pydantic.ValidationError


def R(rid: str, **kw: Any) -> AllocationRequest:  # noqa: N802 - reads like the class
    return AllocationRequest(request_id=rid, **kw)


class Ctx:
    """A manager in a state with a bit of everything, and things to misuse on it."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.cfg = CacheConfig(**CONFIG)
        self._rng = np.random.default_rng(7)
        m = self.mgr = KvCacheManager(self.cfg, backend)
        self.a = m.allocate(R("a", prompt_token_ids=list(range(1, 11))))
        self.fill(self.a)
        # c shares a's first two blocks through the prefix cache.
        self.c = m.allocate(R("c", prompt_token_ids=list(range(1, 9)) + [50, 51]))
        self.fill(self.c)
        # stale: b's mapping made (and written) before b was forked.
        self.b = m.allocate(R("b", num_tokens=3))
        self.fill(self.b)
        self.stale = m.extend(self.b, 1)
        self.write_all(self.stale)
        self.bf = m.fork(self.b, "bf")
        # fresh: a's next two slots, not written yet.
        self.fresh = m.extend(self.a, 2, token_ids=[11, 12])
        # e's mapping completes a block that f then shares through the prefix cache:
        # writing it again would change f's K/V (issue 10, defect 1).
        self.e = m.allocate(R("e", prompt_token_ids=[90, 91, 92]))
        self.fill(self.e)
        self.e_map = m.extend(self.e, 1, token_ids=[93])
        self.write_all(self.e_map)
        self.f = m.allocate(R("f", prompt_token_ids=[90, 91, 92, 93, 94], allow_full_hit=True))
        self.fill(self.f)
        assert self.f.num_cached_tokens() == 4
        # s is swapped out, d deallocated.
        self.s = m.allocate(R("s", num_tokens=5))
        self.fill(self.s)
        m.swap_out(self.s)
        self.dead = m.allocate(R("d", num_tokens=2))
        self.fill(self.dead)
        self.dead_map = m.extend(self.dead, 1)
        m.deallocate(self.dead)
        # Another manager of the same shape, a request of the same id there, its mapping.
        self.other = KvCacheManager(self.cfg, backend)
        self.oh = self.other.allocate(R("a", num_tokens=2))
        self.foreign = self.other.extend(self.oh, 1)
        self.closed = KvCacheManager(self.cfg, backend)
        self.closed_h = self.closed.allocate(R("x", num_tokens=1))
        self.closed.close()
        self.noswap = KvCacheManager(self.cfg.model_copy(update={"swap_blocks": 0}), backend)
        self.nh = self.noswap.allocate(R("n", num_tokens=1))

    # --- arrays -------------------------------------------------------------------

    def words(self, n: int) -> np.ndarray:
        w = self._rng.integers(0, 2**32, (n, HEADS, DIM), dtype=np.uint64).astype(np.uint32)
        w.reshape(-1)[::3] = SPECIAL_BITS[np.arange(w.size)[::3] % SPECIAL_BITS.size]
        return w

    def np_kv(self, n: int, dtype: Any = np.float32) -> np.ndarray:
        """A numpy K or V of ``n`` tokens, of ``dtype`` (float32: odd bit patterns)."""
        if np.dtype(dtype) == np.float32:
            return self.words(n).view(np.float32)
        return np.ones((n, HEADS, DIM), dtype=dtype)

    def kv(self, n: int) -> Any:
        """K or V of ``n`` tokens in the backend's own array type."""
        a = self.words(n).view(np.float32)
        return torch.from_numpy(a) if self.backend == "torch" else a

    def fill(self, h: Any) -> None:
        for layer in range(2):
            start = h.num_written(layer)
            n = h.num_tokens() - start
            if n:
                self.mgr.write(h, layer, self.kv(n), self.kv(n), start=start)

    def write_all(self, mapping: Any) -> None:
        for layer in range(2):
            self.mgr.write_slots(layer, mapping, self.kv(len(mapping)), self.kv(len(mapping)))

    def fill_pool(self) -> None:
        """Take every free block."""
        free = self.mgr.stats().free_blocks + self.mgr.stats().cached_blocks
        self.mgr.allocate(R("filler", num_tokens=4 * free))


@dataclass(frozen=True)
class Bad:
    id: str
    call: Callable[[Ctx], Any]
    error: type[BaseException]
    #: Substrings the message must contain: the offending value, or what was asked.
    names: tuple[str, ...]
    failures: int = 0
    setup: Callable[[Ctx], Any] | None = None
    backends: tuple[str, ...] = ("numpy", "torch")


def bad(id: str, call: Callable[[Ctx], Any], error: type[BaseException], *names: str,
        **kw: Any) -> Bad:
    return Bad(id, call, error, names, **kw)


def cfg(**kw: Any) -> CacheConfig:
    return CacheConfig(**{**CONFIG, **kw})


class FakeDLPack:
    """Claims to be an array on a DLPack device; exporting it fails (it has no data)."""

    def __init__(self, device_type: int, shape: tuple[int, ...] = (3, HEADS, DIM)) -> None:
        self._device = (device_type, 0)
        self.shape = shape

    def __dlpack_device__(self) -> tuple[int, int]:
        return self._device

    def __dlpack__(self, **kw: Any) -> Any:
        raise BufferError("this producer has no data to export")


def _w(x: Ctx, key: Any, value: Any = None, layer: Any = 0, **kw: Any) -> Any:
    """Write ``key``/``value`` into ``a``'s last two (fresh) positions."""
    return x.mgr.write(x.a, layer, key, x.kv(2) if value is None else value, **kw)


CASES: list[Bad] = [
    # --- CacheConfig ---------------------------------------------------------------------
    bad("config-num_layers-bool", lambda x: cfg(num_layers=True), ValidationError,
        "num_layers", "True"),
    bad("config-num_layers-zero", lambda x: cfg(num_layers=0), ValidationError, "num_layers", "0"),
    bad("config-num_layers-negative", lambda x: cfg(num_layers=-2), ValidationError,
        "num_layers", "-2"),
    bad("config-num_layers-float", lambda x: cfg(num_layers=2.0), ValidationError,
        "num_layers", "2.0"),
    bad("config-num_layers-str", lambda x: cfg(num_layers="2"), ValidationError,
        "num_layers", "'2'"),
    bad("config-num_kv_heads-bool", lambda x: cfg(num_kv_heads=False), ValidationError,
        "num_kv_heads", "False"),
    bad("config-head_dim-none", lambda x: cfg(head_dim=None), ValidationError, "head_dim", "None"),
    bad("config-block_size-zero", lambda x: cfg(block_size=0), ValidationError, "block_size", "0"),
    bad("config-block_size-bool", lambda x: cfg(block_size=True), ValidationError,
        "block_size", "True"),
    bad("config-num_blocks-float", lambda x: cfg(num_blocks=1.5), ValidationError,
        "num_blocks", "1.5"),
    bad("config-num_blocks-bool", lambda x: cfg(num_blocks=True), ValidationError,
        "num_blocks", "True"),
    bad("config-swap_blocks-negative", lambda x: cfg(swap_blocks=-1), ValidationError,
        "swap_blocks", "-1"),
    bad("config-swap_blocks-bool", lambda x: cfg(swap_blocks=True), ValidationError,
        "swap_blocks", "True"),
    bad("config-dtype-uint8", lambda x: cfg(dtype="uint8"), ValidationError, "dtype", "uint8"),
    bad("config-dtype-float64", lambda x: cfg(dtype="float64"), ValidationError, "float64"),
    bad("config-device-index-on-cpu", lambda x: cfg(device="cpu:1"), ValidationError,
        "device", "cpu"),
    bad("config-device-garbage", lambda x: cfg(device="cu da"), ValidationError, "cu da"),
    bad("config-pressure-above-one", lambda x: cfg(pressure_medium=1.5), ValidationError,
        "pressure_medium", "1.5"),
    bad("config-pressure-bool", lambda x: cfg(pressure_high=True), ValidationError,
        "pressure_high", "True"),
    bad("config-pressure-out-of-order", lambda x: cfg(pressure_medium=0.9, pressure_high=0.8),
        ValidationError, "0.9", "0.8"),
    bad("config-prefix-caching-str", lambda x: cfg(enable_prefix_caching="yes"),
        ValidationError, "enable_prefix_caching", "yes"),
    bad("config-prefix-caching-int", lambda x: cfg(enable_prefix_caching=1), ValidationError,
        "enable_prefix_caching", "1"),
    bad("config-hash_seed-bool", lambda x: cfg(hash_seed=True), ValidationError,
        "hash_seed", "True"),
    bad("config-hash_seed-float", lambda x: cfg(hash_seed=1.5), ValidationError,
        "hash_seed", "1.5"),
    bad("config-hash_seed-str", lambda x: cfg(hash_seed="7"), ValidationError, "hash_seed", "'7'"),
    bad("config-unknown-field", lambda x: cfg(num_block=16), ValidationError, "num_block"),
    # --- AllocationRequest -----------------------------------------------------------------
    bad("request-empty-id", lambda x: R(""), ValidationError, "request_id"),
    bad("request-int-id", lambda x: AllocationRequest(request_id=5), ValidationError,
        "request_id", "5"),
    bad("request-num_tokens-bool", lambda x: R("r", num_tokens=True), ValidationError,
        "num_tokens", "True"),
    bad("request-num_tokens-negative", lambda x: R("r", num_tokens=-1), ValidationError,
        "num_tokens", "-1"),
    bad("request-num_tokens-float", lambda x: R("r", num_tokens=2.5), ValidationError,
        "num_tokens", "2.5"),
    bad("request-num_tokens-str", lambda x: R("r", num_tokens="3"), ValidationError,
        "num_tokens", "'3'"),
    bad("request-token-negative", lambda x: R("r", prompt_token_ids=[1, -1]), ValidationError,
        "prompt_token_ids[1]", "-1"),
    bad("request-token-2**31", lambda x: R("r", prompt_token_ids=[1, 2**31]), ValidationError,
        "prompt_token_ids[1]", "2147483648"),
    bad("request-token-2**40", lambda x: R("r", prompt_token_ids=[1, 2**40]), ValidationError,
        "1099511627776"),
    bad("request-token-float", lambda x: R("r", prompt_token_ids=[1, 2.0]), TypeError,
        "prompt_token_ids[1]", "2.0"),
    bad("request-token-str", lambda x: R("r", prompt_token_ids=[1, "2"]), TypeError,
        "prompt_token_ids[1]", "'2'"),
    bad("request-token-bool", lambda x: R("r", prompt_token_ids=[True, 2]), TypeError,
        "prompt_token_ids[0]", "True"),
    bad("request-token-none", lambda x: R("r", prompt_token_ids=[1, None]), TypeError,
        "prompt_token_ids[1]", "None"),
    bad("request-tokens-str", lambda x: R("r", prompt_token_ids="abc"), TypeError,
        "prompt_token_ids", "str"),
    bad("request-tokens-float-array", lambda x: R("r", prompt_token_ids=np.array([1.0])),
        TypeError, "prompt_token_ids", "float64"),
    bad("request-tokens-2d-array", lambda x: R("r", prompt_token_ids=np.array([[1, 2]])),
        TypeError, "prompt_token_ids", "[1, 2]"),
    bad("request-tokens-negative-array", lambda x: R("r", prompt_token_ids=np.array([3, -5])),
        ValidationError, "prompt_token_ids[1]", "-5"),
    bad("request-tokens-length-mismatch",
        lambda x: R("r", num_tokens=3, prompt_token_ids=[1, 2]), ValidationError,
        "num_tokens=3", "len(prompt_token_ids)=2"),
    bad("request-allow_full_hit-int", lambda x: R("r", allow_full_hit=1), ValidationError,
        "allow_full_hit", "1"),
    bad("request-join_pending-str", lambda x: R("r", join_pending="yes"), ValidationError,
        "join_pending", "yes"),
    bad("request-extra_key-int", lambda x: R("r", extra_key=5), ValidationError, "extra_key", "5"),
    bad("request-unknown-field", lambda x: R("r", prompt=[1]), ValidationError, "prompt"),
    # --- KvCacheManager(...) ------------------------------------------------------------------
    bad("manager-config-dict", lambda x: KvCacheManager(CONFIG, x.backend), TypeError, "dict"),
    bad("manager-on_pressure-int", lambda x: KvCacheManager(x.cfg, x.backend, on_pressure=5),
        TypeError, "on_pressure", "5"),
    bad("manager-on_pressure-str", lambda x: KvCacheManager(x.cfg, x.backend, on_pressure="log"),
        TypeError, "on_pressure", "'log'"),
    bad("manager-backend-int", lambda x: KvCacheManager(x.cfg, 5), TypeError, "backend", "int"),
    bad("manager-backend-unknown", lambda x: KvCacheManager(x.cfg, "nope"), UnknownBackendError,
        "'nope'"),
    bad("manager-pool-10**13-blocks", lambda x: KvCacheManager(cfg(num_blocks=10**13), x.backend),
        PoolAllocationError, str(10**13 * 4 * 2 * 4 * 4 * 2), "bytes"),
    bad("manager-device-unsupported", lambda x: KvCacheManager(cfg(device="cuda:0"), "numpy"),
        UnsupportedError, "cuda:0", backends=("numpy",)),
    bad("manager-swap-device-unsupported",
        lambda x: KvCacheManager(cfg(swap_device="cuda:0"), "numpy"), UnsupportedError,
        "cuda:0", backends=("numpy",)),
    # --- allocate ------------------------------------------------------------------------------
    bad("allocate-dict", lambda x: x.mgr.allocate({"request_id": "z"}), TypeError, "dict"),
    bad("allocate-id-str", lambda x: x.mgr.allocate("z"), TypeError, "str"),
    bad("can_allocate-str", lambda x: x.mgr.can_allocate("z"), TypeError, "str"),
    bad("allocate-duplicate-id", lambda x: x.mgr.allocate(R("c", num_tokens=1)),
        DuplicateRequestError, "'c'"),
    bad("allocate-duplicate-id-swapped", lambda x: x.mgr.allocate(R("s", num_tokens=1)),
        DuplicateRequestError, "'s'"),
    bad("allocate-out-of-blocks", lambda x: x.mgr.allocate(R("z", num_tokens=1000)),
        OutOfBlocksError, "'z'", "250", failures=1),
    bad("allocate-out-of-blocks-2**63", lambda x: x.mgr.allocate(R("z", num_tokens=2**63)),
        OutOfBlocksError, "'z'", str(2**63), failures=1),
    bad("allocate-prefix-out-of-blocks",
        lambda x: x.mgr.allocate(R("z", prompt_token_ids=list(range(1, 11)))),
        OutOfBlocksError, "'z'", failures=1, setup=Ctx.fill_pool),
    # --- extend / extend_batch ------------------------------------------------------------------
    bad("extend-zero", lambda x: x.mgr.extend(x.c, 0), ValueError, "num_tokens", "0"),
    bad("extend-negative", lambda x: x.mgr.extend(x.c, -3), ValueError, "num_tokens", "-3"),
    bad("extend-bool", lambda x: x.mgr.extend(x.c, True), TypeError, "num_tokens", "True"),
    bad("extend-float", lambda x: x.mgr.extend(x.c, 1.0), TypeError, "num_tokens", "1.0"),
    bad("extend-str", lambda x: x.mgr.extend(x.c, "1"), TypeError, "num_tokens", "'1'"),
    bad("extend-none", lambda x: x.mgr.extend(x.c, None), TypeError, "num_tokens", "None"),
    bad("extend-out-of-blocks", lambda x: x.mgr.extend(x.c, 100), OutOfBlocksError, "100",
        failures=1),
    bad("extend-2**63-1-tokens", lambda x: x.mgr.extend(x.c, 2**63 - 1), OutOfBlocksError,
        str(2**63 - 1), failures=1),
    bad("extend-2**64-tokens", lambda x: x.mgr.extend(x.c, 2**64), OutOfBlocksError,
        str(2**64), failures=1),
    bad("extend-swapped", lambda x: x.mgr.extend(x.s, 1), HandleSwappedError, "'s'"),
    bad("extend-dead-handle", lambda x: x.mgr.extend(x.dead, 1), InvalidHandleError, "'d'"),
    bad("extend-unknown-id", lambda x: x.mgr.extend("zz", 1), UnknownRequestError, "'zz'"),
    bad("extend-foreign-handle", lambda x: x.mgr.extend(x.oh, 1), InvalidHandleError,
        "'a'", "different manager"),
    bad("extend-handle-int", lambda x: x.mgr.extend(7, 1), TypeError, "int"),
    bad("extend_batch-str", lambda x: x.mgr.extend_batch("ab", 1), TypeError, "str"),
    bad("extend_batch-bytes", lambda x: x.mgr.extend_batch(b"ab", 1), TypeError, "bytes"),
    bad("extend_batch-one-handle", lambda x: x.mgr.extend_batch(x.c, 1), TypeError,
        "KvCacheHandle"),
    bad("extend_batch-set", lambda x: x.mgr.extend_batch({x.c}, 1), TypeError, "set"),
    bad("extend_batch-generator", lambda x: x.mgr.extend_batch((h for h in [x.c]), 1),
        TypeError, "generator"),
    bad("extend_batch-duplicate", lambda x: x.mgr.extend_batch([x.c, "c"], 1), ValueError,
        "'c'", "more than once"),
    bad("extend_batch-unknown-second", lambda x: x.mgr.extend_batch([x.c, "zz"], 1),
        UnknownRequestError, "'zz'"),
    bad("extend_batch-int-second", lambda x: x.mgr.extend_batch([x.c, 3], 1), TypeError, "int"),
    bad("extend_batch-dead-second", lambda x: x.mgr.extend_batch([x.c, x.dead], 1),
        InvalidHandleError, "'d'"),
    bad("extend_batch-swapped-second", lambda x: x.mgr.extend_batch([x.c, x.s], 1),
        HandleSwappedError, "'s'"),
    bad("extend_batch-foreign-second", lambda x: x.mgr.extend_batch([x.c, x.oh], 1),
        InvalidHandleError, "different manager"),
    bad("extend_batch-out-of-blocks", lambda x: x.mgr.extend_batch([x.a, x.c, x.b], 40),
        OutOfBlocksError, "3 sequence(s)", "40", failures=1),
    bad("token_ids-negative", lambda x: x.mgr.extend(x.c, 2, token_ids=[-1, -1]), ValueError,
        "token_ids[0]", "-1"),
    bad("token_ids-2**31", lambda x: x.mgr.extend(x.c, 1, token_ids=[2**31]), ValueError,
        "2147483648"),
    bad("token_ids-float", lambda x: x.mgr.extend(x.c, 1, token_ids=[1.5]), TypeError,
        "token_ids[0][0]", "1.5"),
    bad("token_ids-bool", lambda x: x.mgr.extend(x.c, 1, token_ids=[True]), TypeError,
        "token_ids[0][0]", "True"),
    bad("token_ids-str-id", lambda x: x.mgr.extend(x.c, 1, token_ids=["7"]), TypeError,
        "token_ids[0][0]", "'7'"),
    bad("token_ids-str", lambda x: x.mgr.extend(x.c, 2, token_ids="ab"), TypeError,
        "token_ids[0]", "str"),
    bad("token_ids-int", lambda x: x.mgr.extend(x.c, 1, token_ids=5), TypeError,
        "token_ids[0]", "int"),
    bad("token_ids-too-few", lambda x: x.mgr.extend(x.c, 2, token_ids=[1]), ValueError,
        "token_ids[0]", "1 ids", "num_tokens=2"),
    bad("token_ids-float-array", lambda x: x.mgr.extend(x.c, 2, token_ids=np.array([1.0, 2.0])),
        TypeError, "token_ids[0]", "float64"),
    bad("token_ids-batch-count", lambda x: x.mgr.extend_batch([x.a, x.c], 1, token_ids=[[1]]),
        ValueError, "1 entries", "2 sequences"),
    bad("token_ids-batch-str", lambda x: x.mgr.extend_batch([x.c], 1, token_ids="a"),
        TypeError, "str"),
    bad("token_ids-after-a-good-row", lambda x: x.mgr.extend_batch([x.a, x.c], 1,
                                                                    token_ids=[[1], [-4]]),
        ValueError, "token_ids[1]", "-4"),
    # --- write -----------------------------------------------------------------------------------
    bad("write-layer-bool", lambda x: _w(x, x.kv(2), layer=True), TypeError, "layer", "True"),
    bad("write-layer-float", lambda x: _w(x, x.kv(2), layer=1.0), TypeError, "layer", "1.0"),
    bad("write-layer-str", lambda x: _w(x, x.kv(2), layer="0"), TypeError, "layer", "'0'"),
    bad("write-layer-negative", lambda x: _w(x, x.kv(2), layer=-1), LayerIndexError,
        "layer -1", "2 layers"),
    bad("write-layer-too-big", lambda x: _w(x, x.kv(2), layer=2), LayerIndexError, "layer 2"),
    bad("write-layer-numpy-too-big", lambda x: _w(x, x.kv(2), layer=np.int64(9)),
        LayerIndexError, "layer 9"),
    bad("write-layer-2**70", lambda x: _w(x, x.kv(2), layer=2**70), LayerIndexError,
        str(2**70)),
    bad("write-float16-key", lambda x: _w(x, x.np_kv(2, np.float16)), DtypeMismatchError,
        "key", "float16"),
    bad("write-float64-value", lambda x: _w(x, x.kv(2), x.np_kv(2, np.float64)),
        DtypeMismatchError, "value", "float64"),
    bad("write-int16-key", lambda x: _w(x, x.np_kv(2, np.int16)), DtypeMismatchError, "int16"),
    bad("write-uint16-key", lambda x: _w(x, x.np_kv(2, np.uint16)), DtypeMismatchError, "uint16"),
    bad("write-int32-key", lambda x: _w(x, x.np_kv(2, np.int32)), DtypeMismatchError, "int32"),
    bad("write-big-endian-key", lambda x: _w(x, x.np_kv(2).astype(">f4")), DtypeMismatchError,
        ">f4"),
    bad("write-big-endian-value", lambda x: _w(x, x.kv(2), x.np_kv(2).astype(">f4")),
        DtypeMismatchError, "byte order"),
    bad("write-object-key", lambda x: _w(x, x.np_kv(2).astype(object)), DtypeMismatchError,
        "object", backends=("numpy",)),
    bad("write-shape-head_dim", lambda x: _w(x, np.zeros((2, HEADS, DIM + 1), np.float32)),
        ShapeMismatchError, "[2, 2, 5]"),
    bad("write-shape-2d", lambda x: _w(x, np.zeros((2, HEADS * DIM), np.float32)),
        ShapeMismatchError, "[2, 8]"),
    bad("write-zero-tokens", lambda x: _w(x, x.np_kv(0), x.np_kv(0)), ShapeMismatchError,
        "[0, 2, 4]"),
    bad("write-key-value-lengths", lambda x: _w(x, x.kv(2), x.kv(1)), ShapeMismatchError,
        "value", "[1, 2, 4]"),
    bad("write-list", lambda x: _w(x, x.np_kv(2).tolist()), TypeError, "list"),
    bad("write-none", lambda x: _w(x, None, x.kv(2)), TypeError, "NoneType"),
    bad("write-scalar", lambda x: _w(x, np.float32(1.0)), TypeError, "float32"),
    bad("write-torch-requires-grad-into-numpy",
        lambda x: _w(x, torch.zeros(2, HEADS, DIM, requires_grad=True)), TypeError,
        "Tensor", "require", backends=("numpy",)),
    bad("write-torch-bfloat16-into-numpy",
        lambda x: _w(x, torch.zeros(2, HEADS, DIM, dtype=torch.bfloat16)), DtypeMismatchError,
        "bfloat16", backends=("numpy",)),
    bad("write-torch-float64", lambda x: _w(x, torch.zeros(2, HEADS, DIM, dtype=torch.float64)),
        DtypeMismatchError, "float64"),
    bad("write-torch-meta-device",
        lambda x: _w(x, torch.zeros(2, HEADS, DIM, device="meta")), DeviceMismatchError, "meta",
        backends=("torch",)),
    bad("write-fake-cuda-dlpack", lambda x: _w(x, FakeDLPack(2)), DeviceMismatchError, "cuda:0"),
    bad("write-fake-device-99", lambda x: _w(x, FakeDLPack(99)), DeviceMismatchError, "99"),
    bad("write-dlpack-export-fails", lambda x: _w(x, FakeDLPack(1)), TypeError, "FakeDLPack",
        "no data"),
    bad("write-start-bool", lambda x: _w(x, x.kv(2), start=True), TypeError, "start", "True"),
    bad("write-start-float", lambda x: _w(x, x.kv(2), start=9.0), TypeError, "start", "9.0"),
    bad("write-start-negative", lambda x: _w(x, x.kv(2), start=-1), CapacityError, "-1"),
    bad("write-start-past-end", lambda x: _w(x, x.kv(2), start=11), CapacityError, "11",
        "12 tokens"),
    bad("write-start-2**63", lambda x: _w(x, x.kv(2), start=2**63), CapacityError, str(2**63)),
    bad("write-too-many", lambda x: x.mgr.write(x.c, 0, x.kv(11), x.kv(11)), CapacityError,
        "11 tokens", "10 tokens"),
    bad("write-leaving-a-gap", lambda x: x.mgr.write(x.a, 1, x.kv(1), x.kv(1), start=11),
        WriteOrderError, "position 11", "10..10"),
    bad("write-swapped", lambda x: x.mgr.write(x.s, 0, x.kv(1), x.kv(1)), HandleSwappedError,
        "'s'"),
    bad("write-dead-handle", lambda x: x.mgr.write(x.dead, 0, x.kv(1), x.kv(1)),
        InvalidHandleError, "'d'"),
    bad("write-unknown-id", lambda x: x.mgr.write("zz", 0, x.kv(1), x.kv(1)),
        UnknownRequestError, "'zz'"),
    bad("write-foreign-handle", lambda x: x.mgr.write(x.oh, 0, x.kv(1), x.kv(1)),
        InvalidHandleError, "different manager"),
    bad("write-handle-int", lambda x: x.mgr.write(5, 0, x.kv(1), x.kv(1)), TypeError, "int"),
    bad("write-copy-on-write-out-of-blocks",
        lambda x: x.mgr.write(x.c, 0, x.kv(1), x.kv(1), start=0), OutOfBlocksError, "'c'",
        failures=1, setup=Ctx.fill_pool),
    # --- write_slots ---------------------------------------------------------------------------
    bad("write_slots-not-a-mapping", lambda x: x.mgr.write_slots(0, "slots", x.kv(2), x.kv(2)),
        TypeError, "str"),
    bad("write_slots-array-as-mapping",
        lambda x: x.mgr.write_slots(0, np.asarray(x.fresh.slots), x.kv(2), x.kv(2)),
        TypeError, "ndarray"),
    bad("write_slots-stale-after-fork",
        lambda x: x.mgr.write_slots(0, x.stale, x.kv(1), x.kv(1)), StaleSlotMappingError,
        "'b'", "stale"),
    bad("write_slots-foreign", lambda x: x.mgr.write_slots(0, x.foreign, x.kv(1), x.kv(1)),
        StaleSlotMappingError, "'a'", "different manager"),
    bad("write_slots-ours-into-other",
        lambda x: x.other.write_slots(0, x.fresh, x.kv(2), x.kv(2)), StaleSlotMappingError,
        "'a'", "different manager"),
    bad("write_slots-dead-request",
        lambda x: x.mgr.write_slots(0, x.dead_map, x.kv(1), x.kv(1)), StaleSlotMappingError,
        "'d'"),
    bad("write_slots-shared-through-prefix-cache",
        lambda x: x.mgr.write_slots(1, x.e_map, x.kv(1), x.kv(1)), StaleSlotMappingError,
        "'e'", "prefix cache"),
    bad("write_slots-after-swap", lambda x: x.mgr.write_slots(0, x.fresh, x.kv(2), x.kv(2)),
        StaleSlotMappingError, "'a'",
        setup=lambda x: (x.mgr.swap_in(x.s), x.mgr.swap_out(x.a), x.mgr.swap_in(x.a))),
    bad("write_slots-after-truncate", lambda x: x.mgr.write_slots(0, x.fresh, x.kv(2), x.kv(2)),
        StaleSlotMappingError, "'a'", setup=lambda x: x.mgr.truncate(x.a, 11)),
    bad("write_slots-wrong-count", lambda x: x.mgr.write_slots(0, x.fresh, x.kv(3), x.kv(3)),
        ShapeMismatchError, "[3, 2, 4]", "[2, 2, 4]"),
    bad("write_slots-layer-too-big", lambda x: x.mgr.write_slots(2, x.fresh, x.kv(2), x.kv(2)),
        LayerIndexError, "layer 2"),
    bad("write_slots-layer-bool", lambda x: x.mgr.write_slots(True, x.fresh, x.kv(2), x.kv(2)),
        TypeError, "True"),
    bad("write_slots-gap", lambda x: x.mgr.write_slots(1, x.later, x.kv(1), x.kv(1)),
        WriteOrderError, "'a'", "position 12", "10..11",
        setup=lambda x: setattr(x, "later", x.mgr.extend(x.a, 1))),
    bad("write_slots-mapping-slots-are-read-only",
        lambda x: np.asarray(x.fresh.slots).__setitem__(slice(None), 0), ValueError,
        "read-only"),
    bad("write_slots-mapping-versions-are-read-only",
        lambda x: x.stale.versions.__setitem__(slice(None), 99), ValueError, "read-only"),
    # --- fork ----------------------------------------------------------------------------------
    bad("fork-empty-id", lambda x: x.mgr.fork(x.a, ""), ValueError, "new_request_id", "''"),
    bad("fork-int-id", lambda x: x.mgr.fork(x.a, 5), ValueError, "new_request_id", "5"),
    bad("fork-into-live-id", lambda x: x.mgr.fork(x.a, "c"), DuplicateRequestError, "'c'"),
    bad("fork-swapped", lambda x: x.mgr.fork(x.s, "z"), HandleSwappedError, "'s'"),
    bad("fork-dead", lambda x: x.mgr.fork(x.dead, "z"), InvalidHandleError, "'d'"),
    bad("fork-unknown-id", lambda x: x.mgr.fork("zz", "z"), UnknownRequestError, "'zz'"),
    # --- truncate ------------------------------------------------------------------------------
    bad("truncate-past-end", lambda x: x.mgr.truncate(x.c, 11), CapacityError, "11", "10"),
    bad("truncate-negative", lambda x: x.mgr.truncate(x.c, -1), CapacityError, "-1"),
    bad("truncate-bool", lambda x: x.mgr.truncate(x.c, True), TypeError, "True"),
    bad("truncate-float", lambda x: x.mgr.truncate(x.c, 1.0), TypeError, "1.0"),
    bad("truncate-swapped", lambda x: x.mgr.truncate(x.s, 1), HandleSwappedError, "'s'"),
    bad("truncate-dead", lambda x: x.mgr.truncate(x.dead, 1), InvalidHandleError, "'d'"),
    bad("truncate-copy-out-of-blocks", lambda x: x.mgr.truncate(x.bf, 3), OutOfBlocksError,
        "'bf'", failures=1, setup=Ctx.fill_pool),
    # --- swap ----------------------------------------------------------------------------------
    bad("swap_in-resident", lambda x: x.mgr.swap_in(x.a), CacheError, "'a'", "not swapped out"),
    bad("swap_out-swapped", lambda x: x.mgr.swap_out(x.s), HandleSwappedError, "'s'"),
    bad("swap_out-no-swap-pool", lambda x: x.noswap.swap_out(x.nh), UnsupportedError,
        "swap_blocks"),
    bad("swap_out-swap-pool-full", lambda x: x.mgr.swap_out(x.a), OutOfBlocksError, "'a'",
        "3 swap blocks", "1 are free", failures=1),
    bad("swap_in-no-room", lambda x: x.mgr.swap_in(x.s), OutOfBlocksError, "'s'", "2 blocks",
        failures=1, setup=Ctx.fill_pool),
    bad("swap_out-dead", lambda x: x.mgr.swap_out(x.dead), InvalidHandleError, "'d'"),
    bad("swap_in-unknown-id", lambda x: x.mgr.swap_in("zz"), UnknownRequestError, "'zz'"),
    # --- deallocate ----------------------------------------------------------------------------
    bad("deallocate-unknown-id", lambda x: x.mgr.deallocate("zz"), UnknownRequestError, "'zz'"),
    bad("deallocate-dead-id", lambda x: x.mgr.deallocate("d"), UnknownRequestError, "'d'"),
    bad("deallocate-dead-handle", lambda x: x.mgr.deallocate(x.dead), InvalidHandleError, "'d'"),
    bad("deallocate-int", lambda x: x.mgr.deallocate(5), TypeError, "int"),
    bad("deallocate-foreign-handle", lambda x: x.mgr.deallocate(x.oh), InvalidHandleError,
        "different manager"),
    # --- handles, tables, page tables -----------------------------------------------------------
    bad("get_handle-int", lambda x: x.mgr.get_handle(5), TypeError, "int"),
    bad("get_handle-unknown", lambda x: x.mgr.get_handle("zz"), UnknownRequestError, "'zz'"),
    bad("key_cache-layer-bool", lambda x: x.a.key_cache(True), TypeError, "True"),
    bad("value_cache-layer-too-big", lambda x: x.a.value_cache(2), LayerIndexError, "layer 2"),
    bad("num_written-layer-negative", lambda x: x.a.num_written(-1), LayerIndexError, "-1"),
    bad("key_cache-swapped", lambda x: x.s.key_cache(0), HandleSwappedError, "'s'"),
    bad("as_any-wrong-class", lambda x: x.a.as_any(int), TypeError, "int"),
    bad("as_any-not-a-class", lambda x: x.a.as_any("x"), TypeError, "'x'"),
    bad("block_table_mut-add_blocks", lambda x: x.a.block_table_mut().add_blocks([3]),
        CacheError, "extend"),
    bad("block_table_mut-extend-past-blocks", lambda x: x.c.block_table_mut().extend_sequence(9),
        CapacityError, "9 tokens"),
    bad("block_table_mut-extend-bool", lambda x: x.c.block_table_mut().extend_sequence(True),
        TypeError, "True"),
    bad("vllm_block_table-str", lambda x: x.mgr.vllm_block_table("ac"), TypeError, "str"),
    bad("flashinfer_page_table-str", lambda x: x.mgr.flashinfer_page_table("ac"), TypeError,
        "str"),
    bad("vllm_block_table-unknown", lambda x: x.mgr.vllm_block_table(["a", "zz"]),
        UnknownRequestError, "'zz'"),
    bad("vllm_block_table-swapped", lambda x: x.mgr.vllm_block_table([x.s]), HandleSwappedError,
        "'s'"),
    bad("vllm_block_table-pad-str", lambda x: x.mgr.vllm_block_table([x.a], pad_value="x"),
        TypeError, "pad_value", "'x'"),
    bad("vllm_block_table-pad-float", lambda x: x.mgr.vllm_block_table([x.a], pad_value=1.5),
        TypeError, "pad_value", "1.5"),
    bad("vllm_block_table-pad-2**40", lambda x: x.mgr.vllm_block_table([x.a], pad_value=2**40),
        ValueError, "pad_value", str(2**40)),
    bad("layer_pool-bool", lambda x: x.mgr.layer_pool(True), TypeError, "True"),
    bad("layer_pool-too-big", lambda x: x.mgr.layer_pool(2), LayerIndexError, "layer 2"),
    bad("copy-manager", lambda x: copy.copy(x.mgr), NotCopyableError, "fork"),
    bad("pickle-handle", lambda x: pickle.dumps(x.a), NotCopyableError, "pickled"),
    bad("pickle-mapping", lambda x: pickle.dumps(x.fresh), NotCopyableError, "SlotMapping"),
    bad("read-joined-before-its-writer",
        lambda x: x.mgr.get_handle("j").key_cache(0), PendingPrefixError, "'j'", "layer 0",
        setup=lambda x: (x.mgr.allocate(R("w", prompt_token_ids=[70, 71, 72, 73, 74])),
                         x.mgr.allocate(R("j", prompt_token_ids=[70, 71, 72, 73, 75],
                                          join_pending=True)))),
    # --- closed manager ------------------------------------------------------------------------
    *[bad(f"closed-{name}", call, ManagerClosedError, op) for name, op, call in [
        ("allocate", "allocate", lambda x: x.closed.allocate(R("q", num_tokens=1))),
        ("extend", "extend", lambda x: x.closed.extend("x", 1)),
        ("write", "write", lambda x: x.closed.write("x", 0, x.kv(1), x.kv(1))),
        ("write_slots", "write_slots", lambda x: x.closed.write_slots(0, x.fresh, x.kv(2),
                                                                      x.kv(2))),
        ("stats", "stats", lambda x: x.closed.stats()),
        ("gc", "gc", lambda x: x.closed.gc()),
        ("reset_prefix_cache", "reset_prefix_cache", lambda x: x.closed.reset_prefix_cache()),
        ("swap_out", "swap", lambda x: x.closed.swap_out("x")),
        ("deallocate", "deallocate", lambda x: x.closed.deallocate("x")),
        ("layer_pool", "layer_pool", lambda x: x.closed.layer_pool(0)),
        ("check_invariants", "check_invariants", lambda x: x.closed.check_invariants()),
        ("get_handle", "get_handle", lambda x: x.closed.get_handle("x")),
        ("pressure", "pressure", lambda x: x.closed.pressure()),
    ]],
    bad("closed-handle-read", lambda x: x.closed_h.key_cache(0), InvalidHandleError, "'x'",
        "closed"),
    # --- a deallocated handle: everything but is_valid() and cache_id() ------------------------
    *[bad(f"dead-handle-{name}", call, InvalidHandleError, "'d'", "deallocated")
      for name, call in [
          ("block_table", lambda x: x.dead.block_table()),
          ("block_table_mut", lambda x: x.dead.block_table_mut()),
          ("as_any", lambda x: x.dead.as_any()), ("device", lambda x: x.dead.device()),
          ("num_layers", lambda x: x.dead.num_layers()),
          ("num_heads", lambda x: x.dead.num_heads()), ("head_dim", lambda x: x.dead.head_dim()),
          ("key_cache", lambda x: x.dead.key_cache(0)),
          ("value_cache", lambda x: x.dead.value_cache(0)),
          ("kv_cache", lambda x: x.dead.kv_cache(1)),
          ("clone_handle", lambda x: x.dead.clone_handle()), ("stats", lambda x: x.dead.stats()),
          ("num_tokens", lambda x: x.dead.num_tokens()),
          ("num_cached_tokens", lambda x: x.dead.num_cached_tokens()),
          ("num_written", lambda x: x.dead.num_written(0)),
          ("token_ids", lambda x: x.dead.token_ids()),
          ("is_swapped", lambda x: x.dead.is_swapped()),
          ("write", lambda x: x.dead.write(0, x.kv(1), x.kv(1))),
      ]],
]


PARAMS = [pytest.param(case, backend, id=f"{backend}-{case.id}")
          for case in CASES for backend in case.backends]


def test_the_catalogue_is_large_and_its_ids_unique():
    ids = [case.id for case in CASES]
    assert len(set(ids)) == len(ids), sorted(i for i in ids if ids.count(i) > 1)
    assert len(CASES) >= 100, len(CASES)


@pytest.mark.parametrize("case, backend", PARAMS)
def test_bad_input_is_refused_with_a_typed_error_naming_it_and_changes_nothing(case, backend):
    x = Ctx(backend)
    if case.setup is not None:
        case.setup(x)
    before, before_other = observe(x.mgr), observe(x.other)
    with pytest.raises(Exception) as info:
        case.call(x)
    exc = info.value
    assert type(exc) is case.error, f"raised {type(exc).__name__}: {exc}"
    message = str(exc)
    missing = [part for part in case.names if part not in message]
    assert not missing, f"the message does not name {missing}: {message!r}"
    change = describe_difference(before, observe(x.mgr), failures_added=case.failures)
    assert change is None, f"{type(exc).__name__} ({message}) but: {change}"
    assert describe_difference(before_other, observe(x.other)) is None
    x.mgr.check_invariants()
    x.other.check_invariants()
    assert x.closed.closed and not x.closed_h.is_valid()
    assert not x.dead.is_valid() and x.dead.cache_id().startswith("d#")
