"""Presenting results: the text table, the JSON document and the optional plot."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

from .._version import __version__
from ._result import Figure, WorkloadResult

__all__ = ["PlotUnavailableError", "QUICK_NOTE", "check_plot_path", "document", "machine",
           "render_table", "write_plot"]

PLOT_HINT = 'pip install "kvcore[plot]"'
#: Why a ``--quick`` run gives no verdicts: its sizes are a smoke test, its ratios swing
#: by large factors from run to run.
QUICK_NOTE = ("quick sizes cannot judge targets: the figures are shown, the verdicts are "
              "not (run without --quick to judge them)")


class PlotUnavailableError(RuntimeError):
    """``--plot`` was asked for but matplotlib is not installed."""


def machine() -> dict[str, Any]:
    """What the figures were measured on: they mean little without it."""
    info: dict[str, Any] = {
        "platform": platform.platform(), "machine": platform.machine(),
        "processor": _cpu_model(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "kvcore": __version__,
    }
    for lib in ("numpy", "torch", "cupy"):
        module = sys.modules.get(lib)  # only libraries a backend actually loaded
        if module is not None:
            info[lib] = getattr(module, "__version__", "?")
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def document(results: list[WorkloadResult], skipped: list[dict[str, str]], params: dict[str, Any],
             argv: list[str], elapsed_s: float, *, judged: bool = True) -> dict[str, Any]:
    """The ``--json`` document.  With ``judged=False`` (``--quick``) every ``met`` and
    ``all_targets_met`` are ``null`` and ``targets_note`` says why."""
    targets = [{"backend": r.backend, "workload": r.workload, "figure": f.name,
                "value": f.to_dict()["value"], "target": f.target,
                "met": f.met if judged else None}
               for r in results for f in r.figures if f.target is not None]
    return {
        "kvcore_bench": 1,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "kvcore bench " + " ".join(argv),
        "machine": machine(),
        "params": params,
        "elapsed_s": elapsed_s,
        "results": [r.to_dict() for r in results],
        "targets": targets,
        "targets_judged": judged,
        "targets_note": None if judged else QUICK_NOTE,
        "all_targets_met": all(t["met"] for t in targets) if judged else None,
        "skipped": skipped,
    }


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, allow_nan=False)


def _fmt(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if unit == "s":  # seconds read best in the unit that keeps 3 significant digits
        for scale, name in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us"), (1e-9, "ns")):
            if abs(value) >= scale or scale == 1e-9:
                return f"{value / scale:.3g} {name}"
    if unit in ("tok/s", "op/s", "B"):
        for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, "")):
            if abs(value) >= scale or scale == 1.0:
                return f"{value / scale:.3g} {prefix}{unit}"
    if unit == "":
        return f"{value:.3f}"
    return f"{value:.3g} {unit}"


def render_table(results: list[WorkloadResult], skipped: list[dict[str, str]],
                 out: TextIO, *, judged: bool = True) -> None:
    """One row per figure: value, baseline, ratio, target, verdict (``-`` for every
    verdict when ``judged`` is false, with :data:`QUICK_NOTE` under the table)."""
    header = ("backend", "workload", "figure", "kvcore", "baseline", "ratio", "target", "met")
    rows = [header]
    for r in results:
        for f in r.figures:
            rows.append((r.backend, r.workload, f.name, _fmt(f.value, f.unit),
                         _fmt(f.baseline, f.unit), "-" if f.ratio is None else f"{f.ratio:.3g}",
                         f.target or "", _verdict(f, judged)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")
        if i == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")
    if not judged:
        out.write(f"\n{QUICK_NOTE}\n")
    baselines = {(f.name, f.baseline_label) for r in results for f in r.figures if f.baseline_label}
    if baselines:
        out.write("\nbaselines (measured in the same process):\n")
        for name, label in sorted(baselines):
            out.write(f"  {name}: {label}\n")
    setup = [(r.backend, r.workload, r.alloc_s) for r in results if r.alloc_s]
    if setup:
        out.write("\nset-up, not timed (alloc_s: pools, baselines, first touch, inputs):\n")
        for backend, workload, secs in setup:
            out.write(f"  {backend}/{workload}: {secs:.2f} s\n")
    for s in skipped:
        out.write(f"\nskipped {s['backend']}/{s['workload']}: {s['reason']}")
    if skipped:
        out.write("\n")


def _verdict(f: Figure, judged: bool) -> str:
    if f.target is None:
        return ""
    if not judged or f.met is None:
        return "-"
    return "yes" if f.met else "NO"


def check_plot_path(path: str) -> str | None:
    """Why ``--plot path`` could not be written, or ``None`` when it can.

    Checked before anything is measured: matplotlib is installed and knows the
    file's format, the folder exists and is writable, and the path is not a folder."""
    if importlib.util.find_spec("matplotlib") is None:
        return f"--plot needs matplotlib, which is not installed: {PLOT_HINT}"
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if os.path.isdir(path):
        return f"--plot {path}: is a directory; give a file name such as {path}/bench.png"
    formats = FigureCanvasAgg.get_supported_filetypes()
    suffix = os.path.splitext(path)[1].lstrip(".").lower()
    if suffix not in formats:
        return (f"--plot {path}: the file name must end in one of "
                f"{', '.join('.' + f for f in sorted(formats))} (the format comes from it)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"--plot {path}: the directory {folder} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"--plot {path}: the directory {folder} is not writable"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f"--plot {path}: the file exists and is not writable"
    return None


def write_plot(results: list[WorkloadResult], path: str) -> None:
    """A bar chart per figure that has a baseline: kvcore against the baseline, for
    every backend, on a ratio axis (baseline = 1)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailableError(f"--plot needs matplotlib, which is not installed: "
                                   f"{PLOT_HINT}") from exc
    panels: dict[tuple[str, str], list[tuple[str, Figure]]] = {}
    for r in results:
        for f in r.figures:
            if f.ratio is not None and f.baseline is not None and math.isfinite(f.ratio):
                panels.setdefault((r.workload, f.name), []).append((r.backend, f))
    if not panels:
        raise ValueError("nothing to plot: no figure with a baseline was measured")
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax, ((workload, name), entries) in zip(axes.flat, sorted(panels.items())):
        backends = [b for b, _ in entries]
        ax.bar(backends, [f.ratio for _, f in entries], color="tab:blue", label="kvcore")
        ax.axhline(1.0, color="tab:gray", linestyle="--", label="baseline")
        ax.set_title(f"{workload}: {name}", fontsize=9)
        meaning = entries[0][1].ratio_meaning or "ratio"
        ax.set_ylabel(meaning, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("kvcore bench: each figure against its baseline (same process)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # leave room for the title
    fig.savefig(path, dpi=110)
    plt.close(fig)
