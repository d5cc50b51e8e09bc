"""The pytest plugin of kvcore-conformance (entry point ``pytest11``: ``kvcore_conformance``).

Inert unless ``--kv-backend`` is given: it adds two options and a few fixtures whose
names start with ``kvcore_``, and imports nothing but pytest at load time.  Without
the option it changes no collection, prints no header and imports no array library;
everything it needs is imported inside the hooks and fixtures that use it.

Options:

``--kv-backend NAME``  (repeatable, or comma-separated)
    Run the suite against the installed backend(s) called NAME.  Each test is
    parametrized by backend name; an unknown or unavailable name is a usage error.
``--kv-hypothesis-profile {kvcore-ci,kvcore-quick,kvcore-thorough}``
    How hard the property-based tests try (default ``kvcore-ci``: reproducible,
    database-less, a few seconds; ``kvcore-quick`` a third of that; ``kvcore-thorough``
    random seeds, ten times the examples, failing runs shrunk to a minimal one).
``--kv-json PATH``
    Also write the clause-by-clause results as JSON to PATH (for CI); with it, a run of
    the contract classes subclassed in a project's own tests gets the table too.

With ``--kv-backend`` (or ``--kv-json``) the run ends with a table, per backend, of
every contract clause: passed, FAILED, incomplete (its test stopped on another clause), skipped
(with the reason) or not run, and the first broken clause.

Fixtures (override any of them in your ``conftest.py`` or test class):

``kvcore_backend_name``, ``kvcore_backend``, ``kvcore_capabilities``,
``kvcore_dtype`` / ``kvcore_device`` / ``kvcore_swap_device`` (parametrized over every
kvcore float dtype / device type; the undeclared ones skip with the capability named),
``kvcore_codec`` (each quantized codec; the ones not served skip with the reason),
``kvcore_default_dtype``, ``kvcore_default_device``, ``kvcore_harness``,
``kvcore_default_harness``, ``kvcore_hypothesis_settings``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from kvcore import Backend, BackendCapabilities, Device, DType

    from .suite._harness import Harness

__all__ = ["pytest_addoption", "pytest_configure", "pytest_generate_tests",
           "pytest_report_header"]

_DTYPES = ("float16", "bfloat16", "float32")  # kvcore.DType, spelled without importing it
_CODECS = ("float8_e4m3", "float8_e5m2", "int8")
_DEVICE_TYPES = ("cpu", "cuda")
PROFILES = ("kvcore-ci", "kvcore-quick", "kvcore-thorough")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvcore-conformance", "kvcore backend conformance suite")
    group.addoption("--kv-backend", action="append", default=[], metavar="NAME",
                    dest="kvcore_backends",
                    help="run the kvcore conformance suite against the installed backend "
                         "NAME (repeat, or separate names by commas, for several); use with "
                         "`--pyargs kvcore_conformance`")
    group.addoption("--kv-hypothesis-profile", default=PROFILES[0], choices=PROFILES,
                    dest="kvcore_hypothesis_profile",
                    help="hypothesis effort of the property-based conformance tests "
                         "(default: %(default)s)")
    group.addoption("--kv-json", default=None, metavar="PATH", dest="kvcore_json",
                    help="write the conformance results, clause by clause, as JSON to PATH")


def selected_backends(config: pytest.Config) -> list[str]:
    """The backend names given with ``--kv-backend``, split on commas, deduplicated."""
    names: list[str] = []
    for value in config.getoption("kvcore_backends", default=None) or []:
        for name in value.split(","):
            name = name.strip()
            if name and name not in names:
                names.append(name)
    return names


def pytest_configure(config: pytest.Config) -> None:
    names = selected_backends(config)
    json_path = config.getoption("kvcore_json", default=None)
    if not names and not json_path:
        return
    from ._backends import BackendProblem, resolve
    for name in names:
        try:
            resolve(name)
        except BackendProblem as exc:
            raise pytest.UsageError(str(exc)) from None
    from ._report import ClauseReport
    # Without --kv-backend (a suite subclassed in the author's own tests, asked for
    # --kv-json) the backend is named after the kvcore_backend fixture's, once seen.
    config.pluginmanager.register(ClauseReport(names, json_path), "kvcore-conformance-report")


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    names = selected_backends(config)
    if not names:
        return None
    from ._backends import describe
    return [line for name in names for line in describe(name)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kvcore_backend_name" not in metafunc.fixturenames:
        return
    names = selected_backends(metafunc.config)
    if names:
        metafunc.parametrize("kvcore_backend_name", names, ids=names)


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def kvcore_backend_name() -> str:
    """The backend under test, by name (parametrized from ``--kv-backend``)."""
    pytest.fail("no kvcore backend selected: run pytest with --kv-backend NAME, or override "
                "the `kvcore_backend` fixture to return your Backend instance", pytrace=False)


@pytest.fixture
def kvcore_backend(kvcore_backend_name: str) -> Backend:
    """The :class:`kvcore.Backend` instance under test."""
    from ._backends import BackendProblem, resolve
    try:
        return resolve(kvcore_backend_name)
    except BackendProblem as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def kvcore_capabilities(kvcore_backend: Backend) -> BackendCapabilities:
    """What the backend declares; the suite tests exactly these promises."""
    return kvcore_backend.capabilities()


@pytest.fixture(params=_DTYPES)
def kvcore_dtype(request: pytest.FixtureRequest, kvcore_backend: Backend) -> DType:
    """Each kvcore dtype in turn; the ones the backend does not declare are skipped."""
    from kvcore import DType

    from ._backends import require_dtype
    dtype = DType(request.param)
    require_dtype(kvcore_backend, dtype)
    return dtype


@pytest.fixture(params=_CODECS)
def kvcore_codec(request: pytest.FixtureRequest, kvcore_backend: Backend) -> DType:
    """Each quantized codec in turn; the ones the backend does not serve are skipped."""
    from kvcore import DType

    from ._backends import require_codec
    codec = DType(request.param)
    require_codec(kvcore_backend, codec)
    return codec


@pytest.fixture(params=_DEVICE_TYPES)
def kvcore_device(request: pytest.FixtureRequest, kvcore_backend: Backend) -> Device:
    """Each device type in turn (index 0); undeclared ones are skipped."""
    from kvcore import Device

    from ._backends import require_device_type
    require_device_type(kvcore_backend, request.param)
    return Device.parse(request.param)


@pytest.fixture(params=_DEVICE_TYPES)
def kvcore_swap_device(request: pytest.FixtureRequest, kvcore_backend: Backend) -> Device:
    """Each swap device type in turn; undeclared ones are skipped."""
    from kvcore import Device

    from ._backends import require_device_type
    require_device_type(kvcore_backend, request.param, swap=True)
    return Device.parse(request.param)


@pytest.fixture
def kvcore_default_dtype(kvcore_backend: Backend) -> DType:
    """The dtype API and error tests use: float16 if declared, else the first declared."""
    from kvcore import DType
    dtypes = kvcore_backend.capabilities().dtypes
    if not dtypes:
        pytest.fail(f"backend {kvcore_backend.name!r} declares no dtype at all", pytrace=False)
    return DType.float16 if DType.float16 in dtypes else dtypes[0]


@pytest.fixture
def kvcore_default_device(kvcore_backend: Backend) -> Device:
    """The backend's default device (API and error tests run there)."""
    return kvcore_backend.default_device()


@pytest.fixture
def kvcore_harness(kvcore_backend: Backend, kvcore_dtype: DType,
                   kvcore_device: Device) -> Harness:
    """Managers and data for one (dtype, device) combination the backend declares."""
    from .suite._harness import Harness
    return Harness(kvcore_backend, kvcore_dtype, kvcore_device)


@pytest.fixture
def kvcore_default_harness(kvcore_backend: Backend, kvcore_default_dtype: DType,
                           kvcore_default_device: Device) -> Harness:
    """Managers and data on the default dtype and device."""
    from .suite._harness import Harness
    return Harness(kvcore_backend, kvcore_default_dtype, kvcore_default_device)


@pytest.fixture
def kvcore_hypothesis_settings(request: pytest.FixtureRequest) -> Any:
    """The ``hypothesis.settings`` of the profile chosen with ``--kv-hypothesis-profile``."""
    from .suite._hypothesis import profile
    return profile(request.config.getoption("kvcore_hypothesis_profile", default=PROFILES[0]))
