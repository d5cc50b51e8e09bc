"""Finding the backend under test, describing it, and skipping what it does not declare."""

from __future__ import annotations

from typing import NoReturn

import pytest

import kvcore
from kvcore import Backend, BackendCapabilities, BackendRecord, DType
from kvcore.errors import BackendError

from ._version import __version__

__all__ = ["BackendProblem", "capability_skip", "describe", "record_of", "require_device_type",
           "require_codec", "require_dlpack", "require_dtype", "resolve"]


class BackendProblem(Exception):
    """The backend named on the command line cannot be tested (unknown, unavailable)."""


def resolve(name: str) -> Backend:
    """The backend called ``name``, or :class:`BackendProblem` saying why not."""
    try:
        return kvcore.get_backend(name)
    except BackendError as exc:
        raise BackendProblem(f"cannot test backend {name!r}: {exc}") from exc


def record_of(name: str) -> BackendRecord | None:
    """The registry's record of ``name`` (distribution, version, entry point)."""
    for record in kvcore.list_backends():
        if record.name == name:
            return record
    return None


def _caps_text(caps: BackendCapabilities) -> str:
    unsupported = ", ".join(f"{d.value} ({why})" for d, why in caps.unsupported_dtypes.items())
    return (f"devices={','.join(caps.device_types)} "
            f"dtypes={','.join(d.value for d in caps.dtypes)} "
            f"swap_to={','.join(caps.swap_device_types) or 'none'} "
            f"dlpack={'yes' if caps.dlpack else 'no'} "
            f"pinned_memory={'yes' if caps.pinned_memory else 'no'}"
            + (f" codecs={','.join(d.value for d in caps.codecs) or 'none'}"
               if caps.codecs or caps.unsupported_codecs else "")
            + (f" unsupported: {unsupported}" if unsupported else ""))


def describe(name: str) -> list[str]:
    """Report-header lines for backend ``name``."""
    import kvcore_conformance

    lines = []
    record = record_of(name)
    dist = (f"{record.distribution} {record.version}".strip() if record else "unknown")
    try:
        backend = resolve(name)
    except BackendProblem as exc:
        return [f"kvcore backend {name!r} from {dist}: NOT TESTABLE: {exc}"]
    lines.append(f"kvcore backend {name!r} ({type(backend).__module__}."
                 f"{type(backend).__qualname__}) from {dist}; array library "
                 f"{backend.array_library!r}; API version {backend.api_version} "
                 f"(kvcore {kvcore.__version__} provides {kvcore.KVCORE_API_VERSION})")
    try:
        lines.append(f"  declared capabilities: {_caps_text(backend.capabilities())}")
    except Exception as exc:  # noqa: BLE001  (the header must show; the tests report it)
        lines.append(f"  declared capabilities: capabilities() raised "
                     f"{type(exc).__name__}: {exc}")
    lines.append(f"  suite: kvcore-conformance {__version__} at "
                 f"{kvcore_conformance.__file__.rsplit('/', 1)[0]}")
    return lines


def capability_skip(capability: str, detail: str) -> NoReturn:
    """Skip a test the backend does not claim to pass, naming the missing capability."""
    pytest.skip(f"[capability {capability}] {detail}")


def require_dtype(backend: Backend, dtype: DType) -> None:
    """Skip unless ``backend`` declares ``dtype``; the skip carries its declared reason."""
    caps = backend.capabilities()
    if dtype not in caps.dtypes:
        reason = caps.unsupported_dtypes.get(dtype, "not declared in its capabilities")
        capability_skip("dtypes", f"backend {backend.name!r} does not support "
                        f"{dtype.value}: {reason}")


def require_codec(backend: Backend, codec: DType) -> None:
    """Skip unless ``backend`` serves the quantized ``codec``, naming its declared reason."""
    caps = backend.capabilities()
    if codec not in caps.codecs:
        reason = caps.unsupported_codecs.get(codec, "not declared in its capabilities")
        capability_skip("codecs", f"backend {backend.name!r} does not serve the "
                        f"{codec.value} codec: {reason}")


def require_dlpack(backend: Backend, dtype: DType) -> None:
    """Skip unless arrays of ``dtype`` on ``backend`` speak DLPack (``dlpack`` declared,
    and ``dtype`` not among ``no_dlpack_dtypes``), naming the declared reason."""
    caps = backend.capabilities()
    if not caps.dlpack:
        capability_skip("dlpack", f"backend {backend.name!r} declares dlpack=False")
    reason = caps.no_dlpack_dtypes.get(dtype)
    if reason is not None:
        capability_skip("no_dlpack_dtypes", f"backend {backend.name!r}: {dtype.value} arrays "
                        f"do not speak DLPack: {reason}")


def require_device_type(backend: Backend, device_type: str, *, swap: bool = False) -> None:
    """Skip unless ``backend`` declares pools (or swap pools) on ``device_type``."""
    caps = backend.capabilities()
    declared = caps.swap_device_types if swap else caps.device_types
    if device_type not in declared:
        what = "swap_device_types" if swap else "device_types"
        capability_skip(what, f"backend {backend.name!r} declares {what}="
                        f"{list(declared)}, not {device_type!r}")
