"""Backend discovery through real entry points, isolation of broken plugins, selection."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

import kvcore
from kvcore._registry import Registry
from kvcore.errors import (ApiVersionError, BackendUnavailableError, DuplicateBackendError,
                           PluginLoadError, UnknownBackendError)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Install throwaway distributions: a ``*.dist-info`` folder on ``sys.path`` is what
    ``importlib.metadata`` reads, exactly as for a pip-installed package."""
    monkeypatch.syspath_prepend(str(tmp_path))
    created: list[str] = []

    def install(dist: str, version: str, entry_points: dict[str, str],
                modules: dict[str, str], root: Path = tmp_path) -> None:
        root.mkdir(exist_ok=True)
        info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        eps = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
        (info / "entry_points.txt").write_text(f"[kvcore]\n{eps}")
        for name, source in modules.items():
            (root / f"{name}.py").write_text(textwrap.dedent(source))
            created.append(name)

    yield install
    for name in created:
        sys.modules.pop(name, None)


PLUGIN = """
    import kvcore

    @kvcore.hookimpl
    def kvcore_backends():
        return [kvcore.BackendSpec(name={name!r}, load={load!r}, api_version={api},
                                   requires={requires!r})]
"""

BACKEND = """
    from kv_numpy._backend import NumpyBackend
    from kvcore.errors import BackendUnavailableError

    class {cls}(NumpyBackend):
        name = {name!r}
        {body}
"""


def plugin(name: str, load: str, api: int = kvcore.KVCORE_API_VERSION,
           requires: tuple[str, ...] = ()) -> str:
    return PLUGIN.format(name=name, load=load, api=api, requires=requires)


def backend(cls: str, name: str, body: str = "pass") -> str:
    return BACKEND.format(cls=cls, name=name, body=body)


def by_name(records):
    return {r.name: r for r in records}


def test_an_installed_plugin_is_listed_from_metadata_and_loaded_only_when_selected(site):
    site("kvcore-fake", "1.2.3", {"fake": "fake_plugin"},
         {"fake_plugin": plugin("fake", "fake_backend:FakeBackend"),
          "fake_backend": backend("FakeBackend", "fake")})
    reg = Registry()
    record = by_name(reg.list_backends())["fake"]
    assert (record.distribution, record.version, record.available, record.probed) == \
        ("kvcore-fake", "1.2.3", True, False)
    assert record.entry_point == "fake = fake_plugin"
    assert "fake_backend" not in sys.modules  # listing never imports the backend module
    be = reg.get_backend("fake")
    assert type(be).__name__ == "FakeBackend" and "fake_backend" in sys.modules
    assert reg.get_backend("fake") is be  # one instance per name


def test_a_plugin_that_fails_to_import_is_reported_and_hides_nothing(site):
    site("kvcore-broken", "0.1", {"broken": "broken_plugin"},
         {"broken_plugin": "raise ImportError('boom: missing libfoo.so')"})
    site("kvcore-fake", "1.0", {"fake": "fake_plugin"},
         {"fake_plugin": plugin("fake", "fake_backend:FakeBackend"),
          "fake_backend": backend("FakeBackend", "fake")})
    records = by_name(Registry().list_backends())
    broken = records["broken"]
    assert not broken.available
    assert "boom: missing libfoo.so" in broken.reason and "kvcore-broken" in broken.reason
    assert "fix or uninstall kvcore-broken" in broken.reason
    assert records["fake"].available and records["numpy"].available
    with pytest.raises(BackendUnavailableError, match="boom"):
        Registry().get_backend("broken")
    assert type(Registry().get_backend("fake")).__name__ == "FakeBackend"


