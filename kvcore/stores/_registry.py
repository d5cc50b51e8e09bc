"""Finding store plugins and opening stores by URL or name.

Mirrors the backend registry (:mod:`kvcore._registry`): discovery walks the
``kvcore.stores`` entry points itself and loads each plugin in isolation, so a broken
plugin is reported with its reason and never hides the others; pluggy validates and
calls the hooks.  The core's own stores (``file://``, ``memory://``) are built in and
always listed.

Levels of "is it there", as for backends: *installed* (an entry point exists),
*loadable* (the plugin answered, API version matches, its libraries are found by
``find_spec``: :func:`list_stores`), *usable* (its Store class imported and
``probe()`` passed: ``list_stores(probe=True)`` and :func:`open_store`).
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

from .._hookspecs import PROJECT_NAME
from .._version import __version__
from ..errors import (DuplicateStoreError, PluginLoadError, StoreUnavailableError, StoreConfigError,
                      UnknownStoreError)
from . import _hookspecs
from ._hookspecs import ENTRY_POINT_GROUP, StoreSpec
from ._store import STORE_API_VERSION, Store
from ._url import redact_url, url_scheme

__all__ = ["StoreRecord", "StoreRegistry", "list_stores", "open_store", "refresh_stores",
           "register_store", "unregister_store"]

ENV_STRICT = "KVCORE_STRICT_PLUGINS"
_BUILTIN = "<built in>"
_PROGRAMMATIC = "<registered in code>"
#: Stores this project ships outside the core, and the extra that installs each.
KNOWN_EXTRAS = {"redis": "redis", "rediss": "redis", "redis+cluster": "redis",
                "rediss+cluster": "redis"}


def install_hint(name_or_scheme: str) -> str:
    extra = KNOWN_EXTRAS.get(name_or_scheme)
    if extra is None:
        return f"no known distribution provides store {name_or_scheme!r}; install its plugin"
    return f'pip install "kvcore[{extra}]"'


def _builtin_specs() -> list[StoreSpec]:
    return [
        StoreSpec(name="file", schemes=("file",), load="kvcore.stores._disk:DiskStore",
                  api_version=STORE_API_VERSION,
                  description="one local directory, atomic writes, survives restarts",
                  extra={"url": "file:///var/cache/kvcore[?fsync=1&max_bytes=N]"}),
        StoreSpec(name="memory", schemes=("memory",), load="kvcore.stores._memory:MemoryStore",
                  api_version=STORE_API_VERSION,
                  description="this process's memory, shared by name (tests, notebooks)",
                  extra={"url": "memory://NAME[?max_bytes=N]"}),
    ]


@dataclass(frozen=True)
class StoreRecord:
    """One discovered store kind (or one plugin that failed before naming any)."""

    name: str
    schemes: tuple[str, ...]
    distribution: str
    version: str
    entry_point: str
    available: bool
    reason: str | None = None
    #: ``True`` when the Store class was imported and its ``probe()`` ran.
    probed: bool = False
    api_version: int | None = None
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["schemes"] = list(self.schemes)
        return out


@dataclass
class _Entry:
    spec: StoreSpec
    distribution: str
    version: str
    entry_point: str


def _strict() -> bool:
    return os.environ.get(ENV_STRICT, "").strip().lower() in ("1", "true", "yes", "on")


def _describe_exc(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class StoreRegistry:
    """The set of known store kinds.  kvcore keeps one; tests may build their own."""

    def __init__(self, group: str = ENTRY_POINT_GROUP) -> None:
        self._group = group
        self._lock = threading.RLock()
        self._manual: dict[str, _Entry] = {}
        self.refresh()

    def refresh(self) -> None:
        """Forget everything discovered; the next call reads the metadata again."""
        with self._lock:
            self._discovered = False
            self._entries: dict[str, list[_Entry]] = {}
            self._failures: list[StoreRecord] = []
            self._classes: dict[str, type[Store]] = {}
            self._pm = pluggy.PluginManager(PROJECT_NAME)
            self._pm.add_hookspecs(_hookspecs)

    # --- discovery ----------------------------------------------------------------

    def _discover(self) -> None:
        if self._discovered:
            return
        for spec in _builtin_specs():
            self._entries.setdefault(spec.name, []).append(
                _Entry(spec, "kvcore", __version__, _BUILTIN))
        seen: set[tuple[str, str, str]] = set()
        for ep in metadata.entry_points(group=self._group):
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            ident = (ep.name, ep.value, dist.lower().replace("_", "-"))
            if ident in seen:  # an editable install next to a stale egg-info
                continue
            seen.add(ident)
            where = f"{ep.name} = {ep.value}"
            try:
                module = ep.load()
                self._pm.register(module, name=f"{dist}:{ep.name}")
                caller = self._pm.subset_hook_caller(
                    "kvcore_stores",
                    remove_plugins=[p for p in self._pm.get_plugins() if p is not module])
                specs = [s for batch in caller() for s in (batch or [])]
                for spec in specs:
                    if not isinstance(spec, StoreSpec):
                        raise TypeError(f"hook kvcore_stores returned {spec!r}, expected "
                                        "kvcore.stores.StoreSpec records")
            except Exception as exc:  # a broken plugin must not hide the others
                reason = (f"store plugin {where!r} of distribution {dist} {version} failed: "
                          f"{_describe_exc(exc)} (fix or uninstall {dist})")
                if _strict():
                    raise PluginLoadError(reason) from exc
                self._failures.append(StoreRecord(
                    name=ep.name, schemes=(), distribution=dist, version=version,
                    entry_point=where, available=False, reason=reason))
                continue
            for spec in specs:
                self._entries.setdefault(spec.name, []).append(_Entry(spec, dist, version, where))
        self._discovered = True

    def _all_entries(self) -> dict[str, list[_Entry]]:
        self._discover()
        merged = {name: list(entries) for name, entries in self._entries.items()}
        for name, entry in self._manual.items():
            merged[name] = [entry]  # code registration overrides discovery, on purpose
        return merged

    # --- programmatic registration -----------------------------------------------

    def register(self, store: StoreSpec | type[Store], *, replace_existing: bool = False) -> None:
        """Make a store kind openable without an entry point (tests, notebooks)."""
        if isinstance(store, type) and issubclass(store, Store):
            cls = store
            spec = StoreSpec(name=cls.name, schemes=tuple(cls.schemes), load=lambda: cls,
                             api_version=cls.api_version,
                             description=(cls.__doc__ or "").strip().split("\n")[0])
        elif isinstance(store, StoreSpec):
            spec = store
        else:
            raise TypeError(f"register_store takes a StoreSpec or a Store subclass, got "
                            f"{store!r}")
        if not spec.name or not spec.schemes:
            raise StoreConfigError(f"store {spec!r} needs a name and at least one URL scheme")
        with self._lock:
            if spec.name in self._manual and not replace_existing:
                raise DuplicateStoreError(f"store {spec.name!r} is already registered in code; "
                                          "pass replace_existing=True to replace it")
            self._manual[spec.name] = _Entry(spec, _PROGRAMMATIC, "", _PROGRAMMATIC)
            self._classes.pop(spec.name, None)

    def unregister(self, name: str) -> None:
        with self._lock:
            if self._manual.pop(name, None) is None:
                raise UnknownStoreError(f"no store named {name!r} was registered in code")
            self._classes.pop(name, None)

    # --- listing ------------------------------------------------------------------

    def list_stores(self, *, probe: bool = False) -> list[StoreRecord]:
        """One record per store kind, plus one per plugin that failed to load."""
        with self._lock:
            records = []
            claims = self._scheme_claims()
            for name, entries in sorted(self._all_entries().items()):
                for entry in entries:
                    record = self._static_record(name, entry)
                    clash = self._clash(name, entries, entry, claims)
                    if clash:
                        record = replace(record, available=False, reason=clash)
                    elif probe and record.available:
                        try:
                            self._load_class(name, entry)
                            record = replace(record, probed=True)
                        except StoreUnavailableError as exc:
                            record = replace(record, available=False, probed=True,
                                             reason=str(exc))
                    records.append(record)
            return records + list(self._failures)

    def _scheme_claims(self) -> dict[str, set[str]]:
        claims: dict[str, set[str]] = {}
        for name, entries in self._all_entries().items():
            for entry in entries:
                for scheme in entry.spec.schemes:
                    claims.setdefault(scheme.lower(), set()).add(name)
        return claims

    @staticmethod
    def _clash(name: str, entries: list[_Entry], entry: _Entry,
               claims: dict[str, set[str]]) -> str | None:
        if len(entries) > 1:
            others = ", ".join(sorted(e.distribution for e in entries))
            return f"store name {name!r} is claimed by several distributions: {others}"
        for scheme in entry.spec.schemes:
            owners = claims.get(scheme.lower(), set())
            if len(owners) > 1:
                return (f"URL scheme {scheme!r} is claimed by several stores: "
                        f"{', '.join(sorted(owners))}; uninstall all but one")
        return None

    def _static_record(self, name: str, entry: _Entry) -> StoreRecord:
        spec = entry.spec
        record = StoreRecord(name=name, schemes=tuple(spec.schemes),
                             distribution=entry.distribution, version=entry.version,
                             entry_point=entry.entry_point, available=True,
                             api_version=spec.api_version, description=spec.description)
        reason = self._static_problem(spec)
        return replace(record, available=False, reason=reason) if reason else record

    @staticmethod
    def _static_problem(spec: StoreSpec) -> str | None:
        if spec.api_version != STORE_API_VERSION:
            return (f"store {spec.name!r} was built for kvcore store API version "
                    f"{spec.api_version}, this kvcore provides {STORE_API_VERSION}")
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

    def store_class(self, name_or_url: str) -> type[Store]:
        """The usable Store class for a store name or a URL's scheme."""
        with self._lock:
            name = self._resolve_name(name_or_url)
            entries = self._all_entries()[name]
            if len(entries) > 1:
                others = ", ".join(sorted(e.distribution for e in entries))
                raise StoreUnavailableError(f"store name {name!r} is claimed by several "
                                            f"distributions: {others}; uninstall all but one")
            entry = entries[0]
            problem = self._static_problem(entry.spec)
            if problem is not None:
                raise StoreUnavailableError(f"store {name!r} is unavailable: {problem}")
            return self._load_class(name, entry)

    def _resolve_name(self, name_or_url: str) -> str:
        entries = self._all_entries()
        if not isinstance(name_or_url, str) or not name_or_url:
            raise UnknownStoreError(f"a store is named by a URL or a store name, got "
                                    f"{name_or_url!r}")
        if "://" not in name_or_url:
            if name_or_url in entries:
                return name_or_url
            raise self._unknown(f"no store named {name_or_url!r}", name_or_url)
        scheme = url_scheme(name_or_url)
        owners = sorted(self._scheme_claims().get(scheme, set()))
        if len(owners) == 1:
            return owners[0]
        if len(owners) > 1:
            raise StoreUnavailableError(f"URL scheme {scheme!r} is claimed by several "
                                        f"stores: {', '.join(owners)}; uninstall all but one")
        for failure in self._failures:  # a broken plugin may be the one that owns it
            if failure.name in (scheme, scheme.split("+")[0]):
                raise StoreUnavailableError(f"store for {scheme}:// is unavailable: "
                                            f"{failure.reason}")
        raise self._unknown(f"no store opens {scheme}:// URLs ({redact_url(name_or_url)!r})",
                            scheme)

    def _unknown(self, what: str, name: str) -> UnknownStoreError:
        known = sorted(s for entries in self._all_entries().values()
                       for e in entries for s in e.spec.schemes)
        listing = ", ".join(f"{s}://" for s in known) if known else "none"
        return UnknownStoreError(f"{what}; installed stores open: {listing}. To get it: "
                                 f"{install_hint(name)}")

    def _load_class(self, name: str, entry: _Entry) -> type[Store]:
        cached = self._classes.get(name)
        if cached is not None:
            return cached
        spec = entry.spec
        try:
            cls = _resolve(spec.load)
        except ImportError as exc:
            hint = spec.install_hint or install_hint(name)
            raise StoreUnavailableError(f"store {name!r} is unavailable: importing it failed "
                                        f"with {_describe_exc(exc)} ({hint})") from exc
        except Exception as exc:
            raise StoreUnavailableError(f"store {name!r} from {entry.distribution} is broken: "
                                        f"loading {spec.load!r} raised "
                                        f"{_describe_exc(exc)}") from exc
        if not (isinstance(cls, type) and issubclass(cls, Store)):
            raise StoreUnavailableError(f"store {name!r}: {spec.load!r} is {cls!r}, not a "
                                        "kvcore.stores.Store subclass")
        if cls.api_version != STORE_API_VERSION:
            raise StoreUnavailableError(f"store {name!r} was built for kvcore store API "
                                        f"version {cls.api_version}, this kvcore provides "
                                        f"{STORE_API_VERSION}")
        try:
            cls.probe()
        except StoreUnavailableError as exc:
            raise StoreUnavailableError(f"store {name!r} is unavailable: {exc}") from exc
        except Exception as exc:
            raise StoreUnavailableError(f"store {name!r} is unavailable: its probe raised "
                                        f"{_describe_exc(exc)}") from exc
        self._classes[name] = cls
        return cls

    def open(self, target: str, **options: Any) -> Store:
        """Open a store from a URL (``redis://h:6379/0``) or a store name plus a
        ``url=`` option."""
        if isinstance(target, str) and "://" not in target:
            url = options.pop("url", None)
            if url is None:
                raise UnknownStoreError(f"store name {target!r} needs a url= option "
                                        f"(or pass the URL itself)")
            cls = self.store_class(target)
            if url_scheme(url) not in cls.schemes:
                raise UnknownStoreError(f"store {target!r} opens {', '.join(cls.schemes)} "
                                        f"URLs, not {redact_url(url)!r}")
        else:
            url = target
            cls = self.store_class(target)
        return cls.from_url(url.strip(), **options)


