"""The kvcore command: backends, demo, exit statuses and where messages go.

Most tests run the installed command in a subprocess, as a user would, and check its
stdout, stderr and exit status."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from kvcore import __version__
from kvcore._cli import main
from kvcore.bench._report import QUICK_NOTE

from ._subprocess import command, hiding_site, kvcore


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


# --- the command as users run it: a subprocess, checking stdout, stderr and status ------

HAVE_TORCH = importlib.util.find_spec("torch") is not None
HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

def _clean(stderr: str) -> None:
    for trace in ("Traceback", "BrokenPipeError", "Exception ignored"):
        assert trace not in stderr, stderr


def test_version_prints_the_version_on_stdout():
    proc = kvcore("--version")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"kvcore {__version__}\n", "")


@pytest.mark.parametrize("args", [("demo",), ("backends", "--no-probe"),
                                  ("bench", "--quick", "-q", "-w", "fork", "-b", "numpy")])
def test_a_closed_stdout_ends_quietly_with_status_1(args):
    # The reader is gone before the first byte is written: every write fails.
    proc = subprocess.Popen([*command(), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == 1, stderr
    _clean(stderr)


def test_demo_piped_into_head_prints_its_lines_and_no_traceback():
    script = " ".join(f"'{part}'" for part in command())
    proc = subprocess.run(["bash", "-c", f"{script} demo | head -2"], capture_output=True,
                          text=True, timeout=300)
    assert len(proc.stdout.splitlines()) == 2 and proc.stdout.startswith("backend numpy")
    _clean(proc.stderr)


def test_conformance_on_an_unknown_backend_reports_only_on_stderr():
    proc = kvcore("conformance", "nosuch")
    assert proc.returncode == 4 and proc.stdout == ""
    assert "cannot test backend 'nosuch'" in proc.stderr
    assert "nosuch: FAILED (exit status 4)" in proc.stderr


def test_backends_with_none_installed_fails_alike_in_table_and_json(tmp_path):
    table = kvcore("backends", site=hiding_site(tmp_path), only="")
    assert table.returncode == 1 and table.stdout == ""
    assert 'no kvcore backends installed; try: pip install "kvcore[numpy]"' in table.stderr
    as_json = kvcore("backends", "--json", site=hiding_site(tmp_path), only="")
    assert as_json.returncode == 1 and as_json.stderr == table.stderr
    assert json.loads(as_json.stdout) == []  # still one JSON document on stdout


def test_no_probe_says_not_probed_instead_of_yes():
    proc = kvcore("backends", "--no-probe")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert rows["numpy"].split()[1:4] == ["not", "probed", "kvcore-numpy"]
    assert " yes " not in proc.stdout
    records = {r["name"]: r for r in json.loads(kvcore("backends", "--json", "--no-probe").stdout)}
    assert records["numpy"]["availability"] == "not probed"
    assert records["numpy"]["available"] is True and records["numpy"]["probed"] is False
    probed = {r["name"]: r for r in json.loads(kvcore("backends", "--json").stdout)}
    assert probed["numpy"]["availability"] == "yes" and probed["numpy"]["probed"] is True
    assert all(r["availability"] == ("yes" if r["available"] else "no") for r in probed.values())


def test_help_texts_say_what_passes_through_and_what_the_statuses_mean():
    conformance = kvcore("conformance", "--help")
    assert conformance.returncode == 0
    text = " ".join(conformance.stdout.split())
    assert "passed on to pytest" in text and "kvcore conformance mybackend -x -k gather" in text
    for status in ("0 every named backend passed", "1 tests failed",
                   "4 a backend is unknown or unavailable", "5 no test ran"):
        assert status in text, status
    bench = " ".join(kvcore("bench", "--help").stdout.split())
    assert "the issue's" not in bench and "exit status" in bench
    assert "--layers N model layers (append, read, fork) (default 8, quick 2)" in bench
    demo = " ".join(kvcore("demo", "--help").stdout.split())
    assert "greedy and beam-search generate()" in demo
    assert 'pip install "kvcore[transformers]"' in demo
    assert "else the only installed backend that can run here" in demo


@pytest.mark.parametrize("plot, problem", [
    ("/nonexistent/dir/x.png", "the directory /nonexistent/dir does not exist"),
    ("bench.nosuchformat", "the file name must end in one of"),
    (".", "is a directory"),
])
def test_a_bad_plot_path_is_refused_before_anything_is_measured(plot, problem):
    pytest.importorskip("matplotlib")
    proc = kvcore("bench", "--quick", "-w", "fork", "-b", "numpy", "--plot", plot)
    assert proc.returncode == 2 and proc.stdout == ""
    assert problem in proc.stderr
    assert "fork:" not in proc.stderr  # no workload ran


def test_a_plot_that_fails_to_write_keeps_the_results_already_printed(capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    from kvcore.bench import _cli as bench_cli

    def disk_full(results, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bench_cli, "write_plot", disk_full)
    assert bench_cli.main(["--quick", "--json", "-q", "-w", "fork", "-b", "numpy",
                           "--plot", "bench.png"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["results"][0]["workload"] == "fork"  # written before the plot
    assert "the results above are complete" in err and "No space left on device" in err


def test_bench_says_something_first_and_shows_no_private_module_paths():
    workloads = "fork,generate" if HAVE_TORCH and HAVE_TRANSFORMERS else "fork"
    backend = "torch" if HAVE_TORCH and HAVE_TRANSFORMERS else "numpy"
    proc = kvcore("bench", "--quick", "--json", "-w", workloads, "-b", backend)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert "kvcore bench: finding backends" in lines[0]  # before any library is probed
    assert not [line for line in lines if "._" in line], lines  # kvcore.x._private paths
    if "generate" in workloads:
        assert any("generate: round 1/" in line for line in lines), lines
        assert json.loads(proc.stdout)["results"][-1]["workload"] == "generate"


def test_quick_runs_pass_no_verdict_on_targets():
    proc = kvcore("bench", "--quick", "-q", "-w", "fork", "-b", "numpy")
    assert proc.returncode == 0, proc.stderr
    assert QUICK_NOTE in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if "blocks_copied_per_child" in line)
    assert row.split()[-1] == "-" and "yes" not in row
    doc = json.loads(kvcore("bench", "--quick", "--json", "-q", "-w", "fork", "-b", "numpy").stdout)
    assert doc["targets_judged"] is False and doc["targets_note"] == QUICK_NOTE
    assert doc["all_targets_met"] is None and all(t["met"] is None for t in doc["targets"])
    refused = kvcore("bench", "--quick", "--check", "-w", "fork", "-b", "numpy")
    assert refused.returncode == 2 and "quick sizes cannot judge targets" in refused.stderr


def test_generate_demo_without_torch_names_the_extra_to_install(tmp_path):
    proc = kvcore("demo", "--generate", site=hiding_site(tmp_path), block="torch,transformers")
    assert proc.returncode == 2 and proc.stdout == ""
    assert 'pip install "kvcore[transformers]"' in proc.stderr
    assert "No module named 'torch'" in proc.stderr
    _clean(proc.stderr)


def test_bench_without_transformers_skips_generate_with_the_install_command(monkeypatch):
    import importlib.util

    from kvcore.bench._generate import find_generation_bench

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    fn, why = find_generation_bench()
    assert fn is None
    assert why == 'needs transformers, not installed here: pip install "kvcore[transformers]"'


@pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed")
def test_with_only_torch_installed_the_demo_uses_torch(tmp_path):
    proc = kvcore("demo", site=hiding_site(tmp_path), only="torch")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("backend torch:") and "kvcore demo: OK" in proc.stdout


def test_an_unknown_backend_from_the_environment_says_so():
    proc = kvcore("demo", KVCORE_BACKEND="nosuch")
    assert proc.returncode == 1 and proc.stdout == ""
    assert "no backend named 'nosuch'" in proc.stderr
    assert "came from the environment variable KVCORE_BACKEND" in proc.stderr
