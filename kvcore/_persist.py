"""Saving sequences to a file and loading them into a manager: safetensors, never pickle.

A cache file is a `safetensors <https://huggingface.co/docs/safetensors>`_ file, the open
format every ML stack reads, with no code in it.  Format version 1:

* tensors, for the ``i``-th sequence of the file: ``seq.{i}.key`` and ``seq.{i}.value``,
  ``[num_layers, num_tokens, num_kv_heads, head_dim]`` of the cache's dtype (``F16``,
  ``BF16`` or ``F32``), tokens in logical order; ``seq.{i}.token_ids`` (``I64``,
  ``[num_tokens]``) when every token id of the sequence is known;
* metadata (safetensors' string-to-string header): ``kvcore.format`` (``kvcore.kv-cache``),
  ``kvcore.format_version`` (``1``), ``kvcore.version`` (the writer), ``kvcore.layout``
  (JSON: layers, KV heads, head size, dtype, block size) and ``kvcore.sequences`` (JSON:
  request id, tokens, whether the ids are stored), plus the caller's own entries.

The container is written here (a 64-bit header length, the JSON header, the tensors'
bytes; the reference writer's rules, 8-byte aligned), streaming array by array, and
read back with the ``safetensors`` library, whose reader checks the header and every
tensor's offsets against the file.  Writing it ourselves keeps ``BF16`` a real BF16
tensor (numpy has no bfloat16, so ``safetensors.numpy`` cannot write one) and avoids
the library's raw serializer, whose signature changed in 0.8.

K/V travel as raw bits (``uint16`` / ``uint32`` host arrays; bfloat16 from the exact
float32 widening ``Backend.to_numpy`` gives, back through ``Backend.from_bits``), so a
round trip is bit-identical, NaN payloads included.

Loading is all or nothing: the file is read and checked whole (header, format version,
layout, names, dtypes and shapes, token ids) before the manager is touched; the blocks
the load needs are counted first (prefix hits included) and a load that would not fit
is refused unchanged; sequences are then allocated with their token ids and
``allow_full_hit``, so their full blocks are registered in the prefix cache (and
blocks the cache already holds are shared, not written again), and any failure
deallocates what the load allocated.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from pydantic import Field, TypeAdapter, ValidationError

from ._backend import BITS_DTYPES, Backend
from ._chain_hash import token_array
from ._device import DType
from ._growth import plan_allocation
from ._version import __version__
from .errors import (CacheError, CacheFileError, DuplicateRequestError, LayoutMismatchError,
                     OutOfBlocksError)
from .models import (AllocationRequest, CacheConfig, DTypeField, NonNegativeInt, PositiveInt,
                     _Record)

if TYPE_CHECKING:
    from ._manager import KvCacheManager
    from ._paged_handle import PagedKvCacheHandle

__all__ = ["CacheFileInfo", "CacheLayout", "SavedSequence", "inspect_cache_file", "load",
           "load_saved", "read_file", "save"]

FORMAT = "kvcore.kv-cache"
FORMAT_VERSION = 1
#: Metadata keys of the format; callers' own keys may not start with this prefix.
RESERVED_PREFIX = "kvcore."
_FORMAT_KEY = "kvcore.format"
_VERSION_KEY = "kvcore.format_version"
_WRITER_KEY = "kvcore.version"
_LAYOUT_KEY = "kvcore.layout"
_SEQUENCES_KEY = "kvcore.sequences"
_FORMAT_KEYS = (_FORMAT_KEY, _VERSION_KEY, _WRITER_KEY, _LAYOUT_KEY, _SEQUENCES_KEY)
#: safetensors' names of the dtypes.
_CODES = {DType.float16: "F16", DType.bfloat16: "BF16", DType.float32: "F32"}


# --- what a file says about itself ----------------------------------------------------


class CacheLayout(_Record):
    """The shape of the K/V a file holds (``kvcore.layout`` in its header).

    A file loads into a manager whose layers, KV heads, head size and dtype are the
    same.  ``block_size`` is recorded but need not match: K/V are stored per token, in
    logical order, so a manager with other blocks takes them as well."""

    num_layers: PositiveInt
    num_kv_heads: PositiveInt
    head_dim: PositiveInt
    dtype: DTypeField
    block_size: PositiveInt

    @classmethod
    def of(cls, config: CacheConfig) -> CacheLayout:
        return cls(num_layers=config.num_layers, num_kv_heads=config.num_kv_heads,
                   head_dim=config.head_dim, dtype=config.dtype, block_size=config.block_size)

    def differences(self, other: CacheLayout) -> list[str]:
        """The fields that must match for K/V to load, and differ."""
        return [name for name in ("num_layers", "num_kv_heads", "head_dim", "dtype")
                if getattr(self, name) != getattr(other, name)]

    def __str__(self) -> str:
        return (f"num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, dtype={self.dtype.value}, "
                f"block_size={self.block_size}")


class SavedSequence(_Record):
    """One sequence of a file: its request id when saved, its length, and whether its
    token ids are stored (they are when every id was given to the manager)."""

    request_id: str = Field(min_length=1)
    num_tokens: NonNegativeInt
    token_ids: bool


class CacheFileInfo(_Record):
    """What a cache file's header says (:func:`inspect_cache_file`)."""

    format_version: int
    #: The kvcore version that wrote the file.
    kvcore_version: str
    layout: CacheLayout
    sequences: tuple[SavedSequence, ...]
    #: Every other metadata entry: the caller's own, and integrations' (``kvcore.*``).
    metadata: dict[str, str]


