"""The pytest plugin of the store section (entry point ``pytest11``:
``kvcore_conformance_stores``).

Inert unless ``--kv-store`` is given: it adds the options and the fixture
``kvcore_store_url`` and imports nothing but pytest at load time.

``--kv-store URL``  (repeatable)
    Run ``kvcore_conformance.stores`` against the store at URL; each test is
    parametrized by URL (shown with its password removed).
``--kv-store-option KEY=VALUE``  (repeatable)
    Passed to ``open_store`` (``password=...``, ``timeout=2``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

__all__ = ["pytest_addoption", "pytest_generate_tests", "pytest_ignore_collect",
           "pytest_report_header", "selected_stores", "store_options"]

_TESTS = Path(__file__).resolve().parent / "tests"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvcore-conformance-stores", "kvcore store conformance suite")
    group.addoption("--kv-store", action="append", default=[], metavar="URL",
                    dest="kvcore_stores",
                    help="run the kvcore store conformance tests against the store at URL "
                         "(repeat the option for several); use with "
                         "`--pyargs kvcore_conformance.stores`")
    group.addoption("--kv-store-option", action="append", default=[], metavar="KEY=VALUE",
                    dest="kvcore_store_options",
                    help="an option passed to kvcore.stores.open_store (repeatable)")


def selected_stores(config: pytest.Config) -> list[str]:
    """The ``--kv-store`` URLs, deduplicated (not split on commas: a Redis Cluster URL
    lists its nodes with them)."""
    urls: list[str] = []
    for value in config.getoption("kvcore_stores", default=None) or []:
        url = value.strip()
        if url and url not in urls:
            urls.append(url)
    return urls


def store_options(config: pytest.Config) -> dict[str, Any]:
    """The ``--kv-store-option`` values as keyword arguments for ``open_store``."""
    out: dict[str, Any] = {}
    for item in config.getoption("kvcore_store_options", default=None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise pytest.UsageError(f"--kv-store-option takes KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Without ``--kv-store`` the section's own tests are not collected, so running the
    backend suite (``--pyargs kvcore_conformance --kv-backend NAME``) is unchanged."""
    if selected_stores(config):
        return None
    try:
        inside = Path(collection_path).resolve().is_relative_to(_TESTS)
    except OSError:
        return None
    return True if inside else None


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    urls = selected_stores(config)
    if not urls:
        return None
    from kvcore.stores import redact_url
    return [f"kvcore store under test: {redact_url(u)}" for u in urls]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kvcore_store_url" not in metafunc.fixturenames:
        return
    urls = selected_stores(metafunc.config)
    overridden = any("kvcore_store_url" in vars(k) for k in getattr(metafunc.cls, "__mro__", ())
                     if k.__name__ != "StoreContract")
    if urls and not overridden:
        from kvcore.stores import redact_url
        metafunc.parametrize("kvcore_store_url", urls, ids=[redact_url(u) for u in urls])


@pytest.fixture
def kvcore_store_url() -> str:
    """The store under test, by URL (parametrized from ``--kv-store``)."""
    pytest.fail("no kvcore store selected: run pytest with --kv-store URL, or override the "
                "`kvcore_store_url` fixture", pytrace=False)

