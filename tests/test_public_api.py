"""The public surface: ``__all__`` is complete and honest, imports stay light."""

from __future__ import annotations

import __future__
import inspect
import subprocess
import sys

import kvcore
import kvcore.errors


def test_all_lists_exactly_the_public_names():
    public = {name for name, obj in vars(kvcore).items()
              if not name.startswith("_") and not isinstance(obj, __future__._Feature)}
    # Submodules imported as a side effect are not API, except ``errors``.
    modules = {name for name in public if inspect.ismodule(getattr(kvcore, name))}
    assert set(kvcore.__all__) == (public - modules) | {"errors"} | {"__version__"}
    assert sorted(kvcore.__all__, key=str.lower) == sorted(set(kvcore.__all__), key=str.lower)


def test_every_name_in_all_resolves():
    for name in kvcore.__all__:
        assert getattr(kvcore, name) is not None, name


def test_errors_all_derive_from_the_base_and_are_listed():
    classes = {name for name, obj in vars(kvcore.errors).items()
               if inspect.isclass(obj) and issubclass(obj, Exception)
               and obj.__module__ == "kvcore.errors"}
    assert classes == set(kvcore.errors.__all__)
    for name in classes:
        assert issubclass(getattr(kvcore.errors, name), kvcore.errors.KvCoreError)


def test_errors_also_subclass_the_matching_builtin():
    e = kvcore.errors
    assert issubclass(e.LayerIndexError, IndexError)
    assert issubclass(e.UnknownRequestError, KeyError)
    assert issubclass(e.DtypeMismatchError, TypeError)
    assert issubclass(e.OutOfBlocksError, MemoryError)
    assert str(e.UnknownRequestError("no live cache has 'x'")) == "no live cache has 'x'"


def test_import_and_listing_import_no_heavy_library():
    code = (
        "import sys, kvcore\n"
        "kvcore.list_backends()\n"
        "heavy = sorted(m for m in ('torch', 'cupy', 'transformers', 'matplotlib', "
        "'kvcore.bench', 'kvcore.integrations', 'hypothesis', 'pytest') if m in sys.modules)\n"
        "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_version_is_a_string():
    assert isinstance(kvcore.__version__, str) and kvcore.__version__.count(".") == 2
