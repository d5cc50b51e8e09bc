"""scripts/gpu_check.py (``make gpu-check``) and scripts/gpu_bench.py, as far as a
machine without a GPU can see them: argument handling, the planned commands, a loud
failure without a GPU (no nvidia-smi; a CPU torch behind a fake nvidia-smi), and the
summary's formatting."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_bench  # noqa: E402
import gpu_check  # noqa: E402


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=300, check=False, env=env, cwd=ROOT)


def test_help_and_bad_arguments():
    assert run("--help").returncode == 0
    bad = run("--no-such-option")
    assert bad.returncode == 2 and "unrecognized arguments" in bad.stderr
    zero = run("--step-timeout", "0")
    assert zero.returncode == 2 and "--step-timeout must be at least 1 second" in zero.stderr
    assert run("--cupy-extra", "cuda11").returncode == 2


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    out = run("--dry-run", "--venv", str(tmp_path / "v"))
    assert out.returncode == 0
    text = out.stdout
    assert "install --isolated torch==2.13.0" in text
    assert f"{tmp_path / 'v'}/bin/python -m venv" not in text  # venv made by the caller's python
    assert "plugins/kv_cupy[cuda12]" in text and "[transformers]" in text
    assert "KVCORE_REQUIRE_GPU=1" in text and "-m gpu" in text
    assert "test_gpu_conformance.py" in text and "gpu_bench.py" in text
    assert not (tmp_path / "v").exists()
    skipped = run("--dry-run", "--skip-setup", "--no-bench").stdout
    assert "setup:" not in skipped and "bench:" not in skipped


def test_without_a_gpu_it_fails_loudly_at_the_first_step(monkeypatch):
    env = dict(os.environ, PATH="/nonexistent-bin")
    out = run("--python", sys.executable, env=env)
    assert out.returncode == 1
    assert "no NVIDIA GPU here: nvidia-smi is not installed" in out.stderr
    assert "FAIL: driver failed; not run: gpu, gpu tests, conformance, bench" in out.stdout


def test_a_cpu_torch_behind_a_gpu_driver_fails_at_the_gpu_step(tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA Fake GPU, 999.99'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    # CUDA_VISIBLE_DEVICES hides any real GPU, so this holds on a GPU machine too.
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}",
               CUDA_VISIBLE_DEVICES="")
    out = run("--python", sys.executable, "--no-bench", env=env)
    assert out.returncode == 1
    assert "driver       PASS" in out.stdout and "NVIDIA Fake GPU, 999.99" in out.stdout
    assert "no usable GPU for kvcore: torch" in out.stderr
    assert "is a CPU build" in out.stderr or "cannot use CUDA" in out.stderr
    assert "not run: gpu tests, conformance" in out.stdout


def test_summary_lists_every_step_the_bench_and_one_verdict():
    steps = [gpu_check.Step("driver", "PASS", 0.1, "NVIDIA H100, 560.35"),
             gpu_check.Step("setup", "PASS", 95.0, ".venv-gpu: torch CUDA 12.8"),
             gpu_check.Step("gpu", "PASS", 3.2), gpu_check.Step("gpu tests", "PASS", 61.0,
                                                                 "58 passed, 0 failed"),
             gpu_check.Step("conformance", "PASS", 40.5), gpu_check.Step("bench", "PASS", 20.0)]
    text = gpu_check.format_summary(steps, ["decode write torch 10.00 GB/s ..."])
    assert text.splitlines()[-1] == "PASS: all 6 steps"
    assert "  gpu tests    PASS        61.0 s  58 passed, 0 failed" in text
    assert "    decode write torch 10.00 GB/s ..." in text
    steps[3].status, steps[4].status, steps[5].status = "FAIL", "not run", "not run"
    text = gpu_check.format_summary(steps)
    assert text.splitlines()[-1] == "FAIL: gpu tests failed; not run: conformance, bench"
    assert gpu_check.format_summary(steps[:1] + [gpu_check.Step("gpu")]).endswith(
        "INCOMPLETE: not run: gpu")


def test_bench_lines_put_each_figure_next_to_the_plain_copy():
    figure = {"bytes": 8 << 20, "seconds": 0.002, "gbps": 4.19, "plain_seconds": 0.001,
              "plain_gbps": 8.39, "ratio": 0.5}
    lines = gpu_bench.format_lines({"backends": {"torch": {"decode_write": figure,
                                                           "swap_out": figure}},
                                    "skipped": {"cupy": "BackendUnavailableError: no GPU"}})
    assert lines[0].startswith("decode write torch")
    assert "4.19 GB/s" in lines[0] and "plain copy     8.39 GB/s" in lines[0]
    assert "ratio 0.50 (8.0 MiB, 2.00 ms)" in lines[0]
    assert lines[1].startswith("swap out") and lines[-1] == (
        "cupy: not benchmarked (BackendUnavailableError: no GPU)")


def test_the_bench_names_what_it_cannot_run_and_refuses_to_report_nothing():
    # numpy has no cuda:0 on any machine: it is reported with its reason, exit 1.
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_bench.py"),
                          "--backends", "numpy"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 1
    assert "numpy: not benchmarked (UnsupportedError:" in out.stdout


@pytest.mark.parametrize("major, extra", [("12", "cuda12"), ("13", "cuda13"), (None, "cuda12")])
def test_the_cupy_extra_follows_torchs_cuda(major, extra):
    args = gpu_check.parse_args([])
    cmd = gpu_check.setup_commands(args, major)[-1]
    assert any(a.endswith(f"plugins/kv_cupy[{extra}]") for a in cmd)