def test_strict_mode_turns_plugin_failures_into_errors(site, monkeypatch):
    site("kvcore-broken", "0.1", {"broken": "broken_plugin"},
         {"broken_plugin": "raise RuntimeError('bad plugin')"})
    monkeypatch.setenv("KVCORE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match="bad plugin.*kvcore-broken"):
        Registry().list_backends()


def test_a_hook_that_raises_is_reported_against_its_plugin(site):
    site("kvcore-hookfail", "2.0", {"hookfail": "hookfail_plugin"}, {"hookfail_plugin": """
        import kvcore

        @kvcore.hookimpl
        def kvcore_backends():
            raise ValueError("cannot describe myself")
    """})
    record = by_name(Registry().list_backends())["hookfail"]
    assert not record.available
    assert "cannot describe myself" in record.reason and "kvcore-hookfail 2.0" in record.reason


def test_a_malformed_hook_implementation_names_plugin_and_hook(site):
    site("kvcore-badimpl", "1.0", {"badimpl": "badimpl_plugin"}, {"badimpl_plugin": """
        import kvcore

        @kvcore.hookimpl
        def kvcore_backends(unexpected_argument):
            return []
    """})
    reason = by_name(Registry().list_backends())["badimpl"].reason
    assert "kvcore_backends" in reason and "unexpected_argument" in reason
    assert "kvcore-badimpl" in reason


def test_a_hook_returning_the_wrong_type_is_reported(site):
    site("kvcore-wrong", "1.0", {"wrong": "wrong_plugin"}, {"wrong_plugin": """
        import kvcore

        @kvcore.hookimpl
        def kvcore_backends():
            return ["numpy"]
    """})
    assert "expected kvcore.BackendSpec" in by_name(Registry().list_backends())["wrong"].reason


def test_two_distributions_claiming_one_name_is_an_error_naming_both(site, tmp_path):
    site("kvcore-dup-a", "1.0", {"dup": "dup_a"},
         {"dup_a": plugin("dup", "dup_backend:DupBackend"),
          "dup_backend": backend("DupBackend", "dup")})
    site("kvcore-dup-b", "1.0", {"dup": "dup_b"}, {"dup_b": plugin("dup", "dup_backend:DupBackend")})
    reg = Registry()
    records = [r for r in reg.list_backends() if r.name == "dup"]
    assert len(records) == 2 and not any(r.available for r in records)
    with pytest.raises(DuplicateBackendError, match="kvcore-dup-a.*kvcore-dup-b"):
        reg.get_backend("dup")


def test_the_same_entry_point_seen_twice_is_listed_once(site, tmp_path):
    # An editable install beside a stale copy of the same distribution's metadata.
    modules = {"twice_plugin": plugin("twice", "twice_backend:TwiceBackend"),
               "twice_backend": backend("TwiceBackend", "twice")}
    site("kvcore-twice", "1.0", {"twice": "twice_plugin"}, modules)
    second = tmp_path / "second"
    site("kvcore-twice", "1.0", {"twice": "twice_plugin"}, {}, root=second)
    sys.path.insert(0, str(second))
    try:
        reg = Registry()
        assert [r.name for r in reg.list_backends()].count("twice") == 1
        assert reg.get_backend("twice").name == "twice"
    finally:
        sys.path.remove(str(second))


def test_unknown_name_lists_installed_backends_and_the_extra_that_brings_it():
    reg = Registry()
    with pytest.raises(UnknownBackendError, match=r"installed backends: .*numpy") as info:
        reg.get_backend("cupyy")
    assert "no known distribution provides backend 'cupyy'" in str(info.value)
    reg._entries.pop("torch", None)  # as on a machine without kvcore-torch
    reg._discovered = True
    with pytest.raises(UnknownBackendError, match=r'pip install "kvcore\[torch\]"'):
        reg.get_backend("torch")


def test_selection_uses_the_argument_then_the_environment_then_numpy(site, monkeypatch):
    site("kvcore-fake", "1.0", {"fake": "fake_plugin"},
         {"fake_plugin": plugin("fake", "fake_backend:FakeBackend"),
          "fake_backend": backend("FakeBackend", "fake")})
    reg = Registry()
    monkeypatch.delenv("KVCORE_BACKEND", raising=False)
    assert reg.get_backend().name == "numpy"
    monkeypatch.setenv("KVCORE_BACKEND", "fake")
    assert reg.get_backend().name == "fake"
    assert reg.get_backend("numpy").name == "numpy"
    monkeypatch.setenv("KVCORE_BACKEND", "nonexistent")
    with pytest.raises(UnknownBackendError, match="nonexistent"):
        reg.get_backend()


def test_an_api_version_mismatch_names_both_versions(site):
    site("kvcore-old", "0.0.1", {"old": "old_plugin"},
         {"old_plugin": plugin("old", "old_backend:OldBackend", api=99),
          "old_backend": backend("OldBackend", "old")})
    reg = Registry()
    reason = by_name(reg.list_backends())["old"].reason
    assert "API version 99" in reason and f"provides {kvcore.KVCORE_API_VERSION}" in reason
    with pytest.raises(ApiVersionError, match="99"):
        reg.get_backend("old")


def test_a_backend_class_declaring_another_api_version_is_refused(site):
    site("kvcore-liar", "1.0", {"liar": "liar_plugin"},
         {"liar_plugin": plugin("liar", "liar_backend:LiarBackend"),
          "liar_backend": backend("LiarBackend", "liar", "api_version = 7")})
    with pytest.raises(ApiVersionError, match="version 7"):
        Registry().get_backend("liar")


def test_a_missing_library_is_found_without_importing_and_says_how_to_install(site):
    site("kvcore-needs", "1.0", {"needs": "needs_plugin"},
         {"needs_plugin": plugin("needs", "needs_backend:X", requires=("no_such_lib_kvcore",))})
    record = by_name(Registry().list_backends())["needs"]
    assert not record.available and "'no_such_lib_kvcore' is not installed" in record.reason
    with pytest.raises(BackendUnavailableError, match="no_such_lib_kvcore"):
        Registry().get_backend("needs")


def test_a_failing_probe_is_the_reason_and_never_falls_back(site):
    body = ("@classmethod\n        def probe(cls):\n"
            "            raise BackendUnavailableError('cudaErrorInsufficientDriver: driver too old')")
    site("kvcore-gpu", "1.0", {"gpu": "gpu_plugin"},
         {"gpu_plugin": plugin("gpu", "gpu_backend:GpuBackend"),
          "gpu_backend": backend("GpuBackend", "gpu", body)})
    reg = Registry()
    assert by_name(reg.list_backends())["gpu"].available  # unprobed: installed and loadable
    probed = by_name(reg.list_backends(probe=True))["gpu"]
    assert not probed.available and probed.probed
    assert "cudaErrorInsufficientDriver: driver too old" in probed.reason
    with pytest.raises(BackendUnavailableError, match="cudaErrorInsufficientDriver"):
        reg.get_backend("gpu")


def test_a_backend_module_that_fails_to_import_says_how_to_fix_it(site):
    site("kvcore-torchy", "1.0", {"torchy": "torchy_plugin"},
         {"torchy_plugin": plugin("torchy", "torchy_backend:TorchyBackend"),
          "torchy_backend": "import no_such_module_kvcore_test\n"})
    with pytest.raises(BackendUnavailableError, match="no_such_module_kvcore_test"):
        Registry().get_backend("torchy")


def test_backends_can_be_registered_in_code_without_an_entry_point():
    from kv_numpy._backend import NumpyBackend

    class NotebookBackend(NumpyBackend):
        """A backend defined in a notebook."""
        name = "notebook"

    kvcore.register_backend(NotebookBackend)
    try:
        assert isinstance(kvcore.get_backend("notebook"), NotebookBackend)
        listed = by_name(kvcore.list_backends())["notebook"]
        assert listed.available and listed.distribution == "<registered in code>"
        with pytest.raises(DuplicateBackendError, match="already registered"):
            kvcore.register_backend(NotebookBackend)
        kvcore.register_backend(NotebookBackend, replace_existing=True)
    finally:
        kvcore.unregister_backend("notebook")
    with pytest.raises(UnknownBackendError):
        kvcore.get_backend("notebook")
    with pytest.raises(UnknownBackendError, match="was registered in code"):
        kvcore.unregister_backend("notebook")
    with pytest.raises(TypeError, match="BackendSpec or a Backend subclass"):
        kvcore.register_backend("numpy")  # type: ignore[arg-type]


def test_the_global_registry_lists_the_numpy_backend_with_its_distribution():
    record = by_name(kvcore.list_backends())["numpy"]
    assert record.distribution == "kvcore-numpy" and record.available
    assert kvcore.get_backend("numpy").name == "numpy"


# --- the default rule: $KVCORE_BACKEND, else numpy, else the only one that runs ---------

GPU_PROBE_FAILS = ("@classmethod\n        def probe(cls):\n"
                   "            raise BackendUnavailableError('cudaErrorNoDevice: no CUDA GPU')")


def _fakes(site, *specs: tuple[str, str]) -> None:
    """Install fake backends: ``(name, body)``; an empty body is a working backend."""
    for name, body in specs:
        cls = name.capitalize() + "Backend"
        site(f"kvcore-{name}", "1.0", {name: f"{name}_plugin"},
             {f"{name}_plugin": plugin(name, f"{name}_backend:{cls}"),
              f"{name}_backend": backend(cls, name, body or "pass")})


def _only(reg: Registry, *names: str) -> Registry:
    """Make ``reg`` see only the backends ``names``, as on a machine where only their
    distributions are installed."""
    reg._discover()
    reg._entries = {n: e for n, e in reg._entries.items() if n in names}
    reg._failures = [f for f in reg._failures if f.name in names]
    return reg


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("KVCORE_BACKEND", raising=False)


def test_numpy_is_the_default_whenever_it_is_installed(site, no_env):
    _fakes(site, ("alpha", ""))
    assert _only(Registry(), "numpy", "alpha").get_backend().name == "numpy"


def test_without_numpy_the_only_installed_backend_is_the_default(site, no_env):
    _fakes(site, ("alpha", ""))
    assert _only(Registry(), "alpha").get_backend().name == "alpha"


def test_only_torch_installed_makes_the_manager_use_torch(no_env, monkeypatch):
    pytest.importorskip("torch")
    import kvcore._registry as registry_module
    # What `pip install "kvcore[torch]"` alone gives: kvcore-torch, no kvcore-numpy.
    monkeypatch.setattr(registry_module, "_REGISTRY", _only(Registry(), "torch"))
    assert kvcore.get_backend().name == "torch"
    cfg = kvcore.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, dtype="float32",
                             block_size=4, num_blocks=4)
    assert kvcore.KvCacheManager(cfg).backend.name == "torch"


