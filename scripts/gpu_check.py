#!/usr/bin/env python3
"""``make gpu-check``: everything kvcore claims about GPUs, checked on a machine with one.

Steps, each timed; a failed step stops the ones after it, and the summary says which:

1. ``driver``      ``nvidia-smi`` lists a GPU (else nothing below can pass);
2. ``setup``       a separate venv (``.venv-gpu``) with torch 2.13.0's CUDA build, taken
                   from pip's default index with ``--isolated`` so no machine-wide pip
                   config (such as one pointing at CPU wheels) can substitute a CPU
                   build, then kvcore editable with transformers, the conformance suite,
                   and ``kvcore-cupy[cuda12]`` or ``[cuda13]`` to match torch's CUDA;
3. ``gpu``         in that venv torch is a CUDA build and sees a GPU, and the cupy
                   backend's probe passes (its kernels compile and run);
4. ``gpu tests``   ``pytest -m gpu`` with ``KVCORE_REQUIRE_GPU=1``: a skipped GPU test
                   fails (tests needing two GPUs may skip on a one-GPU machine);
5. ``conformance`` the conformance suite on cuda, torch and cupy
                   (tests/test_gpu_conformance.py, same switch);
6. ``bench``       decode-write and swap bandwidth next to a plain device copy of the
                   same bytes (scripts/gpu_bench.py).

Exit status 0 only when every step passed.  ``--dry-run`` prints the commands only.
A machine with one recent NVIDIA GPU runs it in well under ten minutes once the
wheels are downloaded (the CUDA wheels are a few GB the first time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH_PIN = "torch==2.13.0"
PASS, FAIL, NOT_RUN = "PASS", "FAIL", "not run"

#: Run inside the venv by the ``gpu`` step: prints one JSON line of facts, exits 1
#: with the reason when torch has no CUDA or cupy's probe fails.
GPU_PROBE = r"""
import json, sys
facts = {}
try:
    import torch
except Exception as exc:
    print(json.dumps({"problem": f"torch is not importable: {exc}"})); sys.exit(1)
facts["torch"] = torch.__version__
facts["cuda"] = torch.version.cuda
if torch.version.cuda is None:
    facts["problem"] = (f"torch {torch.__version__} is a CPU build (torch.version.cuda is "
                        "None); install its CUDA build")
elif not torch.cuda.is_available():
    try:
        torch.cuda.init()
        reason = "torch.cuda.is_available() returned False"
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
    facts["problem"] = f"torch cannot use CUDA: {reason}"
else:
    facts["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    import kvcore
    try:
        kvcore.get_backend("cupy")
    except Exception as exc:
        facts["problem"] = f"the cupy backend is unavailable: {exc}"
print(json.dumps(facts))
sys.exit(1 if "problem" in facts else 0)
"""


@dataclass
class Step:
    """One step's outcome for the summary."""

    name: str
    status: str = NOT_RUN
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Plan:
    python: str
    venv: Path | None
    steps: list[Step] = field(default_factory=list)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gpu_check.py", description="Check kvcore on a machine with an NVIDIA GPU.",
        epilog="Exit status: 0 when every step passed, 1 when one failed, 2 on bad usage.")
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-gpu",
                        help="where to create the GPU venv (default: .venv-gpu)")
    parser.add_argument("--python", help="use this interpreter instead of the venv "
                        "(implies --skip-setup)")
    parser.add_argument("--skip-setup", action="store_true",
                        help="use the venv as it is, install nothing")
    parser.add_argument("--cupy-extra", choices=["auto", "cuda12", "cuda13"], default="auto",
                        help="kvcore-cupy extra; auto follows torch's CUDA major version")
    parser.add_argument("--no-bench", action="store_true", help="skip the bandwidth bench")
    parser.add_argument("--step-timeout", type=int, default=900,
                        help="seconds one step may take (default 900)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the commands each step would run, run nothing")
    args = parser.parse_args(argv)
    if args.python:
        args.skip_setup = True
    if args.step_timeout < 1:
        parser.error(f"--step-timeout must be at least 1 second, got {args.step_timeout}")
    return args


def venv_python(venv: Path) -> str:
    return str(venv / "bin" / "python")


