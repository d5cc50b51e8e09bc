"""The hook a store plugin implements, and the record it returns.

A store plugin is a module named by an entry point in the ``kvcore.stores`` group::

    [project.entry-points."kvcore.stores"]
    redis = "kv_redis._plugin"

That module imports nothing heavier than ``kvcore`` and implements, with the same
``@kvcore.hookimpl`` marker backends use::

    @kvcore.hookimpl
    def kvcore_stores() -> list[kvcore.stores.StoreSpec]:
        return [StoreSpec(name="redis", schemes=("redis", "rediss"),
                          load="kv_redis._store:RedisStore", api_version=1,
                          requires=("redis",))]

kvcore imports the plugin module when stores are listed or opened; the client
library is imported only when a store of that kind is opened (or probed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pluggy

from .._hookspecs import PROJECT_NAME

if TYPE_CHECKING:
    from ._store import Store

__all__ = ["ENTRY_POINT_GROUP", "StoreSpec", "kvcore_stores"]

#: The entry-point group store plugins declare themselves in.
ENTRY_POINT_GROUP = "kvcore.stores"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)


@dataclass(frozen=True)
class StoreSpec:
    """What a plugin says about one store kind, without importing its library.

    ``schemes`` are the URL schemes it opens (``open_store`` picks the plugin by the
    URL's scheme); ``load`` is ``"module:ClassName"`` or a callable returning the
    :class:`~kvcore.stores.Store` subclass; ``requires`` lists import names checked
    with ``importlib.util.find_spec`` (nothing is imported to list stores).
    """

    name: str
    schemes: tuple[str, ...]
    load: str | Callable[[], type[Store]]
    api_version: int
    requires: tuple[str, ...] = ()
    description: str = ""
    #: What fixes a missing library, e.g. ``pip install "kvcore[redis]"``.
    install_hint: str | None = None
    #: Free-form facts shown by ``kvcore stores`` (URL forms, options, ...).
    extra: dict[str, str] = field(default_factory=dict)


@hookspec
def kvcore_stores() -> list[StoreSpec]:  # type: ignore[empty-body]
    """Return the stores this plugin provides.

    Called once per plugin when kvcore discovers stores.  Must be cheap and must not
    import the client library.  An exception raised here is reported against the
    plugin by :func:`kvcore.stores.list_stores` and does not affect other plugins.
    """
