"""Run the installed ``kvcore`` command as a user would, optionally as on a machine
where only some distributions or libraries are installed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

#: Imported at start-up by every subprocess these tests run (through PYTHONPATH): it can
#: hide installed backends' entry points and make modules unimportable, so one venv can
#: play a machine with only some distributions installed.
SITECUSTOMIZE = '''
import importlib.abc
import importlib.metadata as _md
import os
import sys

_only = os.environ.get("KVCORE_TEST_ONLY_BACKENDS")
if _only is not None:
    _keep = {name for name in _only.split(",") if name}
    _entry_points = _md.entry_points

    def entry_points(**params):
        found = _entry_points(**params)
        if params.get("group") == "kvcore":
            return _md.EntryPoints(ep for ep in found if ep.name in _keep)
        return found

    _md.entry_points = entry_points

_blocked = {name for name in os.environ.get("KVCORE_TEST_BLOCK_MODULES", "").split(",") if name}
if _blocked:
    class _Uninstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in _blocked:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _Uninstalled())
'''


def hiding_site(folder: Path) -> Path:
    """Write :data:`SITECUSTOMIZE` into ``folder``; pass it as ``site=`` to :func:`kvcore`."""
    (folder / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    return folder


def command() -> list[str]:
    """The installed console script when there is one (what users run)."""
    script = Path(sys.executable).with_name("kvcore")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kvcore"]


def kvcore(*args: str, site: Path | None = None, only: str | None = None,
           block: str = "", timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "KVCORE_BACKEND"}
    environ.update(env)
    if site is not None:
        environ["PYTHONPATH"] = os.pathsep.join(
            [str(site)] + [p for p in [environ.get("PYTHONPATH")] if p])
        if only is not None:
            environ["KVCORE_TEST_ONLY_BACKENDS"] = only
        environ["KVCORE_TEST_BLOCK_MODULES"] = block
    return subprocess.run([*command(), *args], capture_output=True, text=True,
                          timeout=timeout, env=environ, stdin=subprocess.DEVNULL)