def test_without_numpy_the_only_backend_that_runs_is_found_by_probing(site, no_env):
    # A GPU backend whose library is installed but that cannot run (no GPU) is skipped.
    _fakes(site, ("alpha", ""), ("gpu", GPU_PROBE_FAILS))
    assert _only(Registry(), "alpha", "gpu").get_backend().name == "alpha"


def test_several_runnable_backends_without_numpy_is_an_error_not_a_guess(site, no_env):
    _fakes(site, ("alpha", ""), ("beta", ""))
    with pytest.raises(UnknownBackendError) as info:
        _only(Registry(), "alpha", "beta").get_backend()
    message = str(info.value)
    assert "several backends can run here: alpha, beta" in message
    assert "KVCORE_BACKEND" in message and "'numpy' is not installed" in message


def test_the_only_backend_failing_its_probe_says_it_was_chosen_by_default(site, no_env):
    _fakes(site, ("gpu", GPU_PROBE_FAILS))
    with pytest.raises(BackendUnavailableError) as info:
        _only(Registry(), "gpu").get_backend()
    message = str(info.value)
    assert "cudaErrorNoDevice: no CUDA GPU" in message
    assert "no backend was named; 'gpu' is the only installed backend" in message


def test_no_backend_installed_lists_none_and_the_extras(no_env):
    with pytest.raises(UnknownBackendError) as info:
        _only(Registry()).get_backend()
    message = str(info.value)
    assert "installed backends: none" in message
    for extra in ("numpy", "torch", "cupy"):
        assert f'pip install "kvcore[{extra}]"' in message