def setup_commands(args: argparse.Namespace, cuda_major: str | None) -> list[list[str]]:
    """The set-up commands (the cupy extra depends on torch's CUDA, known after the
    first two)."""
    py = venv_python(args.venv)
    pip = [py, "-m", "pip", "--disable-pip-version-check", "-q"]
    extra = args.cupy_extra
    if extra == "auto":
        extra = f"cuda{cuda_major}" if cuda_major in ("12", "13") else "cuda12"
    return [
        [sys.executable, "-m", "venv", str(args.venv)],
        [*pip, "install", "--isolated", "--upgrade", "pip"],
        [*pip, "install", "--isolated", TORCH_PIN],
        [*pip, "install", "--isolated", "-e", f"{ROOT}[transformers]",
         "-e", str(ROOT / "plugins/kv_numpy"), "-e", str(ROOT / "plugins/kv_torch"),
         "-e", f"{ROOT / 'plugins/kv_cupy'}[{extra}]", "-e", str(ROOT / "conformance"),
         "-r", str(ROOT / "requirements-dev.txt")],
    ]


def test_commands(python: str, junit: Path) -> dict[str, list[str]]:
    return {
        "gpu tests": [python, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                      "--ignore", str(ROOT / "tests/test_gpu_conformance.py"),
                      f"--junitxml={junit}-tests.xml", str(ROOT / "tests")],
        "conformance": [python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        f"--junitxml={junit}-conformance.xml",
                        str(ROOT / "tests/test_gpu_conformance.py")],
    }


