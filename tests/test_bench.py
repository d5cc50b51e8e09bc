"""``kvcore bench``: every workload runs in --quick mode on numpy and torch and reports
sane figures with their baselines.  No wall-clock thresholds: CI machines are noisy."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from kvcore.bench import main

BACKENDS = ["numpy"] + (["torch"] if importlib.util.find_spec("torch") else [])


def _bench(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["--quick", "--json", *args]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)  # stdout holds the JSON document and nothing else
    assert doc["kvcore_bench"] == 1
    assert doc["machine"]["cpus"] >= 1
    return doc


def _figures(doc: dict, workload: str, backend: str) -> dict:
    [result] = [r for r in doc["results"] if r["workload"] == workload and r["backend"] == backend]
    return result["figures"]


def _positive(fig: dict) -> None:
    assert fig["value"] is not None and math.isfinite(fig["value"]) and fig["value"] > 0
    assert fig["baseline"] is not None and fig["baseline"] > 0, fig
    assert fig["baseline_label"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_append_and_read_report_rates_against_dense_baselines(capsys, backend):
    doc = _bench(capsys, "--workload", "append,read", "--backend", backend)
    append = _figures(doc, "append", backend)
    for name in ("decode_step_s", "decode_tokens_per_s", "decode_write_GBps", "prefill_write_GBps"):
        _positive(append[name])
    step = append["decode_step_s"]
    assert step["ratio"] == pytest.approx(step["value"] / step["baseline"])
    assert step["target"] and step["met"] is None  # --quick passes no verdict
    assert doc["targets_judged"] is False and doc["all_targets_met"] is None
    read = _figures(doc, "read", backend)
    _positive(read["read_GBps"])
    assert "copy" in read["read_GBps"]["baseline_label"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_blocks_reports_costs_and_hit_rates(capsys, backend):
    doc = _bench(capsys, "-w", "blocks", "-b", backend)
    figs = _figures(doc, "blocks", backend)
    for name in ("alloc_free_us_per_block", "append_us_per_token", "prefix_hit_us_per_block",
                 "caching_on_0pct_hit_s", "ops_per_s"):
        _positive(figs[name])
    assert figs["shared_prefix_hit_rate"]["value"] > 0  # half the prompts share a prefix
    assert figs["shared_prefix_hit_rate"]["baseline"] == 0  # unique prompts never hit
    details = [r for r in doc["results"] if r["workload"] == "blocks"][0]["details"]
    assert details["variants"]["on"]["hit_rate"]["max"] == 0
    assert details["prefix_hit_blocks_served"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_fork_copies_exactly_one_block_per_child(capsys, backend):
    doc = _bench(capsys, "-w", "fork", "-b", backend)
    figs = _figures(doc, "fork", backend)
    assert figs["blocks_copied_per_child"]["value"] == 1
    assert figs["blocks_copied_per_child"]["met"] is None  # --quick passes no verdict
    assert figs["bytes_copied_per_child"]["value"] < figs["bytes_copied_per_child"]["baseline"]
    _positive(figs["fork_and_write_s_per_child"])


def test_table_output_lists_figures_baselines_and_skips(capsys):
    assert main(["--quick", "-q", "-w", "fork", "-b", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "blocks_copied_per_child" in out and "baselines (measured in the same process)" in out


def test_progress_goes_to_stderr_only(capsys):
    assert main(["--quick", "--json", "-w", "fork", "-b", "numpy"]) == 0
    out, err = capsys.readouterr()
    json.loads(out)
    assert "fork" in err


def test_plot_is_written(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    assert main(["--quick", "-q", "-w", "fork", "-b", "numpy", "--plot", str(path)]) == 0
    assert path.stat().st_size > 1000


def test_bad_arguments_are_refused_with_a_message(capsys):
    assert main(["--quick", "-w", "nope"]) == 1
    assert "unknown workload" in capsys.readouterr().err
    assert main(["--quick", "-b", "no-such-backend"]) == 1
    assert "no-such-backend" in capsys.readouterr().err


def test_import_kvcore_does_not_load_the_bench_or_matplotlib():
    code = ("import sys, kvcore; bad = [m for m in sys.modules "
            "if m.startswith(('kvcore.bench', 'matplotlib'))]; print(bad); sys.exit(bool(bad))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_cli_forwards_to_the_bench(capsys):
    from kvcore._cli import main as cli_main
    assert cli_main(["bench", "--quick", "--json", "-q", "-w", "fork", "-b", "numpy"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["workload"] == "fork"


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_reports_tokens_per_second_against_dynamic_cache(capsys, backend):
    from kvcore.bench._generate import find_generation_bench
    if find_generation_bench()[0] is None or importlib.util.find_spec("transformers") is None:
        pytest.skip("the transformers integration (kvcore.integrations) is not installed")
    doc = _bench(capsys, "-w", "generate", "-b", backend)
    assert not doc["skipped"], doc["skipped"]
    fig = _figures(doc, "generate", backend)["generate_tokens_per_s"]
    _positive(fig)
    assert "DynamicCache" in fig["baseline_label"]


def test_workloads_reach_verdicts_that_only_quick_runs_withhold():
    # The verdicts are computed by the workloads; --quick only hides them.
    from kvcore import get_backend
    from kvcore.bench import QUICK
    from kvcore.bench._append import run_append_read
    from kvcore.bench._fork import run_fork
    from kvcore.bench._timing import Progress

    quiet = Progress(enabled=False)
    fork = {f.name: f for f in run_fork(get_backend("numpy"), QUICK, quiet).figures}
    assert fork["blocks_copied_per_child"].met is True
    [append] = run_append_read(get_backend("numpy"), QUICK, want_append=True,
                               want_read=False, progress=quiet)
    step = {f.name: f for f in append.figures}["decode_step_s"]
    assert isinstance(step.met, bool) and step.met == (step.ratio <= 1.3)  # numpy's target


def _doc(*targets: tuple[str, str, str, bool]) -> dict:
    return {"kvcore_bench": 1, "targets_judged": True,
            "targets": [{"backend": b, "workload": w, "figure": f, "target": "<= 1x",
                         "met": met, "value": 1.0} for b, w, f, met in targets]}


def test_check_fails_only_on_a_target_met_before_and_missed_now():
    from kvcore.bench._targets import judge, met_in
    before = met_in(_doc(("numpy", "read", "a", True), ("numpy", "read", "b", False)))
    verdict = judge(_doc(("numpy", "read", "a", False), ("numpy", "read", "b", False),
                         ("torch", "read", "a", True)), before)
    assert [t["figure"] for t in verdict.regressed] == ["a"]
    assert [t["figure"] for t in verdict.known_misses] == ["b"]
    assert [t["backend"] for t in verdict.met] == ["torch"]
    lines = verdict.lines()
    assert lines[0].startswith("kvcore bench --check: REGRESSION numpy/read/a")
    assert lines[-1].endswith("1 met, 1 regressed, 1 known misses")
    assert not judge(_doc(("numpy", "read", "a", True)), before).regressed


def test_the_recorded_met_targets_name_figures_the_bench_reports():
    """A renamed figure must not silently drop out of what --check guards."""
    from kvcore.bench._targets import RECORDED_MET
    doc = _bench_doc_all_workloads()
    reported = {(t["backend"], t["workload"], t["figure"]) for t in doc["targets"]}
    for backend, workload, figure in RECORDED_MET:
        if any(t[0] == backend for t in reported):
            assert (backend, workload, figure) in reported, (backend, workload, figure)


def _bench_doc_all_workloads() -> dict:
    from kvcore.bench._report import document
    from kvcore.bench._cli import _measure
    from kvcore.bench import QUICK
    from kvcore.bench._timing import Progress
    from kvcore import get_backend
    results = _measure([get_backend(b) for b in BACKENDS], ["append", "read", "blocks", "fork"],
                       QUICK, Progress(enabled=False), [], True, None)
    return document(results, [], QUICK.to_dict(), [], 0.0)


def test_check_refuses_a_baseline_that_is_not_a_full_run(tmp_path, capsys):
    bad = tmp_path / "quick.json"
    bad.write_text(json.dumps({"kvcore_bench": 1, "targets_judged": False, "targets": []}))
    assert main(["--check", "--baseline", str(bad), "-w", "fork"]) == 2
    assert "not the --json output of a full" in capsys.readouterr().err
    assert main(["--check", "--baseline", str(tmp_path / "missing.json")]) == 2
    assert "not a readable kvcore bench --json document" in capsys.readouterr().err
    assert main(["--baseline", str(bad)]) == 2
    assert "--baseline is for --check" in capsys.readouterr().err


@pytest.mark.parametrize("met, status", [(True, 0), (False, 3)])
def test_check_exits_3_on_a_regression_of_a_recorded_target(monkeypatch, capsys, met, status):
    from kvcore.bench import _cli
    from kvcore.bench._result import Figure, WorkloadResult

    def measured(backends, *args, **kw):
        r = WorkloadResult("fork", "numpy")
        r.add(Figure("blocks_copied_per_child", 1.0 if met else 2.0, "blocks", 1.0, "one",
                     None, None, "== 1 block", met))
        return [r]

    monkeypatch.setattr(_cli, "_measure", measured)
    assert main(["--check", "-q", "-w", "fork", "-b", "numpy"]) == status
    err = capsys.readouterr().err
    assert ("REGRESSION numpy/fork/blocks_copied_per_child" in err) == (not met)
