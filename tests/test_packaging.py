"""Every distribution builds (sdist, then the wheel from that sdist), passes ``twine
check --strict``, and its wheel holds what an index page and an installer need: the
license, typed packages, absolute README links, complete metadata, and nothing else
(no tests, no caches).

Distributions are discovered, not listed: every ``pyproject.toml`` at the repository
root, in ``plugins/*`` and in ``conformance/``.  A plugin added later (kv_jax,
kv_redis) is checked without touching this file.
"""

from __future__ import annotations

import email
import email.policy
import importlib.metadata
import posixpath
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HOME = "https://github.com/kvcore/kvcore"
#: Where README links point, so they work on an index page as on GitHub.
BLOB = f"{HOME}/blob/main/"
LICENSE = (ROOT / "LICENSE").read_bytes()
#: Test modules a wheel may ship on purpose: the conformance suite's pytest entry is
#: the product (``pytest --pyargs kvcore_conformance`` collects it), not our tests.
SHIPPED_TESTS = {"kvcore-conformance": ("kvcore_conformance/tests/",
                                         "kvcore_conformance/stores/tests/")}


def _projects() -> list[Path]:
    found = [ROOT / "pyproject.toml", *sorted(ROOT.glob("plugins/*/pyproject.toml")),
             ROOT / "conformance" / "pyproject.toml"]
    return [p.parent for p in found if p.is_file()]


PROJECTS = _projects()


@dataclass
class Built:
    source: Path
    pyproject: dict
    sdist: Path
    wheel: Path

    @property
    def name(self) -> str:
        return self.pyproject["project"]["name"]

    def wheel_names(self) -> list[str]:
        with zipfile.ZipFile(self.wheel) as zf:
            return zf.namelist()

    def read(self, suffix: str) -> bytes:
        with zipfile.ZipFile(self.wheel) as zf:
            [name] = [n for n in zf.namelist() if n.endswith(suffix)]
            return zf.read(name)

    def metadata(self) -> email.message.EmailMessage:
        # METADATA is UTF-8 (core metadata spec); parse the text, not the bytes.
        return email.message_from_string(self.read(".dist-info/METADATA").decode("utf-8"),
                                         policy=email.policy.compat32)


def _no_isolation() -> list[str]:
    # Building against the venv's setuptools (when new enough) keeps this offline and
    # fast; an isolated build would download setuptools for every distribution.
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return []
    return ["--no-isolation"] if major >= 77 else []