def _run(cmd: list[str], timeout: int, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run, echoing the output; return the exit status and the output's tail."""
    print("+ " + " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, check=False,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except FileNotFoundError as exc:
        return 127, str(exc)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout if isinstance(exc.stdout, str) else ""
        return 124, (out or "") + f"\n(timed out after {timeout} s)"
    print(proc.stdout, end="", flush=True)
    return proc.returncode, proc.stdout[-4000:]


def _junit_counts(path: Path) -> str:
    import xml.etree.ElementTree as ET
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return ""
    suites = [root] if root.tag == "testsuite" else list(root)
    total = {k: sum(int(s.get(k, 0)) for s in suites)
             for k in ("tests", "failures", "errors", "skipped")}
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return (f"{passed} passed, {total['failures']} failed, {total['errors']} errors, "
            f"{total['skipped']} skipped")


def format_summary(steps: Sequence[Step], bench_lines: Sequence[str] = ()) -> str:
    """The closing table: every step with its result, time and detail, the bench
    figures, and one verdict line."""
    width = max((len(s.name) for s in steps), default=4)
    lines = ["", "kvcore gpu-check summary", "-" * 24]
    for s in steps:
        took = f"{s.seconds:7.1f} s" if s.status != NOT_RUN else " " * 9
        detail = f"  {s.detail}" if s.detail else ""
        lines.append(f"  {s.name:<{width}}  {s.status:<7}  {took}{detail}".rstrip())
    if bench_lines:
        lines.append("  bandwidth (higher is better; ratio = kvcore / plain copy):")
        lines.extend(f"    {line}" for line in bench_lines)
    failed = [s.name for s in steps if s.status == FAIL]
    skipped = [s.name for s in steps if s.status == NOT_RUN]
    if failed:
        verdict = f"FAIL: {', '.join(failed)} failed"
        if skipped:
            verdict += f"; not run: {', '.join(skipped)}"
    elif skipped:
        verdict = f"INCOMPLETE: not run: {', '.join(skipped)}"
    else:
        verdict = f"PASS: all {len(steps)} steps"
    lines.append(verdict)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    python = args.python or venv_python(args.venv)
    names = ["driver", "setup", "gpu", "gpu tests", "conformance", "bench"]
    steps = {n: Step(n) for n in names}
    if args.skip_setup:
        steps["setup"].status, steps["setup"].detail = PASS, "skipped (--skip-setup)"
    if args.no_bench:
        steps["bench"].status, steps["bench"].detail = PASS, "skipped (--no-bench)"
    if args.dry_run:
        print("driver:      nvidia-smi --query-gpu=name,driver_version --format=csv,noheader")
        if not args.skip_setup:
            for cmd in setup_commands(args, None):
                print("setup:       " + " ".join(cmd))
        print(f"gpu:         {python} -c <probe: torch CUDA build, GPU visible, cupy probe>")
        for name, cmd in test_commands(python, Path("gpu-check")).items():
            print(f"{name + ':':<12} KVCORE_REQUIRE_GPU=1 " + " ".join(cmd))
        if not args.no_bench:
            print(f"bench:       {python} {ROOT / 'scripts/gpu_bench.py'} --json <file>")
        return 0

    bench_lines: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="kvcore-gpu-check-"))

    def finish() -> int:
        print(format_summary(list(steps.values()), bench_lines))
        shutil.rmtree(work, ignore_errors=True)
        return 0 if all(s.status == PASS for s in steps.values()) else 1

    def timed(step: Step, fn) -> bool:  # noqa: ANN001 - a local callable
        start = time.monotonic()
        ok, detail = fn()
        step.seconds = time.monotonic() - start
        step.status, step.detail = (PASS if ok else FAIL), detail
        if not ok:
            print(f"gpu-check: step {step.name!r} FAILED: {detail}", file=sys.stderr)
        return ok

    def driver() -> tuple[bool, str]:
        code, out = _run(["nvidia-smi", "--query-gpu=name,driver_version",
                          "--format=csv,noheader"], 60)
        if code != 0 or not out.strip():
            return False, ("no NVIDIA GPU here: nvidia-smi " +
                           ("is not installed" if code == 127 else f"exited {code}: "
                            f"{out.strip()[-300:]}") + "; run this on a machine with a GPU")
        return True, "; ".join(line.strip() for line in out.strip().splitlines())

    if not timed(steps["driver"], driver):
        return finish()

    def setup() -> tuple[bool, str]:
        cmds = setup_commands(args, None)
        for cmd in cmds[:3]:
            code, out = _run(cmd, args.step_timeout)
            if code:
                return False, f"{' '.join(cmd[:6])} ... exited {code}: {out.strip()[-300:]}"
        code, out = _run([venv_python(args.venv), "-c",
                          "import torch; print(torch.version.cuda or '')"], 120)
        cuda = out.strip().splitlines()[-1] if code == 0 and out.strip() else ""
        if not cuda:
            return False, (f"pip installed a torch without CUDA into {args.venv} (a CPU "
                           "build); check pip's index settings")
        cmd = setup_commands(args, cuda.split(".")[0])[3]
        code, out = _run(cmd, args.step_timeout)
        if code:
            return False, f"installing kvcore exited {code}: {out.strip()[-300:]}"
        extra = next(a for a in cmd if "kv_cupy" in a).rsplit("[", 1)[-1].rstrip("]")
        return True, f"{args.venv}: torch CUDA {cuda}, kvcore-cupy[{extra}]"

    if not args.skip_setup and not timed(steps["setup"], setup):
        return finish()

    def gpu() -> tuple[bool, str]:
        code, out = _run([python, "-c", GPU_PROBE], 300)
        try:
            facts = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return False, f"the GPU probe exited {code}: {out.strip()[-300:]}"
        if code != 0 or "problem" in facts:
            return False, f"no usable GPU for kvcore: {facts.get('problem', out.strip()[-300:])}"
        return True, (f"torch {facts['torch']} (CUDA {facts['cuda']}), "
                      f"{len(facts['gpus'])} GPU(s): {', '.join(facts['gpus'])}")

    if not timed(steps["gpu"], gpu):
        return finish()

    env = dict(os.environ, KVCORE_REQUIRE_GPU="1")
    for name, cmd in test_commands(python, work / "junit").items():
        def tests(cmd: list[str] = cmd, name: str = name) -> tuple[bool, str]:
            code, out = _run(cmd, args.step_timeout, env)
            suffix = "tests" if name == "gpu tests" else "conformance"
            counts = _junit_counts(work / f"junit-{suffix}.xml")
            return code == 0, counts or f"pytest exited {code}"
        if not timed(steps[name], tests):
            return finish()

    if not args.no_bench:
        def bench() -> tuple[bool, str]:
            out_json = work / "bench.json"
            code, out = _run([python, str(ROOT / "scripts/gpu_bench.py"), "--json",
                              str(out_json)], args.step_timeout)
            if code != 0 or not out_json.exists():
                return False, f"gpu_bench.py exited {code}: {out.strip()[-300:]}"
            sys.path.insert(0, str(ROOT / "scripts"))
            from gpu_bench import format_lines
            bench_lines.extend(format_lines(json.loads(out_json.read_text())))
            return True, ""
        timed(steps["bench"], bench)
    return finish()


if __name__ == "__main__":
    sys.exit(main())
