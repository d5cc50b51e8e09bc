"""The kvcore command: backends, demo, exit statuses and where messages go."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvcore._cli import main


def test_backends_prints_a_table_with_numpy_available(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    header, *rows = out.splitlines()
    assert header.split()[:4] == ["name", "available", "distribution", "version"]
    numpy_row = next(r for r in rows if r.startswith("numpy "))
    assert numpy_row.split()[1:3] == ["yes", "kvcore-numpy"]


def test_backends_json_is_machine_readable(capsys):
    assert main(["backends", "--json", "--no-probe"]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert records["numpy"]["available"] is True
    assert records["numpy"]["probed"] is False


def test_demo_checks_its_reads_and_exits_zero(capsys):
    assert main(["demo", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "all match" in out and out.rstrip().endswith("kvcore demo: OK")
    assert "48 served from the prefix cache" in out


def test_an_unknown_backend_is_an_error_on_stderr_with_status_1(capsys):
    assert main(["demo", "--backend", "nope"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "kvcore: error: no backend named 'nope'" in captured.err


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["backends", "--bogus"])
    assert info.value.code == 2


def test_python_dash_m_kvcore_is_the_same_command():
    out = subprocess.run([sys.executable, "-m", "kvcore", "backends", "--no-probe"],
                         capture_output=True, text=True, check=True)
    assert "kvcore-numpy" in out.stdout
