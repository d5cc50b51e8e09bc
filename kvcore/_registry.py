"""Finding, checking and selecting backends.

Discovery walks ``importlib.metadata.entry_points(group="kvcore")`` itself instead of
calling pluggy's ``load_setuptools_entrypoints``: that helper stops at the first plugin
that fails to import, so one broken distribution would hide every other backend.  Here
each plugin is loaded in isolation and its failure is recorded against it.  pluggy
still does what it is good at: validating hook implementations and calling them.

Three levels of "is it there", each cheaper than the next:

1. *installed*: an entry point exists (metadata only);
2. *loadable*: its plugin module imported and its hook answered, the API version
   matches and the array library is found by ``find_spec`` (nothing heavy imported);
3. *usable*: the backend module imported and its :meth:`Backend.probe` passed.

``list_backends()`` reports level 2, ``list_backends(probe=True)`` level 3, and
``get_backend(name)`` requires level 3 and never falls back to another backend.

Which backend ``get_backend()`` picks when no name is given (:data:`DEFAULT_RULE`):

1. ``$KVCORE_BACKEND`` when it is set; a name there is treated exactly like a name in
   code (no fallback), and its errors say that it came from the environment variable;
2. else ``numpy`` when it is installed (it runs everywhere, so it is the default);
3. else the only backend that can run here (``pip install "kvcore[torch]"`` alone
   uses torch), found by probing the installed ones;
4. else an error listing what is installed, what can run, and the extras to install.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import importlib.util
import os
import threading
from dataclasses import dataclass, replace
from typing import Any

import pluggy

from . import _hookspecs
from ._backend import KVCORE_API_VERSION, Backend
from ._hookspecs import BackendSpec
from .errors import (ApiVersionError, BackendError, BackendUnavailableError,
                     DuplicateBackendError, PluginLoadError, UnknownBackendError,
                     UnsupportedError)

__all__ = ["BackendRecord", "ENTRY_POINT_GROUP", "Registry", "get_backend",
           "list_backends", "register_backend", "unregister_backend", "refresh_backends"]

ENTRY_POINT_GROUP = "kvcore"
DEFAULT_BACKEND = "numpy"
ENV_BACKEND = "KVCORE_BACKEND"
ENV_STRICT = "KVCORE_STRICT_PLUGINS"
#: The default-selection rule in one sentence, for docstrings and error messages.
DEFAULT_RULE = (f"${ENV_BACKEND} if set, else {DEFAULT_BACKEND!r} if installed, else the "
                "only backend that can run here")
#: Backends this project ships, and the extra that installs each.
KNOWN_EXTRAS = {"numpy": "numpy", "torch": "torch", "cupy": "cupy"}
_PROGRAMMATIC = "<registered in code>"


def install_hint(name: str) -> str:
    extra = KNOWN_EXTRAS.get(name)
    if extra is None:
        return f"no known distribution provides backend {name!r}; install its plugin"
    return f'pip install "kvcore[{extra}]"'


@dataclass(frozen=True)
class BackendRecord:
    """One discovered backend (or one plugin that failed before naming any)."""

    name: str
    distribution: str
    version: str
    entry_point: str
    available: bool
    reason: str | None = None
    #: ``True`` when the array library was imported and :meth:`Backend.probe` ran.
    probed: bool = False
    api_version: int | None = None
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Entry:
    spec: BackendSpec
    distribution: str
    version: str
    entry_point: str


def _strict() -> bool:
    return os.environ.get(ENV_STRICT, "").strip().lower() in ("1", "true", "yes", "on")


def _describe_exc(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Registry:
    """The set of known backends.  ``kvcore`` keeps one module-level instance; tests
    may build their own."""

    def __init__(self, group: str = ENTRY_POINT_GROUP) -> None:
        self._group = group
        self._lock = threading.RLock()
        self._discovered = False
        self._entries: dict[str, list[_Entry]] = {}
        self._failures: list[BackendRecord] = []
        self._manual: dict[str, _Entry] = {}
        self._instances: dict[str, Backend] = {}
        self._pm = self._new_plugin_manager()

    @staticmethod
    def _new_plugin_manager() -> pluggy.PluginManager:
        pm = pluggy.PluginManager(_hookspecs.PROJECT_NAME)
        pm.add_hookspecs(_hookspecs)
        return pm

    # --- discovery ----------------------------------------------------------------

    def refresh(self) -> None:
        """Forget everything discovered; the next call looks at the metadata again."""
        with self._lock:
            self._discovered = False
            self._entries = {}
            self._failures = []
            self._instances = {}
            self._pm = self._new_plugin_manager()

    def _entry_points(self) -> list[metadata.EntryPoint]:
        seen: set[tuple[str, str, str]] = set()
        unique = []
        for ep in metadata.entry_points(group=self._group):
            dist = ep.dist.name if ep.dist is not None else "?"
            # An editable install next to a stale egg-info shows one entry point twice.
            key = (ep.name, ep.value, dist.lower().replace("_", "-"))
            if key not in seen:
                seen.add(key)
                unique.append(ep)
        return unique

    def _discover(self) -> None:
        if self._discovered:
            return
        for ep in self._entry_points():
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            where = f"{ep.name} = {ep.value}"
            try:
                module = ep.load()
                plugin_name = f"{dist}:{ep.name}"
                self._pm.register(module, name=plugin_name)
                caller = self._pm.subset_hook_caller(
                    "kvcore_backends",
                    remove_plugins=[p for p in self._pm.get_plugins() if p is not module])
                specs = [s for batch in caller() for s in (batch or [])]
                for spec in specs:
                    if not isinstance(spec, BackendSpec):
                        raise TypeError(f"hook kvcore_backends returned {spec!r}, "
                                        "expected kvcore.BackendSpec records")
            except Exception as exc:  # a broken plugin must not break the others
                reason = (f"plugin {where!r} of distribution {dist} {version} failed: "
                          f"{_describe_exc(exc)} (fix or uninstall {dist})")
                if _strict():
                    raise PluginLoadError(reason) from exc
                self._failures.append(BackendRecord(
                    name=ep.name, distribution=dist, version=version, entry_point=where,
                    available=False, reason=reason))
                continue
            for spec in specs:
                self._entries.setdefault(spec.name, []).append(
                    _Entry(spec, dist, version, where))
        if _strict():
            for name in self._entries:
                self._check_unique(name)
        self._discovered = True

    def _all_entries(self) -> dict[str, list[_Entry]]:
        self._discover()
        merged = {name: list(entries) for name, entries in self._entries.items()}
        for name, entry in self._manual.items():
            merged[name] = [entry]  # code registration overrides discovery, on purpose
        return merged

    def _check_unique(self, name: str) -> _Entry:
        entries = self._all_entries()[name]
        if len(entries) > 1:
            who = ", ".join(sorted(f"{e.distribution} {e.version} ({e.entry_point})"
                                   for e in entries))
            raise DuplicateBackendError(
                f"backend {name!r} is declared by more than one distribution: {who}; "
                "uninstall all but one")
        return entries[0]

    # --- programmatic registration -----------------------------------------------

    def register(self, backend: BackendSpec | type[Backend], *, replace_existing: bool = False) -> None:
        """Make a backend selectable without an entry point (tests, notebooks)."""
        if isinstance(backend, type) and issubclass(backend, Backend):
            cls = backend
            spec = BackendSpec(name=cls.name, load=lambda: cls,
                               api_version=getattr(cls, "api_version", None),  # type: ignore[arg-type]
                               description=(cls.__doc__ or "").strip().split("\n")[0])
        elif isinstance(backend, BackendSpec):
            spec = backend
        else:
            raise TypeError(f"register_backend takes a BackendSpec or a Backend subclass, "
                            f"got {backend!r}")
        with self._lock:
            if spec.name in self._manual and not replace_existing:
                raise DuplicateBackendError(f"backend {spec.name!r} is already registered in "
                                            "code; pass replace_existing=True to replace it")
            self._manual[spec.name] = _Entry(spec, _PROGRAMMATIC, "", _PROGRAMMATIC)
            self._instances.pop(spec.name, None)

    def unregister(self, name: str) -> None:
        with self._lock:
            if self._manual.pop(name, None) is None:
                raise UnknownBackendError(f"no backend named {name!r} was registered in code")
            self._instances.pop(name, None)

    # --- listing ------------------------------------------------------------------

    def list_backends(self, *, probe: bool = False) -> list[BackendRecord]:
        """One record per backend, plus one per plugin that failed to load."""
        with self._lock:
            records = []
            for name, entries in sorted(self._all_entries().items()):
                for entry in entries:
                    record = self._static_record(name, entry)
                    if len(entries) > 1:
                        others = ", ".join(sorted(e.distribution for e in entries))
                        record = replace(record, available=False,
                                         reason=f"backend name {name!r} is claimed by several "
                                                f"distributions: {others}")
                    elif probe and record.available:
                        try:
                            self._load_usable(name, entry)
                            record = replace(record, probed=True)
                        except BackendUnavailableError as exc:
                            record = replace(record, available=False, probed=True,
                                             reason=str(exc))
                    records.append(record)
            return records + list(self._failures)

    def _static_record(self, name: str, entry: _Entry) -> BackendRecord:
        spec = entry.spec
        record = BackendRecord(name=name, distribution=entry.distribution,
                               version=entry.version, entry_point=entry.entry_point,
                               available=True, api_version=spec.api_version,
                               description=spec.description)
        reason = self._static_problem(spec)
        return replace(record, available=False, reason=reason) if reason else record

    @staticmethod
    def _static_problem(spec: BackendSpec) -> str | None:
        if spec.api_version is None:
            return (f"backend {spec.name!r} declares no api_version; set the class "
                    f"attribute api_version = {KVCORE_API_VERSION} once it implements "
                    "that contract")
        if spec.api_version != KVCORE_API_VERSION:
            return (f"backend {spec.name!r} was built for kvcore API version "
                    f"{spec.api_version}, this kvcore provides {KVCORE_API_VERSION}"
                    f"{_migration_note(spec.api_version)}")
        for module in spec.requires:
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                hint = spec.install_hint or install_hint(spec.name)
                return f"library {module!r} is not installed ({hint})"
        return None

    # --- selection ----------------------------------------------------------------

    def get_backend(self, name: str | None = None) -> Backend:
        """The backend called ``name``; without a name, by :data:`DEFAULT_RULE`."""
        if name is not None:
            return self._select(name)
        from_env = os.environ.get(ENV_BACKEND, "").strip()
        if from_env:
            try:
                return self._select(from_env)
            except BackendError as exc:
                # Say where the name came from: the user may not remember exporting it.
                raise type(exc)(f"{exc} (the name {from_env!r} came from the environment "
                                f"variable {ENV_BACKEND}; change or unset it)") from exc
        with self._lock:
            installed = set(self._all_entries()) | {f.name for f in self._failures}
            if DEFAULT_BACKEND in installed:  # a broken numpy plugin is reported, not skipped
                return self._with_context(DEFAULT_BACKEND, "the default backend")
            return self._only_usable()

    def _with_context(self, name: str, why: str) -> Backend:
        """Select ``name``, which the default rule chose; errors say so."""
        try:
            return self._select(name)
        except BackendError as exc:
            raise type(exc)(f"{exc} (no backend was named; {name!r} is {why} by the rule: "
                            f"{DEFAULT_RULE})") from exc

    def _select(self, name: str) -> Backend:
        with self._lock:
            cached = self._instances.get(name)
            if cached is not None:
                return cached
            entries = self._all_entries()
            if name not in entries:
                raise self._unknown(name)
            entry = self._check_unique(name)
            problem = self._static_problem(entry.spec)
            if problem is not None:
                version_ok = entry.spec.api_version == KVCORE_API_VERSION
                cls = BackendUnavailableError if version_ok else ApiVersionError
                raise cls(f"backend {name!r} is unavailable: {problem}")
            return self._load_usable(name, entry)

    def _only_usable(self) -> Backend:
        """No name, no ``$KVCORE_BACKEND`` and no numpy: the one backend that runs here.

        Candidates are the backends whose plugin loaded and whose library is installed;
        they are probed (their libraries imported) only when there is more than one,
        so a single one costs no more than selecting it by name.  Several usable
        backends are an error, never a guess."""
        entries = self._all_entries()
        candidates = sorted(n for n, e in entries.items()
                            if len(e) == 1 and self._static_problem(e[0].spec) is None)
        if len(candidates) == 1:
            return self._with_context(candidates[0], "the only installed backend whose "
                                      "library is present")
        usable: list[str] = []
        reasons = [r.reason for r in self.list_backends() if r.reason and r.name not in candidates]
        for name in candidates:
            try:
                self._load_usable(name, entries[name][0])
                usable.append(name)
            except BackendError as exc:
                reasons.append(str(exc))
        if len(usable) == 1:
            return self._select(usable[0])
        installed = ", ".join(sorted(entries)) or "none"
        if usable:
            raise UnknownBackendError(
                f"no backend was named and {DEFAULT_BACKEND!r} is not installed, but several "
                f"backends can run here: {', '.join(usable)}; choose one with "
                f"get_backend(name), KvCacheManager(..., backend=name) or ${ENV_BACKEND} "
                f"(default rule: {DEFAULT_RULE})")
        extras = ", ".join(f'pip install "kvcore[{x}]"' for x in KNOWN_EXTRAS.values())
        why = "".join(f"; {reason}" for reason in reasons)
        cls = BackendUnavailableError if entries or self._failures else UnknownBackendError
        raise cls(f"no backend was named and none can run here (default rule: "
                  f"{DEFAULT_RULE}); installed backends: {installed}{why}. "
                  f"To get one: {extras}")

    def backend_for_array(self, array: Any) -> Backend:
        """The backend whose array library ``array`` belongs to (for generic code such
        as :mod:`kvcore.attention` given a bare native array).  Prefers a backend
        already in use, then one named after the library, then one requiring it."""
        root = type(array).__module__.split(".", 1)[0]
        with self._lock:
            for backend in self._instances.values():
                if backend.array_library == root:
                    return backend
            entries = self._all_entries()
            names = sorted(entries, key=lambda n: (n != root, n))
            for name in names:
                spec = entries[name][0].spec
                if name == root or root in spec.requires:
                    try:
                        return self.get_backend(name)
                    except BackendUnavailableError:
                        continue
        raise UnsupportedError(f"no available kvcore backend serves {type(array).__module__}."
                               f"{type(array).__name__} arrays; install or register one whose "
                               "array library is " + repr(root))

    def _unknown(self, name: str) -> Exception:
        for failure in self._failures:
            if failure.name == name:
                return BackendUnavailableError(f"backend {name!r} is unavailable: {failure.reason}")
        installed = sorted(self._all_entries())
        listing = ", ".join(installed) if installed else "none"
        return UnknownBackendError(f"no backend named {name!r}; installed backends: "
                                   f"{listing}. To get it: {install_hint(name)}")

    def _load_usable(self, name: str, entry: _Entry) -> Backend:
        cached = self._instances.get(name)
        if cached is not None:
            return cached
        spec = entry.spec
        try:
            cls = _resolve(spec.load)
        except ImportError as exc:
            hint = spec.install_hint or install_hint(name)
            raise BackendUnavailableError(
                f"backend {name!r} is unavailable: importing it failed with "
                f"{_describe_exc(exc)} ({hint})") from exc
        except Exception as exc:
            raise BackendUnavailableError(
                f"backend {name!r} from {entry.distribution} is broken: loading "
                f"{spec.load!r} raised {_describe_exc(exc)}") from exc
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise BackendUnavailableError(f"backend {name!r}: {spec.load!r} is {cls!r}, "
                                          "not a kvcore.Backend subclass")
        declared = getattr(cls, "api_version", None)
        if declared is None:
            raise ApiVersionError(f"backend {name!r}: {cls.__qualname__} declares no "
                                  f"api_version; set the class attribute api_version = "
                                  f"{KVCORE_API_VERSION} once it implements that contract")
        if declared != KVCORE_API_VERSION:
            raise ApiVersionError(f"backend {name!r} was built for kvcore API version "
                                  f"{declared}, this kvcore provides {KVCORE_API_VERSION}"
                                  f"{_migration_note(declared)}")
        try:
            cls.probe()
            instance = cls()
        except BackendUnavailableError as exc:
            raise BackendUnavailableError(f"backend {name!r} is unavailable: {exc}") from exc
        except Exception as exc:
            raise BackendUnavailableError(f"backend {name!r} is unavailable: its probe "
                                          f"raised {_describe_exc(exc)}") from exc
        self._instances[name] = instance
        return instance


#: Where the backend guide explains moving a backend to the current API version.
MIGRATION_GUIDE = ("docs/writing-a-backend.md, section \"Migrating from API version 1\" "
                   "(https://github.com/kvcore/kvcore/blob/main/docs/writing-a-backend.md)")


def _migration_note(version: Any) -> str:
    if isinstance(version, int) and version < KVCORE_API_VERSION:
        return f"; to update the backend see {MIGRATION_GUIDE}"
    return ""


def _resolve(load: Any) -> Any:
    if callable(load):
        return load()
    module_name, _, attr = str(load).partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


_REGISTRY = Registry()


def list_backends(*, probe: bool = False) -> list[BackendRecord]:
    """Every discovered backend with its distribution, version and availability.

    Without ``probe`` no array library is imported: availability means the plugin
    loaded, the API version matches and the library is installed.  With
    ``probe=True`` each backend is imported and its runtime checked (a GPU backend
    reports the driver's own error text).
    """
    return _REGISTRY.list_backends(probe=probe)


def get_backend(name: str | None = None) -> Backend:
    """Select a backend by name; without one, by the default rule.

    The default rule: ``$KVCORE_BACKEND`` if it is set (an error then names the
    variable), else ``"numpy"`` if it is installed, else the only installed backend
    that can run here, else an error listing what is installed and the
    ``pip install "kvcore[...]"`` extras.

    Raises :class:`~kvcore.errors.UnknownBackendError` (listing what is installed and
    the ``pip install`` that would bring ``name``), or
    :class:`~kvcore.errors.BackendUnavailableError` with the cause.  A name given in
    code or in ``$KVCORE_BACKEND`` never falls back to a different backend.
    """
    return _REGISTRY.get_backend(name)


def backend_for_array(array: Any) -> Backend:
    """The available backend that owns arrays of ``array``'s library."""
    return _REGISTRY.backend_for_array(array)


def device_types_served() -> str:
    """Which installed backends place pools on which device types (for errors about a
    device no backend serves); imports the available ones."""
    parts = []
    for record in list_backends():
        if not record.available:
            parts.append(f"{record.name} (unavailable)")
            continue
        try:
            types = get_backend(record.name).capabilities().device_types
        except Exception as exc:  # noqa: BLE001 - only describing, for an error message
            parts.append(f"{record.name} (unavailable: {type(exc).__name__})")
            continue
        parts.append(f"{record.name} ({', '.join(types)})")
    listing = "; ".join(parts) if parts else "none"
    return f"Installed backends and the device types they serve: {listing}"


def register_backend(backend: BackendSpec | type[Backend], *, replace_existing: bool = False) -> None:
    """Register a backend in code, without an entry point."""
    _REGISTRY.register(backend, replace_existing=replace_existing)


def unregister_backend(name: str) -> None:
    """Remove a backend registered with :func:`register_backend`."""
    _REGISTRY.unregister(name)


def refresh_backends() -> None:
    """Discover entry points again (after installing a plugin in a running process)."""
    _REGISTRY.refresh()
