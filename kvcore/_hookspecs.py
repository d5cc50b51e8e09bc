"""Hook specifications: the contract between kvcore and a backend plugin.

A plugin is a module named by an entry point in the ``kvcore`` group::

    [project.entry-points.kvcore]
    mybackend = "kv_mybackend._plugin"

That module must import nothing heavier than ``kvcore`` and implement the hook below
with ``@kvcore.hookimpl``.  kvcore imports it when backends are listed or selected; the
array library is imported only when the backend itself is asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from ._backend import Backend

__all__ = ["PROJECT_NAME", "BackendSpec", "hookimpl", "hookspec", "kvcore_backends"]

PROJECT_NAME = "kvcore"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@dataclass(frozen=True)
class BackendSpec:
    """What a plugin says about one backend, without importing it.

    ``load`` is either ``"module:ClassName"`` (imported on first use) or a callable
    returning the :class:`~kvcore.Backend` subclass.  ``requires`` lists the import
    names of the libraries the backend needs; the registry checks they are installed
    with ``importlib.util.find_spec``, which does not import them.
    """

    name: str
    load: str | Callable[[], type[Backend]]
    api_version: int
    requires: tuple[str, ...] = ()
    description: str = ""
    #: What fixes a missing library, e.g. ``pip install "kvcore[torch]"``.
    install_hint: str | None = None
    #: Free-form facts shown by ``kvcore backends`` (devices, dtypes, ...).
    extra: dict[str, str] = field(default_factory=dict)


@hookspec
def kvcore_backends() -> list[BackendSpec]:  # type: ignore[empty-body]
    """Return the backends this plugin provides.

    Called once per plugin when kvcore discovers backends.  Must be cheap and must not
    import the array library: return :class:`BackendSpec` records whose ``load`` names
    the module that does.  An exception raised here is reported against the plugin by
    :func:`kvcore.list_backends` and does not affect other plugins.
    """