def test_installed_backends_that_cannot_run_are_listed_with_their_reasons(site, no_env):
    _fakes(site, ("gpu", GPU_PROBE_FAILS), ("beta", GPU_PROBE_FAILS))
    site("kvcore-needs", "1.0", {"needs": "needs_plugin"},
         {"needs_plugin": plugin("needs", "needs_backend:X", requires=("no_such_lib_kvcore",))})
    with pytest.raises(BackendUnavailableError) as info:
        _only(Registry(), "gpu", "beta", "needs").get_backend()
    message = str(info.value)
    assert "installed backends: beta, gpu, needs" in message
    assert "'no_such_lib_kvcore' is not installed" in message
    assert message.count("cudaErrorNoDevice") == 2
    assert 'pip install "kvcore[numpy]"' in message


def test_a_broken_numpy_plugin_is_reported_not_silently_replaced(site, no_env):
    _fakes(site, ("alpha", ""))
    site("kvcore-numpy-broken", "0.1", {"numpy": "numpy_broken_plugin"},
         {"numpy_broken_plugin": "raise ImportError('numpy plugin is broken')"})
    reg = Registry()
    reg._discover()
    reg._entries.pop("numpy")  # the real one gone: only the broken one claims the name
    reg._entries = {n: e for n, e in reg._entries.items() if n == "alpha"}
    with pytest.raises(BackendUnavailableError, match="numpy plugin is broken") as info:
        reg.get_backend()
    assert "'numpy' is the default backend" in str(info.value)


def test_an_unknown_name_in_the_environment_says_where_it_came_from(monkeypatch):
    monkeypatch.setenv("KVCORE_BACKEND", "nosuch")
    with pytest.raises(UnknownBackendError) as info:
        Registry().get_backend()
    message = str(info.value)
    assert "no backend named 'nosuch'" in message and "installed backends:" in message
    assert "came from the environment variable KVCORE_BACKEND" in message


def test_an_environment_name_that_cannot_run_never_falls_back_to_numpy(site, monkeypatch):
    _fakes(site, ("gpu", GPU_PROBE_FAILS))
    monkeypatch.setenv("KVCORE_BACKEND", "gpu")
    with pytest.raises(BackendUnavailableError) as info:
        Registry().get_backend()
    assert "cudaErrorNoDevice" in str(info.value)
    assert "environment variable KVCORE_BACKEND" in str(info.value)


def test_a_blank_environment_variable_counts_as_unset(monkeypatch):
    monkeypatch.setenv("KVCORE_BACKEND", "  ")
    assert Registry().get_backend().name == "numpy"


def test_an_explicit_name_never_falls_back_even_when_another_would_run(site, no_env):
    _fakes(site, ("gpu", GPU_PROBE_FAILS))
    with pytest.raises(BackendUnavailableError, match="cudaErrorNoDevice") as info:
        _only(Registry(), "gpu", "numpy").get_backend("gpu")
    assert "environment" not in str(info.value) and "no backend was named" not in str(info.value)
