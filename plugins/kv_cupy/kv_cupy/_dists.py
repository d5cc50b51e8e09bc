"""Which CuPy distributions are installed, read from package metadata (no cupy import).

CuPy is published as one distribution per CUDA major version (``cupy-cuda12x``,
``cupy-cuda13x``, ...) plus the source build ``cupy`` and ROCm builds, and every one
of them installs the same ``cupy`` package.  Two side by side overwrite each other's
files: ``import cupy`` may then work, fail, or load a mix of two builds.  pip does not
stop it (for instance ``pip install "kvcore-cupy[cuda12]"`` into an environment that
already holds ``cupy-cuda13x``), so the backend checks before importing cupy.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re

__all__ = ["cupy_distributions", "duplicate_problem"]

#: Distribution names that install the ``cupy`` package (after PEP 503 normalisation).
_CUPY_NAME = re.compile(r"^cupy(-cuda\d+x?|-rocm-[\d-]+|-wheel)?$")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def cupy_distributions() -> list[tuple[str, str]]:
    """``(name, version)`` of every installed distribution providing ``cupy``."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        raw = dist.metadata["Name"] if dist.metadata is not None else None
        if not raw:
            continue
        name = _normalise(raw)
        if _CUPY_NAME.match(name) and name != "cupy-wheel":  # cupy-wheel only picks one
            found.setdefault(name, dist.version)
    return sorted(found.items())


def duplicate_problem() -> str | None:
    """Why the installed CuPy cannot be trusted when more than one distribution
    provides it (with what to run), else ``None``."""
    dists = cupy_distributions()
    if len(dists) < 2:
        return None
    listing = ", ".join(f"{name} {version}" for name, version in dists)
    names = " ".join(name for name, _ in dists)
    return (f"several CuPy distributions are installed side by side ({listing}); they "
            "overwrite each other's files in the one 'cupy' package. Keep the one "
            f"matching this machine's CUDA: pip uninstall -y {names}, then "
            'pip install "kvcore-cupy[cuda12]" (or [cuda13])')