_SEQUENCES = TypeAdapter(list[SavedSequence])


def _safetensors() -> Any:
    try:
        import safetensors
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise ImportError('reading kvcore cache files needs safetensors: pip install '
                          '"safetensors>=0.4"') from exc
    return safetensors


def _parse_info(metadata: Any, where: str) -> CacheFileInfo:
    """The header's metadata as a :class:`CacheFileInfo`, else :class:`CacheFileError`."""
    if not isinstance(metadata, dict) or metadata.get(_FORMAT_KEY) != FORMAT:
        raise CacheFileError(f"{where} is a safetensors file but not a kvcore cache: its "
                             f"metadata has no {_FORMAT_KEY}={FORMAT!r} (was it written by "
                             "KvCacheManager.save?)")
    version = metadata.get(_VERSION_KEY)
    if version != str(FORMAT_VERSION):
        newer = isinstance(version, str) and version.isdigit() and int(version) > FORMAT_VERSION
        raise CacheFileError(f"{where} is a kvcore cache of format version {version!r}; "
                             f"kvcore {__version__} reads version {FORMAT_VERSION}"
                             + (" (a newer kvcore wrote it: upgrade)" if newer else ""))
    try:
        layout = CacheLayout.model_validate_json(metadata.get(_LAYOUT_KEY, ""))
        sequences = tuple(_SEQUENCES.validate_json(metadata.get(_SEQUENCES_KEY, "")))
    except ValidationError as exc:
        raise CacheFileError(f"{where}: the kvcore header is malformed: {exc}") from None
    ids = [s.request_id for s in sequences]
    if len(set(ids)) != len(ids):
        raise CacheFileError(f"{where}: the header lists a request id twice: {ids}")
    rest = {k: v for k, v in metadata.items() if k not in _FORMAT_KEYS}
    return CacheFileInfo(format_version=FORMAT_VERSION,
                         kvcore_version=str(metadata.get(_WRITER_KEY, "unknown")),
                         layout=layout, sequences=sequences, metadata=rest)


def inspect_cache_file(path: str | os.PathLike[str]) -> CacheFileInfo:
    """The header of a file written by :meth:`KvCacheManager.save`: its layout (to build
    a manager that can load it), its sequences and metadata.  Reads the header only.
    :class:`~kvcore.errors.CacheFileError` when it is not a kvcore cache file."""
    where = repr(os.fspath(path))
    with open(path, "rb"):  # a missing or unreadable file is the OSError it is
        pass
    try:
        with _safetensors().safe_open(os.fspath(path), framework="numpy") as f:
            metadata = f.metadata()
    except Exception as exc:  # noqa: BLE001 - the reader's errors are not typed by kind
        raise CacheFileError(f"{where} is not a valid safetensors file: {exc}") from None
    return _parse_info(metadata, where)


# --- saving --------------------------------------------------------------------------


def save(manager: KvCacheManager, path: str | os.PathLike[str], handles: Sequence[Any],
         metadata: Mapping[str, str] | None, *, reserved_ok: bool = False) -> None:
    """:meth:`KvCacheManager.save` (``reserved_ok``: kvcore's own integrations may add
    ``kvcore.*`` metadata)."""
    with manager._lock:
        seqs = manager._batch(handles, "save")
        payload = collect(manager, [manager._handle(s) for s in seqs], metadata,
                          reserved_ok=reserved_ok)
    write_file(path, payload)  # outside the lock: the data is read already


