"""Store URLs: the scheme that picks a plugin, options, and never a leaked password."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

from ..errors import StoreConfigError

__all__ = ["StoreOptions", "redact_url", "url_scheme"]

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def url_scheme(url: object) -> str:
    """The lower-cased scheme of ``url`` (``"redis"`` for ``redis://h:6379/0``)."""
    if not isinstance(url, str):
        raise StoreConfigError(f"a store URL must be a str, got {type(url).__name__}")
    match = _SCHEME_RE.match(url.strip())
    if match is None:
        raise StoreConfigError(f"store URL {redact_url(url)!r} has no scheme; expected e.g. "
                            "redis://host:6379/0 or file:///var/cache/kvcore")
    return match.group(1).lower()


def redact_url(url: str) -> str:
    """``url`` with the password of its user-info (and any ``password=`` option)
    replaced by ``***``."""
    text = str(url)
    text = re.sub(r"(://[^/@:]*:)[^@/]*@", r"\1***@", text)
    return re.sub(r"(?i)([?&](?:password|ssl_password)=)[^&]*", r"\1***", text)


class StoreOptions:
    """A store URL's query options merged with keyword options (keywords win), read
    with typed getters; :meth:`finish` refuses any option nobody read."""

    def __init__(self, url: str, query: str, overrides: Mapping[str, Any]) -> None:
        self._url = redact_url(url)
        try:
            pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=False)
        except ValueError as exc:
            raise StoreConfigError(f"store URL {self._url!r} has a malformed query: "
                                   f"{exc}") from None
        self._values: dict[str, Any] = {}
        for k, v in pairs:
            if k in self._values:
                raise StoreConfigError(f"store URL {self._url!r} gives option {k!r} twice")
            self._values[k] = v
        self._values.update(overrides)
        self._read: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self._values

    def raw(self, name: str, default: Any = None) -> Any:
        self._read.add(name)
        return self._values.get(name, default)

    def text(self, name: str, default: str | None = None) -> str | None:
        value = self.raw(name, default)
        if value is None or isinstance(value, str):
            return value
        raise StoreConfigError(f"option {name}={value!r} of {self._url!r} must be a string")

    def number(self, name: str, default: float, *, low: float = 0.0,
               high: float = float("inf"), integer: bool = False) -> Any:
        value = self.raw(name, default)
        if isinstance(value, bool):
            raise StoreConfigError(f"option {name}={value!r} of {self._url!r} must be a number")
        try:
            number = int(value) if integer else float(value)
        except (TypeError, ValueError):
            kind = "an integer" if integer else "a number"
            raise StoreConfigError(f"option {name}={value!r} of {self._url!r} must be "
                                f"{kind}") from None
        if not low <= number <= high:
            raise StoreConfigError(f"option {name}={value!r} of {self._url!r} must be in "
                                f"[{low}, {high}]")
        return number

    def flag(self, name: str, default: bool) -> bool:
        value = self.raw(name, default)
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise StoreConfigError(f"option {name}={value!r} of {self._url!r} must be one of "
                            f"{', '.join(_TRUE + _FALSE)}")

    def finish(self) -> None:
        """Raise :class:`~kvcore.errors.StoreConfigError` for options no getter read."""
        unknown = sorted(set(self._values) - self._read)
        if unknown:
            raise StoreConfigError(f"store URL {self._url!r}: unknown option(s) "
                                f"{', '.join(unknown)}; known: {', '.join(sorted(self._read))}")
