"""The docs' commands and sample outputs are what kvcore does (the README's Python
examples run in test_readme.py).

The backend-author guide's example backend is built from the guide's own code blocks,
installed, and run through ``kvcore backends`` and ``kvcore conformance`` on a
machine that, like a backend author's, has no other backend installed.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import kvcore
import kvcore.integrations

from ._subprocess import hiding_site, kvcore as run_kvcore

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "writing-a-backend.md"
DOC_FILES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "conformance" / "README.md",
             *sorted(ROOT.glob("plugins/*/README.md"))]
SUBCOMMANDS = ("backends", "demo", "bench", "conformance")


def _fenced_blocks(text: str) -> list[tuple[int, str, str]]:
    """``(offset, language, body)`` of every fenced block, fences paired line by line."""
    blocks, lines, offset, opened = [], text.splitlines(keepends=True), 0, None
    for line in lines:
        if line.startswith("```"):
            if opened is None:
                opened = (offset, line[3:].strip(), [])
            else:
                blocks.append((opened[0], opened[1], "".join(opened[2])))
                opened = None
        elif opened is not None:
            opened[2].append(line)
        offset += len(line)
    return blocks


def _block_after(text: str, marker: str, lang: str | None = None) -> str:
    """The first fenced block (of language ``lang``, if given) after ``marker``."""
    start = text.index(marker)
    for offset, language, body in _fenced_blocks(text):
        if offset > start and (lang is None or language == lang):
            return body
    raise AssertionError(f"no ```{lang or ''} block after {marker!r}")


def _console_output(text: str, prompt: str) -> list[str]:
    """The lines printed after ``prompt`` in the console block that shows it."""
    for _, _, body in _fenced_blocks(text):
        lines = [line.rstrip() for line in body.splitlines()]
        if prompt in lines:
            after = lines[lines.index(prompt) + 1:]
            ends = [i for i, line in enumerate(after) if line.startswith("$ ")]
            return after[:ends[0]] if ends else after
    raise AssertionError(f"no console block shows {prompt!r}")


# --- the guide's example backend, built and installed ------------------------------------

@pytest.fixture(scope="module")
def guide_site(tmp_path_factory) -> Path:
    guide = GUIDE.read_text()
    project = tmp_path_factory.mktemp("kv-mybackend")
    package = project / "kv_mybackend"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "_backend.py").write_text(_block_after(guide, "`kv_mybackend/_backend.py`:",
                                                      "python"))
    (package / "_plugin.py").write_text(_block_after(guide, "`kv_mybackend/_plugin.py`:",
                                                     "python"))
    (project / "pyproject.toml").write_text(_block_after(guide, "`pyproject.toml`:", "toml"))
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                    "--no-build-isolation", "-q", "--target", str(site), str(project)],
                   check=True, capture_output=True, timeout=300)
    return hiding_site(site)


def test_the_guides_kvcore_backends_sample_is_what_kvcore_prints(guide_site):
    documented = _console_output(GUIDE.read_text(), "$ kvcore backends")
    # A backend author's machine: their backend, kvcore and the suite; no kvcore-numpy.
    proc = run_kvcore("backends", site=guide_site, only="mybackend")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == documented


def test_the_guides_conformance_output_is_what_the_suite_prints(guide_site):
    guide = GUIDE.read_text()
    proc = run_kvcore("conformance", "mybackend", site=guide_site, only="mybackend")
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr
    # The report header, line for line.
    for line in _block_after(guide, "The header says what was tested:").splitlines():
        assert line in out.splitlines(), line
    # The documented skip lines are the report's: how many tests, then the reason.
    skips = _block_after(guide, "skipped, naming the capability and your reason")
    printed = [line for line in out.splitlines() if line.startswith("skipped (")]
    for line in skips.splitlines():
        pattern = re.sub(r"\\\(\d+\\ tests\\\)", r"\\(\\d+ tests?\\)", re.escape(line))
        assert any(re.fullmatch(pattern, p) for p in printed), \
            f"documented {line!r} matches none of {printed[:3]} ..."
    # The documented totals are this run's.
    [totals] = re.findall(r"(\d+ passed, \d+ skipped) in [\d.]+s", out)
    documented = set(re.findall(r"(\d+ passed, \d+ skipped) in [\d.]+s", guide))
    assert documented == {totals}


def test_the_readmes_backends_table_matches_for_numpy_and_torch():
    documented = _console_output(README.read_text(), "$ .venv/bin/kvcore backends")
    header, *rows = documented
    proc = run_kvcore("backends")
    assert proc.returncode == 0, proc.stderr
    real_header, *real_rows = proc.stdout.splitlines()
    assert header.split() == real_header.split()
    real = {r.split()[0]: r.split()[:3] for r in real_rows}
    names = {row.split()[0] for row in rows}
    assert {"numpy", "torch"} <= names
    for row in rows:
        name = row.split()[0]
        if name in ("numpy", "torch") and name in real:  # cupy's row depends on the GPU
            assert row.split()[:3] == real[name], row


# --- the API version the examples declare ---------------------------------------------

def test_documented_api_versions_are_literals_equal_to_the_current_one():
    for path in (README, GUIDE):
        text = path.read_text()
        literals = re.findall(r"api_version=(\d+)", text)
        assert literals, f"{path.name} has no api_version=N example"
        assert {int(n) for n in literals} == {kvcore.KVCORE_API_VERSION}, path
    for path in DOC_FILES:
        assert "api_version=kvcore.KVCORE_API_VERSION" not in path.read_text(), path
    header = _block_after(GUIDE.read_text(), "The header says what was tested:")
    version = kvcore.KVCORE_API_VERSION
    assert f"API version {version} (kvcore {kvcore.__version__} provides {version})" in header


# --- every kvcore command the docs show parses ------------------------------------------

def _documented_commands() -> list[tuple[str, str, bool]]:
    """``(file, command line, must_be_a_command)`` for every ``kvcore ...`` in the docs."""
    found = []
    for path in DOC_FILES:
        text = path.read_text()
        for _, lang, block in _fenced_blocks(text):
            if lang not in ("", "console", "bash", "sh"):
                continue
            for line in block.splitlines():
                match = re.match(r"^(\$ )?(?:\.venv/bin/)?kvcore (.*)$", line)
                if match:
                    found.append((path.name, match.group(2), bool(match.group(1))))
        # Inline `kvcore bench` names a command; with arguments it shows one.
        found += [(path.name, m, False) for m in re.findall(r"`kvcore ([^`]*)`", text)
                  if m.strip() not in SUBCOMMANDS]
    return found


def _argv(command: str) -> list[str]:
    command = command.split(" | ")[0].split("#")[0]
    return [t for t in shlex.split(command.replace("[", " ").replace("]", " ")) if t != "..."]


def test_the_docs_show_kvcore_commands():
    commands = {c for _, c, _ in _documented_commands()}
    assert "conformance numpy torch" in {c.split("#")[0].strip() for c in commands}
    assert len(commands) > 15


@pytest.mark.parametrize("where, command, prompted", _documented_commands(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_every_documented_kvcore_command_parses(where, command, prompted):
    from kvcore._cli import _parser
    from kvcore.bench._cli import _parser as bench_parser

    argv = _argv(command)
    if not argv or (argv[0] not in SUBCOMMANDS and not argv[0].startswith("-")):
        assert not prompted, f"{where}: `$ kvcore {command}` is not a kvcore command"
        return  # prose such as "kvcore backend 'x' ..." in a sample output
    try:
        if argv[0] == "bench":
            bench_parser().parse_args(argv[1:])
        else:
            args, rest = _parser().parse_known_args(argv)
            assert not rest or args.command == "conformance", \
                f"{where}: `kvcore {command}`: unknown {rest}"
    except SystemExit as exc:
        assert exc.code == 0, f"{where}: `kvcore {command}` does not parse"


# --- module docstrings that describe behaviour -------------------------------------------

def test_the_transformers_docstring_does_not_call_crop_unsupported():
    pytest.importorskip("transformers")
    from kvcore.integrations import transformers as integration

    doc = integration.__doc__
    unsupported = doc[doc.index("Not supported"):]
    assert "crop" not in unsupported and "assisted" not in unsupported
    assert "crop(-n)" in doc and "truncate" in doc
    assert kvcore.integrations  # the package itself imports without torch