@pytest.fixture(scope="module", params=PROJECTS,
                ids=[str(p.relative_to(ROOT)) if p != ROOT else "kvcore" for p in PROJECTS])
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    source: Path = request.param
    work = tmp_path_factory.mktemp("dist")
    src, dist = work / "src", work / "dist"
    # Build from a copy, caches and all (they must not reach the wheel): a build writes
    # build/ and *.egg-info next to the sources, which must not land in the checkout.
    shutil.copytree(source, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", ".pytest_cache", ".hypothesis"))
    # `python -m build` with no --sdist/--wheel builds the sdist, then the wheel from the
    # unpacked sdist: a file missing from the sdist is then missing from the wheel too.
    proc = subprocess.run([sys.executable, "-m", "build", *_no_isolation(), "--outdir",
                           str(dist), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [sdist] = dist.glob("*.tar.gz")
    [wheel] = dist.glob("*.whl")
    pyproject = tomllib.loads((source / "pyproject.toml").read_text())
    return Built(source, pyproject, sdist, wheel)


def test_every_distribution_is_discovered():
    names = {tomllib.loads((p / "pyproject.toml").read_text())["project"]["name"]
             for p in PROJECTS}
    assert {"kvcore", "kvcore-numpy", "kvcore-torch", "kvcore-cupy",
            "kvcore-conformance"} <= names


def test_twine_check_strict_passes(built: Built):
    proc = subprocess.run([sys.executable, "-m", "twine", "check", "--strict",
                           str(built.sdist), str(built.wheel)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("PASSED") == 2, proc.stdout


def test_the_wheel_ships_the_license(built: Built):
    assert (built.source / "LICENSE").read_bytes() == LICENSE, \
        f"{built.source / 'LICENSE'} differs from the repository's LICENSE"
    assert built.read(".dist-info/licenses/LICENSE") == LICENSE
    meta = built.metadata()
    assert meta["License-Expression"] == "Apache-2.0" == built.pyproject["project"]["license"]
    assert meta.get_all("License-File") == ["LICENSE"]


def test_the_sdist_ships_license_readme_and_pyproject(built: Built):
    with tarfile.open(built.sdist) as tf:
        names = {name.split("/", 1)[1] for name in tf.getnames() if "/" in name}
    assert {"LICENSE", "README.md", "pyproject.toml", "PKG-INFO"} <= names


def test_the_metadata_names_author_urls_and_valid_classifiers(built: Built):
    from trove_classifiers import classifiers as known

    meta = built.metadata()
    assert meta["Name"] == built.name and meta["Summary"]
    assert meta["Author"] or meta["Author-email"]
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    assert urls.get("Homepage") == HOME and urls.get("Repository") == HOME, urls
    assert all(u.startswith("https://") for u in urls.values()), urls
    classifiers = meta.get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers
    assert "Programming Language :: Python :: 3" in classifiers
    unknown = sorted(set(classifiers) - set(known))
    assert not unknown, f"not trove classifiers (the index would refuse the upload): {unknown}"
    assert meta["Requires-Python"] and meta["Description-Content-Type"] == "text/markdown"


def test_the_long_description_is_the_readme_with_absolute_links(built: Built):
    readme = (built.source / "README.md").read_text()
    assert built.metadata().get_payload().strip() == readme.strip()
    for target in re.findall(r"\]\(([^)\s]+)", readme):
        if target.startswith("#"):
            continue
        assert target.startswith("https://"), (f"{built.source.name}/README.md links to "
                                               f"{target!r}: relative links break on an index page")
        if target.startswith(BLOB):  # a link into this repository: the file must exist
            path = posixpath.normpath(target[len(BLOB):].split("#")[0])
            assert (ROOT / path).exists(), f"README link {target} names a missing file"


def test_the_wheel_holds_the_packages_and_nothing_else(built: Built):
    names = built.wheel_names()
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pyo"))]
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top and not top & {"tests", "test", "docs", "plugins", "conformance", "build"}, top
    allowed = SHIPPED_TESTS.get(built.name, ())
    stray = [n for n in names if re.search(r"(^|/)(test_[^/]*\.py|conftest\.py)$", n)
             and not n.startswith(allowed)]
    assert not stray, f"test modules in the wheel: {stray}"


def test_every_package_is_typed_and_complete(built: Built):
    names = set(built.wheel_names())
    packages = {n.split("/")[0] for n in names if n.count("/") == 1 and n.endswith("/__init__.py")}
    assert packages
    for package in packages:
        assert f"{package}/py.typed" in names, f"{built.name}: {package} lacks py.typed (PEP 561)"
        sources = {str(p.relative_to(built.source)).replace("\\", "/")
                   for p in (built.source / package).rglob("*.py")
                   if "__pycache__" not in p.parts}
        missing = sorted(sources - names)
        assert not missing, f"{built.name}: source modules missing from the wheel: {missing}"


def test_core_and_numpy_wheels_work_installed_on_their_own(tmp_path_factory):
    """Install the two wheels a `pip install "kvcore[numpy]"` brings into a fresh
    directory and run the demo from there (the checkout's editable copies shadowed)."""
    wheels = []
    for project in (ROOT, ROOT / "plugins" / "kv_numpy"):
        out = tmp_path_factory.mktemp("wheel")
        src = out / "src"
        shutil.copytree(project, src, ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "tests", "plugins",
            "conformance", "docs"))
        subprocess.run([sys.executable, "-m", "build", "--wheel", *_no_isolation(),
                        "--outdir", str(out), str(src)], check=True, capture_output=True,
                       timeout=600)
        wheels += [str(w) for w in out.glob("*.whl")]
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                    "--target", str(site), *wheels], check=True, capture_output=True,
                   timeout=300)
    code = (f"import sys; sys.path.insert(0, {str(site)!r}); import kvcore, kv_numpy\n"
            f"assert kvcore.__file__.startswith({str(site)!r}), kvcore.__file__\n"
            f"assert kv_numpy.__file__.startswith({str(site)!r}), kv_numpy.__file__\n"
            "from kvcore._demo import run_demo; sys.exit(run_demo('numpy'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=site)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "kvcore demo: OK" in proc.stdout