@dataclass
class Payload:
    """Everything a file will hold, read from the manager (under its lock)."""

    metadata: dict[str, str]
    #: (name, safetensors dtype, array) in file order.
    tensors: list[tuple[str, str, np.ndarray]]


def _user_metadata(metadata: Mapping[str, str] | None, *, reserved_ok: bool) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping of str to str, got "
                        f"{type(metadata).__name__}")
    out = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str (safetensors' header holds "
                            f"strings), got {key!r}: {value!r}")
        if key.startswith(RESERVED_PREFIX) and not reserved_ok:
            raise ValueError(f"metadata key {key!r}: keys starting with "
                             f"{RESERVED_PREFIX!r} are kvcore's own")
        out[key] = value
    return out


def host_bits(backend: Backend, native: Any, dtype: DType) -> np.ndarray:
    """The raw bits of a backend array, on the host (``uint16`` / ``uint32``)."""
    host = backend.to_numpy(native)
    want = np.dtype(np.float16 if dtype is DType.float16 else np.float32)
    if not isinstance(host, np.ndarray) or host.dtype != want:
        raise CacheError(f"backend {backend.name!r}: to_numpy of a {dtype.value} array gave "
                         f"{getattr(host, 'dtype', type(host).__name__)}, expected {want}")
    if dtype is not DType.bfloat16:
        return host.view(BITS_DTYPES[dtype])
    wide = host.view(np.uint32)
    if np.any(wide & np.uint32(0xFFFF)):
        raise CacheError(f"backend {backend.name!r}: to_numpy of a bfloat16 array is not "
                         "the exact float32 widening (low 16 bits set)")
    return (wide >> np.uint32(16)).astype(np.uint16)


def collect(manager: KvCacheManager, handles: Sequence[PagedKvCacheHandle],
            metadata: Mapping[str, str] | None, *, reserved_ok: bool = False) -> Payload:
    """Read what :func:`write_file` will write: every layer's K/V of each sequence,
    through the public reads.  Every layer must hold every token."""
    user = _user_metadata(metadata, reserved_ok=reserved_ok)
    cfg, backend = manager.config, manager.backend
    layers, heads, dim, dtype = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.dtype
    code, bits = _CODES[dtype], BITS_DTYPES[dtype]
    sequences, tensors = [], []
    for handle in handles:  # check them all before reading any
        n = handle.num_tokens()
        short = [layer for layer in range(layers) if handle.num_written(layer) != n]
        if short:
            raise CacheError(f"save: request {handle.request_id!r} holds {n} tokens but layer "
                             f"{short[0]} has K/V for {handle.num_written(short[0])} of "
                             "them; write every layer of every token before saving")
    for i, handle in enumerate(handles):
        n = handle.num_tokens()
        ids = handle.token_ids()
        key = np.empty((layers, n, heads, dim), dtype=bits)
        value = np.empty_like(key)
        for layer in range(layers if n else 0):
            k, v = handle.kv_cache(layer)  # type: ignore[misc]
            key[layer] = host_bits(backend, k.native, dtype)
            value[layer] = host_bits(backend, v.native, dtype)
        sequences.append({"request_id": handle.request_id, "num_tokens": n,
                          "token_ids": ids is not None})
        tensors += [(f"seq.{i}.key", code, key), (f"seq.{i}.value", code, value)]
        if ids is not None:
            tensors.append((f"seq.{i}.token_ids", "I64", np.asarray(ids, dtype=np.int64)))
    meta = {_FORMAT_KEY: FORMAT, _VERSION_KEY: str(FORMAT_VERSION), _WRITER_KEY: __version__,
            _LAYOUT_KEY: CacheLayout.of(cfg).model_dump_json(),
            _SEQUENCES_KEY: json.dumps(sequences, separators=(",", ":")), **user}
    return Payload(meta, tensors)