def _resolve(load: Any) -> Any:
    if callable(load):
        return load()
    module_name, _, attr = str(load).partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


_REGISTRY = StoreRegistry()


def list_stores(*, probe: bool = False) -> list[StoreRecord]:
    """Every known store kind with its schemes, distribution and availability.

    Without ``probe`` no client library is imported; with ``probe=True`` each Store
    class is imported and its ``probe()`` run (a missing hiredis or too-old redis-py
    shows up here)."""
    return _REGISTRY.list_stores(probe=probe)


def open_store(target: str, **options: Any) -> Store:
    """Open a store: ``open_store("redis://127.0.0.1:6379/0")``,
    ``open_store("file:///var/cache/kvcore")``, or by name,
    ``open_store("redis", url="redis://...")``.

    The URL's scheme picks the plugin; ``options`` override the URL's query options
    (pass secrets such as ``password=`` here rather than in a URL that may be logged).
    Raises :class:`~kvcore.errors.UnknownStoreError` (listing the schemes installed and
    the ``pip install`` that would bring the missing one),
    :class:`~kvcore.errors.StoreUnavailableError` or
    :class:`~kvcore.errors.StoreConfigError`.  Opening does not contact the server.
    """
    return _REGISTRY.open(target, **options)


def register_store(store: StoreSpec | type[Store], *, replace_existing: bool = False) -> None:
    """Register a store kind in code, without an entry point."""
    _REGISTRY.register(store, replace_existing=replace_existing)


def unregister_store(name: str) -> None:
    """Remove a store registered with :func:`register_store`."""
    _REGISTRY.unregister(name)


def refresh_stores() -> None:
    """Discover entry points again (after installing a plugin in a running process)."""
    _REGISTRY.refresh()
