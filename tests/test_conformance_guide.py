"""docs/writing-a-backend.md stays true: its worked example, materialised as a plugin
distribution exactly as the guide lays it out, passes the conformance suite (through
``kvcore conformance`` and as a ``ConformanceSuite`` subclass in the author's own
tests), and its clause table lists every clause of the suite."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from kvcore_conformance._clauses import CLAUSES

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "writing-a-backend.md"


def _block(text: str, caption: str) -> str:
    """The fenced code block right after the line ```caption```:"""
    match = re.search(rf"^`{re.escape(caption)}`:\n\n```[a-z]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert match, f"no code block under `{caption}` in {GUIDE.name}"
    return match.group(1)


def _section(text: str, number: int) -> str:
    match = re.search(rf"^## {number}\. .*?(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"no section {number} in {GUIDE.name}"
    return match.group(0)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "HYPOTHESIS"))}
    env.update(extra)
    return env


@pytest.fixture
def guide_project(tmp_path: Path) -> Path:
    """The guide's kv-mybackend, installed the way pip would: its package and a
    dist-info declaring the guide's entry point, in a site directory."""
    text = GUIDE.read_text()
    site = tmp_path / "site"
    package = site / "kv_mybackend"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "_backend.py").write_text(_block(text, "kv_mybackend/_backend.py"))
    (package / "_plugin.py").write_text(_block(text, "kv_mybackend/_plugin.py"))
    project = tomllib.loads(_block(text, "pyproject.toml"))["project"]
    entry_points = project["entry-points"]["kvcore"]
    assert entry_points, "the guide's pyproject.toml declares no kvcore entry point"
    info = site / f"kv_mybackend-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\n"
                                   f"Version: {project['version']}\n")
    (info / "entry_points.txt").write_text(
        "[kvcore]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    tests = tmp_path / "project" / "tests"
    tests.mkdir(parents=True)
    (tests / "test_conformance.py").write_text(_block(text, "tests/test_conformance.py"))
    return tmp_path


@pytest.mark.slow
def test_the_guide_example_passes_the_suite(guide_project: Path) -> None:
    env = _env(PYTHONPATH=str(guide_project / "site"))
    proc = subprocess.run([sys.executable, "-m", "kvcore", "conformance", "mybackend", "--json"],
                          check=False, cwd=guide_project, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (doc,) = json.loads(proc.stdout)["backends"]
    assert doc["passed"] and doc["first_failure"] is None, doc["first_failure"]
    results = {c["id"]: c["result"] for c in doc["clauses"]}
    assert set(results) == set(CLAUSES)
    # What the example declares or provides is tested; only the rest is skipped: pinned
    # memory, the optional gather_blocks, and the codecs (no uint8, no codec declared).
    assert {c for c, r in results.items() if r != "passed"} == {
        "capabilities.pinned-memory", "backend.gather-blocks", "codec.storage",
        "codec.round-trip", "codec.codes-exact"}
    assert "kvcore backend 'mybackend' (kv_mybackend._backend.MyBackend) from kv-mybackend " \
           "0.1.0" in proc.stderr


@pytest.mark.slow
def test_the_guide_example_passes_as_a_subclass_in_its_own_tests(guide_project: Path) -> None:
    env = _env(PYTHONPATH=str(guide_project / "site"))
    report = guide_project / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--kv-hypothesis-profile", "kvcore-quick", "--kv-json",
                           str(report), "tests"],
                          check=False, cwd=guide_project / "project", env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert re.search(r"\d+ passed, \d+ skipped", proc.stdout)
    assert "kvcore conformance: backend 'mybackend', clause by clause" in proc.stdout
    (doc,) = json.loads(report.read_text())["backends"]
    assert doc["backend"] == "mybackend" and doc["passed"]
    # All but pinned memory, gather_blocks and the three codec clauses.
    assert doc["summary"]["passed"] == len(CLAUSES) - 5
    # ConformanceSuite runs the backend's own operations first, the stateful test after
    # the manager's, the areas added later (layer groups, codecs) last.
    collected = subprocess.run([sys.executable, "-m", "pytest", "-q", "--co", "-p",
                                "no:cacheprovider", "tests"], check=True,
                               cwd=guide_project / "project", env=env, capture_output=True,
                               text=True, timeout=600).stdout.splitlines()
    names = [line.split("::")[-1].split("[")[0] for line in collected if "::" in line]
    assert names[0] == "test_backend_declares_identity", names[:3]
    assert names[-1] == "test_codec_reads_decode_the_stored_codes_and_moves_keep_them", \
        names[-3:]
    assert names.index("test_random_operations_without_swap") < names.index(
        "test_sliding_window_holds_its_window_and_gives_old_blocks_back")
    assert names.index("test_scatter_writes_only_the_given_slots") < names.index(
        "test_special_values_survive_scatter_and_gather") < names.index(
        "test_write_read_round_trip_across_layers_and_blocks")


def test_the_guide_lists_every_clause_once() -> None:
    section = _section(GUIDE.read_text(), 6)
    listed = re.findall(r"^\| `([a-z0-9.-]+)` \|", section, re.MULTILINE)
    assert sorted(listed) == sorted(set(listed)), "a clause is listed twice"
    assert set(listed) == set(CLAUSES), (
        f"missing from the guide: {sorted(set(CLAUSES) - set(listed))}; "
        f"not clauses: {sorted(set(listed) - set(CLAUSES))}")
    assert listed == list(CLAUSES), "list the clauses in the suite's order"