def write_file(path: str | os.PathLike[str], payload: Payload) -> None:
    """Write ``payload`` as a safetensors file, atomically: a temporary file in the same
    directory renamed over ``path``, so a failed save never leaves half a file (the
    file is created readable by its owner only: K/V reveal what was prompted)."""
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp",
                               dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            _write_safetensors(fh, payload)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_safetensors(fh: BinaryIO, payload: Payload) -> None:
    header: dict[str, Any] = {"__metadata__": payload.metadata}
    offset = 0
    arrays = []
    for name, code, array in payload.tensors:
        data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
        header[name] = {"dtype": code, "shape": list(data.shape),
                        "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
        arrays.append(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the tensors start 8-byte aligned, as the reference pads
    fh.write(struct.pack("<Q", len(text)))
    fh.write(text)
    for data in arrays:
        if data.size:
            fh.write(memoryview(data.reshape(-1)).cast("B"))


# --- loading -------------------------------------------------------------------------


@dataclass
class SavedFile:
    """A cache file read and checked whole: header and host bits of every sequence."""

    where: str
    info: CacheFileInfo
    keys: list[np.ndarray]
    values: list[np.ndarray]
    token_ids: list[np.ndarray | None]


def read_file(path: str | os.PathLike[str]) -> SavedFile:
    """Read and check a cache file (everything but the layout, which depends on the
    manager).  :class:`~kvcore.errors.CacheFileError` names what is wrong."""
    where = repr(os.fspath(path))
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        entries = _safetensors().deserialize(raw)
    except Exception as exc:  # noqa: BLE001 - the reader's errors are not typed by kind
        raise CacheFileError(f"{where} is not a valid safetensors file ({len(raw)} bytes): "
                             f"{exc}") from None
    # The reader accepted the header, so it is a length and a JSON object.
    size = int.from_bytes(raw[:8], "little")
    metadata = json.loads(raw[8:8 + size].decode("utf-8")).get("__metadata__")
    info = _parse_info(metadata, where)
    tensors = {name: spec for name, spec in entries}
    layout = info.layout
    code, bits = _CODES[layout.dtype], BITS_DTYPES[layout.dtype]
    expected: dict[str, tuple[str, tuple[int, ...]]] = {}
    for i, seq in enumerate(info.sequences):
        kv_shape = (layout.num_layers, seq.num_tokens, layout.num_kv_heads, layout.head_dim)
        expected[f"seq.{i}.key"] = (code, kv_shape)
        expected[f"seq.{i}.value"] = (code, kv_shape)
        if seq.token_ids:
            expected[f"seq.{i}.token_ids"] = ("I64", (seq.num_tokens,))
    missing, extra = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or extra:
        raise CacheFileError(f"{where}: its tensors do not match its header (missing "
                             f"{missing[:4]}, unexpected {extra[:4]})")
    arrays: dict[str, np.ndarray] = {}
    for name, (want_code, shape) in expected.items():
        spec = tensors[name]
        got = (spec["dtype"], tuple(spec["shape"]))
        if got != (want_code, shape):
            raise CacheFileError(f"{where}: tensor {name!r} is {got[0]} {list(got[1])}, the "
                                 f"header's layout and sequences say {want_code} {list(shape)}")
        host = np.dtype(np.int64 if want_code == "I64" else bits).newbyteorder("<")
        arrays[name] = np.frombuffer(spec["data"], dtype=host).reshape(shape)
    ids: list[np.ndarray | None] = []
    for i, seq in enumerate(info.sequences):
        stored = arrays.get(f"seq.{i}.token_ids")
        if stored is not None:
            try:
                stored = token_array(stored, f"seq.{i}.token_ids")
            except (TypeError, ValueError) as exc:
                raise CacheFileError(f"{where}: {exc}") from None
        ids.append(stored)
    n = len(info.sequences)
    return SavedFile(where, info, [arrays[f"seq.{i}.key"] for i in range(n)],
                     [arrays[f"seq.{i}.value"] for i in range(n)], ids)


def load(manager: KvCacheManager, path: str | os.PathLike[str],
         request_ids: Sequence[str] | None, extra_key: str | None) -> list[PagedKvCacheHandle]:
    """:meth:`KvCacheManager.load`."""
    return load_saved(manager, read_file(path), request_ids, extra_key)


def load_saved(manager: KvCacheManager, saved: SavedFile, request_ids: Sequence[str] | None,
               extra_key: str | None) -> list[PagedKvCacheHandle]:
    """Load a file :func:`read_file` read and checked, under the manager's lock."""
    with manager._lock:
        manager._check_open("load")
        return load_into(manager, saved, request_ids, extra_key)


def check_layout(config: CacheConfig, saved: SavedFile) -> None:
    """Refuse a file whose K/V have another shape than the manager's."""
    mine, theirs = CacheLayout.of(config), saved.info.layout
    differ = mine.differences(theirs)
    if differ:
        raise LayoutMismatchError(
            f"{saved.where} holds K/V of layout ({theirs}); this manager's is ({mine}): "
            f"{', '.join(differ)} differ.  Load it into a manager of the file's layout "
            "(kvcore.inspect_cache_file tells it)")


def _requests(manager: KvCacheManager, saved: SavedFile, request_ids: Sequence[str] | None,
              extra_key: str | None) -> list[AllocationRequest]:
    seqs = saved.info.sequences
    if request_ids is None:
        ids = [s.request_id for s in seqs]
    else:
        if isinstance(request_ids, (str, bytes)) or not isinstance(request_ids, Sequence):
            raise TypeError(f"request_ids must be a list of str, got "
                            f"{type(request_ids).__name__}")
        ids = list(request_ids)
        if len(ids) != len(seqs):
            raise ValueError(f"request_ids has {len(ids)} ids for the {len(seqs)} sequences "
                             f"of {saved.where}")
        bad = [r for r in ids if not isinstance(r, str) or not r]
        if bad:
            raise ValueError(f"request ids must be non-empty strings, got {bad[0]!r}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"request_ids names a request twice: {ids}")
    if extra_key is not None and not isinstance(extra_key, str):
        raise TypeError(f"extra_key must be a str or None, got {type(extra_key).__name__}")
    live = [r for r in ids if r in manager]
    if live:
        raise DuplicateRequestError(f"request id {live[0]!r} already has a live cache; load "
                                    f"{saved.where} with request_ids=[...] naming new ids")
    out = []
    for rid, seq, tokens in zip(ids, seqs, saved.token_ids):
        if tokens is None or seq.num_tokens == 0:
            out.append(AllocationRequest(request_id=rid, num_tokens=seq.num_tokens))
        else:  # registers its full blocks, and takes those already cached
            out.append(AllocationRequest(request_id=rid, prompt_token_ids=tokens,
                                         extra_key=extra_key, allow_full_hit=True))
    return out


def _preflight(manager: KvCacheManager, requests: list[AllocationRequest], where: str) -> None:
    """Refuse, changing nothing, a load whose blocks do not fit.  A sequence takes from
    the prefix cache what the cache holds now or what an earlier sequence of the file
    fills (prefix chains are prefix-closed, so the longer run of the two is served);
    cached blocks it takes back are free blocks no one else gets.  Exact: should new
    blocks evict a cached block a later sequence counted on, the evicted block was one
    of the free blocks counted, and the later sequence takes one new block instead."""
    co = manager._co
    bs = co.block_size
    seen: set[int] = set()  # chain keys of the full blocks the file's sequences fill
    taken_back: set[int] = set()
    need = served = 0
    for request in requests:
        n = request.num_tokens or 0
        total = -(-n // bs)
        if request.prompt_token_ids is None:
            need += total
            continue
        plan = plan_allocation(co, request)
        hits = plan.hits
        taken_back.update(hits[co.pool.ref[hits] == 0].tolist())
        ours = 0
        if plan.keys is not None and plan.keys.size:
            keys = plan.keys.tolist()
            present = np.fromiter((k in seen for k in keys), dtype=bool, count=len(keys))
            ours = len(keys) if present.all() else int(np.argmin(present))
            seen.update(keys)
        hit = max(hits.size, ours)
        need += total - hit
        served += hit
    free = co.pool.num_free - len(taken_back)
    if need > free:
        raise OutOfBlocksError(f"loading {where} needs {need} new blocks ({len(requests)} "
                               f"sequences, {served} blocks served from the prefix cache) but "
                               f"only {free} are free; nothing was loaded")


def load_into(manager: KvCacheManager, saved: SavedFile, request_ids: Sequence[str] | None,
              extra_key: str | None) -> list[PagedKvCacheHandle]:
    """Allocate and write every sequence of ``saved``, all or nothing (the caller holds
    the manager's lock)."""
    cfg, backend = manager.config, manager.backend
    check_layout(cfg, saved)
    requests = _requests(manager, saved, request_ids, extra_key)
    _preflight(manager, requests, saved.where)
    handles: list[PagedKvCacheHandle] = []
    try:
        for i, request in enumerate(requests):
            handle = manager.allocate(request)
            handles.append(handle)
            n, done = request.num_tokens or 0, handle.num_cached_tokens()
            if done >= n:
                continue  # served whole by the prefix cache
            # One host-to-device copy per plane; the layers are views of it.
            key = backend.from_bits(saved.keys[i][:, done:], cfg.dtype, cfg.device)
            value = backend.from_bits(saved.values[i][:, done:], cfg.dtype, cfg.device)
            for layer in range(cfg.num_layers):
                manager.write(handle, layer, key[layer], value[layer], start=done)
    except BaseException:
        # The count above is exact (a cached block evicted by an earlier sequence's
        # new blocks was itself one of the free blocks counted), so this is for a
        # backend that fails (device memory, a broken from_bits): give back
        # everything this load took.
        for handle in handles:
            manager.deallocate(handle)
        raise
    return handles
