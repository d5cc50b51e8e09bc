"""The kvcore cache file: a safetensors file, never a pickle (format version 1).

`safetensors <https://huggingface.co/docs/safetensors>`_ is the open format every ML
stack reads, with no code in it.  A file holds, for the ``i``-th sequence:

* ``seq.{i}.key`` and ``seq.{i}.value``, ``[num_layers, num_tokens, num_kv_heads,
  head_dim]`` of the cache's dtype (``F16``, ``BF16`` or ``F32``), tokens in logical
  order; ``seq.{i}.token_ids`` (``I64``, ``[num_tokens]``) when every token id of the
  sequence is known;
* metadata (safetensors' string-to-string header): ``kvcore.format`` (``kvcore.kv-cache``),
  ``kvcore.format_version`` (``1``), ``kvcore.version`` (the writer), ``kvcore.layout``
  (JSON: layers, KV heads, head size, dtype, block size) and ``kvcore.sequences`` (JSON:
  request id, tokens, whether the ids are stored), plus the caller's own entries.

The container is written here (a 64-bit header length, the JSON header, the tensors'
bytes; the reference writer's rules, 8-byte aligned), streaming array by array, and
read back with the ``safetensors`` library, whose reader checks the header and every
tensor's offsets against the file.  Writing it ourselves keeps ``BF16`` a real BF16
tensor (numpy has no bfloat16, so ``safetensors.numpy`` cannot write one) and avoids
the library's raw serializer, whose signature changed in 0.8.  K/V are held as raw
bits (``uint16`` / ``uint32``), so nothing on the way changes a bit.

What a file means for a manager (saving, loading) is :mod:`kvcore._persist`.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
from pydantic import Field, TypeAdapter, ValidationError

from ._backend import BITS_DTYPES
from ._chain_hash import token_array
from ._device import DType
from ._version import __version__
from .errors import CacheFileError
from .models import CacheConfig, DTypeField, NonNegativeInt, PositiveInt, _Record

__all__ = ["DTYPE_CODES", "CacheFileInfo", "CacheLayout", "Payload", "SavedFile", "SavedSequence",
           "format_metadata", "inspect_cache_file", "read_file", "user_metadata",
           "write_file"]

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
DTYPE_CODES = {DType.float16: "F16", DType.bfloat16: "BF16", DType.float32: "F32"}


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


def format_metadata(config: CacheConfig, sequences: list[dict[str, Any]]) -> dict[str, str]:
    """The format's own metadata entries for sequences of a manager of ``config``."""
    return {_FORMAT_KEY: FORMAT, _VERSION_KEY: str(FORMAT_VERSION), _WRITER_KEY: __version__,
            _LAYOUT_KEY: CacheLayout.of(config).model_dump_json(),
            _SEQUENCES_KEY: json.dumps(sequences, separators=(",", ":"))}


# --- writing -----------------------------------------------------------------------------


@dataclass
class Payload:
    """Everything a file will hold, read from the manager (under its lock)."""

    metadata: dict[str, str]
    #: (name, safetensors dtype, array) in file order.
    tensors: list[tuple[str, str, np.ndarray]]


def user_metadata(metadata: Mapping[str, str] | None, *, reserved_ok: bool) -> dict[str, str]:
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


# --- reading -----------------------------------------------------------------------------


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
    code, bits = DTYPE_CODES[layout.dtype], BITS_DTYPES[layout.dtype]
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
