"""What a workload hands back: named figures, each with its baseline and target."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Figure", "WorkloadResult"]


@dataclass
class Figure:
    """One reported number, the baseline it is judged against, and the verdict.

    ``ratio`` is ``value / baseline`` as stated in ``ratio_meaning``; ``target`` says in
    words what the issue asks of it and ``met`` whether this run met it (``None``
    when the figure has no target)."""

    name: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_label: str | None = None
    ratio: float | None = None
    ratio_meaning: str | None = None
    target: str | None = None
    met: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        def clean(x: Any) -> Any:  # JSON has no NaN; say "no value" instead
            return None if isinstance(x, float) and not math.isfinite(x) else x
        return {k: clean(v) for k, v in self.__dict__.items()}


@dataclass
class WorkloadResult:
    """Every figure of one workload on one backend, plus the time spent setting up."""

    workload: str
    backend: str
    figures: list[Figure] = field(default_factory=list)
    #: Seconds spent allocating and first-touching pools and baselines (not timed).
    alloc_s: float = 0.0
    #: Seconds the whole workload took, set-up included.
    wall_s: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def to_dict(self) -> dict[str, Any]:
        return {"workload": self.workload, "backend": self.backend,
                "alloc_s": self.alloc_s, "wall_s": self.wall_s,
                "figures": {f.name: f.to_dict() for f in self.figures},
                "details": self.details}
