"""Store discovery through real entry points (group ``kvcore.stores``), isolation of
broken plugins, selection by URL scheme or name."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from kvcore.errors import (DuplicateStoreError, PluginLoadError, StoreConfigError,
                           StoreUnavailableError, UnknownStoreError)
from kvcore.stores import (STORE_API_VERSION, DiskStore, MemoryStore, StoreRegistry,
                           StoreSpec, list_stores, open_store, register_store,
                           unregister_store)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Install throwaway distributions: a ``*.dist-info`` folder on ``sys.path`` is what
    ``importlib.metadata`` reads, as for a pip-installed package."""
    monkeypatch.syspath_prepend(str(tmp_path))
    created: list[str] = []

    def install(dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
        info = tmp_path / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        eps = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
        (info / "entry_points.txt").write_text(f"[kvcore.stores]\n{eps}")
        for name, source in modules.items():
            (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
            created.append(name)

    yield install
    for name in created:
        sys.modules.pop(name, None)


PLUGIN = """
    import kvcore
    from kvcore.stores import StoreSpec

    @kvcore.hookimpl
    def kvcore_stores():
        return [StoreSpec(name={name!r}, schemes={schemes!r}, load={load!r},
                          api_version={api}, requires={requires!r})]
"""

STORE = """
    from kvcore.stores import MemoryStore

    class {cls}(MemoryStore):
        name = {name!r}
        schemes = {schemes!r}
"""


def plugin(name, schemes, load, api=STORE_API_VERSION, requires=()):
    return PLUGIN.format(name=name, schemes=tuple(schemes), load=load, api=api,
                         requires=tuple(requires))


def by_name(records):
    return {r.name: r for r in records}


def test_built_in_stores_are_always_listed_and_open_by_url(tmp_path):
    records = by_name(list_stores(probe=True))
    assert records["file"].available and records["file"].distribution == "kvcore"
    assert records["memory"].schemes == ("memory",)
    with open_store(f"file://{tmp_path}/s") as store:
        assert isinstance(store, DiskStore)
    with open_store("memory://reg-test") as store:
        assert isinstance(store, MemoryStore) and store.url == "memory://reg-test"
    with open_store("memory", url="memory://reg-test") as store:  # by name
        assert isinstance(store, MemoryStore)


def test_an_installed_plugin_is_listed_from_metadata_and_imported_only_when_opened(site):
    site("kvcore-fakestore", {"fake": "fake_store_plugin"},
         {"fake_store_plugin": plugin("fake", ["fake"], "fake_store_impl:FakeStore"),
          "fake_store_impl": STORE.format(cls="FakeStore", name="fake", schemes=("fake",))})
    reg = StoreRegistry()
    record = by_name(reg.list_stores())["fake"]
    assert (record.distribution, record.available, record.probed, record.schemes) == \
        ("kvcore-fakestore", True, False, ("fake",))
    assert "fake_store_impl" not in sys.modules
    store = reg.open("fake://x")
    assert type(store).__name__ == "FakeStore"
    store.close()


def test_a_broken_plugin_is_reported_and_hides_nothing(site):
    site("kvcore-brokenstore", {"broken": "broken_store_plugin"},
         {"broken_store_plugin": "raise ImportError('boom: no libstore.so')"})
    site("kvcore-fakestore", {"fake": "fake_store_plugin"},
         {"fake_store_plugin": plugin("fake", ["fake"], "fake_store_impl:FakeStore"),
          "fake_store_impl": STORE.format(cls="FakeStore", name="fake", schemes=("fake",))})
    reg = StoreRegistry()
    records = by_name(reg.list_stores())
    assert not records["broken"].available
    assert "boom: no libstore.so" in records["broken"].reason
    assert "fix or uninstall kvcore-brokenstore" in records["broken"].reason
    assert records["fake"].available and records["file"].available
    with pytest.raises(StoreUnavailableError, match="boom"):
        reg.open("broken://x")
    reg.open("fake://y").close()


def test_strict_mode_turns_plugin_failures_into_errors(site, monkeypatch):
    site("kvcore-brokenstore", {"broken": "broken_store_plugin"},
         {"broken_store_plugin": "raise RuntimeError('bad store plugin')"})
    monkeypatch.setenv("KVCORE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match="bad store plugin.*kvcore-brokenstore"):
        StoreRegistry().list_stores()


def test_missing_library_wrong_api_and_bad_class_are_unavailable_with_reasons(site):
    site("kvcore-a", {"a": "a_plugin"},
         {"a_plugin": plugin("a", ["a"], "nowhere:X", requires=["no_such_lib_xyz"])})
    site("kvcore-b", {"b": "b_plugin"}, {"b_plugin": plugin("b", ["b"], "x:Y", api=99)})
    site("kvcore-c", {"c": "c_plugin"}, {"c_plugin": plugin("c", ["c"], "builtins:dict")})
    reg = StoreRegistry()
    records = by_name(reg.list_stores(probe=True))
    assert "library 'no_such_lib_xyz' is not installed" in records["a"].reason
    assert "store API version 99" in records["b"].reason
    assert "not a kvcore.stores.Store subclass" in records["c"].reason
    for scheme, fragment in (("a", "no_such_lib"), ("b", "version 99"), ("c", "not a kvcore")):
        with pytest.raises(StoreUnavailableError, match=fragment):
            reg.open(f"{scheme}://h")


def test_two_stores_claiming_one_scheme_are_refused(site):
    site("kvcore-x", {"x": "x_plugin"}, {"x_plugin": plugin("x", ["file"], "a:B")})
    reg = StoreRegistry()
    records = by_name(reg.list_stores())
    assert not records["x"].available and "claimed by several stores" in records["x"].reason
    with pytest.raises(StoreUnavailableError, match="scheme 'file' is claimed by several"):
        reg.open("file:///tmp/x")


def test_unknown_schemes_list_what_is_installed_and_what_to_install():
    with pytest.raises(UnknownStoreError) as info:
        StoreRegistry().open("s3://bucket/prefix")
    assert "no store opens s3:// URLs" in str(info.value) and "file://" in str(info.value)
    without_plugins = StoreRegistry(group="kvcore.stores.none-installed")
    with pytest.raises(UnknownStoreError, match=r'pip install "kvcore\[redis\]"'):
        without_plugins.open("redis://127.0.0.1:6379/0")


def test_passwords_never_appear_in_errors():
    with pytest.raises(UnknownStoreError) as info:
        open_store("nosuch://user:hunter2@host/0")
    assert "hunter2" not in str(info.value) and "***" in str(info.value)


@pytest.mark.parametrize("target, error", [
    ("", UnknownStoreError), ("nope", UnknownStoreError), ("://x", StoreConfigError),
    (None, UnknownStoreError), ("memory", UnknownStoreError),
])
def test_bad_targets_are_typed_errors(target, error):
    with pytest.raises(error):
        open_store(target)


def test_a_name_with_a_url_of_another_scheme_is_refused():
    with pytest.raises(UnknownStoreError, match="opens memory URLs"):
        open_store("memory", url="file:///tmp/x")


def test_registration_in_code_overrides_and_is_removable(tmp_path):
    class LoudMemory(MemoryStore):
        name = "loud"
        schemes = ("loud",)

    register_store(LoudMemory)
    try:
        with pytest.raises(DuplicateStoreError, match="already registered"):
            register_store(LoudMemory)
        register_store(LoudMemory, replace_existing=True)
        assert isinstance(open_store("loud://a"), LoudMemory)
        assert by_name(list_stores())["loud"].entry_point == "<registered in code>"
    finally:
        unregister_store("loud")
    with pytest.raises(UnknownStoreError):
        open_store("loud://a")
    with pytest.raises(UnknownStoreError, match="registered in code"):
        unregister_store("loud")
    with pytest.raises(StoreConfigError, match="at least one URL scheme"):
        register_store(StoreSpec(name="x", schemes=(), load="a:b", api_version=1))
    with pytest.raises(TypeError, match="StoreSpec or a Store subclass"):
        register_store(object())  # type: ignore[arg-type]


def test_listing_stores_imports_no_client_library():
    import subprocess
    code = ("import sys, kvcore.stores as s\n"
            "records = {r.name: r for r in s.list_stores()}\n"
            "assert records['redis'].available, records['redis']\n"
            "heavy = ('redis', 'hiredis', 'kv_redis._single')\n"
            "print(','.join(m for m in heavy if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
