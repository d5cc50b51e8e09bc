"""What a planted bug promises: the clause the suite must name first, and a test of
that clause that must fail."""

from __future__ import annotations

from dataclasses import dataclass

from kvcore import Backend, BackendCapabilities, DType


@dataclass(frozen=True)
class Planted:
    """A deliberately broken backend.

    ``clause`` is the contract clause of the suite's first failure against it (the
    first red line names the culprit), ``test`` a test covering that clause which
    must fail naming it, ``name`` the name it is registered under (its class's
    ``name`` unless the bug is the name itself).
    """

    backend: type[Backend]
    clause: str
    test: str
    name: str = ""

    @property
    def registered_name(self) -> str:
        return self.name or self.backend.name


class FloatOnlyCapabilities:
    """Mixin for planted bugs written against the numpy backend before it held
    bfloat16 and codecs: declares what it held then (float16, float32), so the bug
    meets the suite as it was planted, first on its own clause."""

    def capabilities(self) -> BackendCapabilities:
        return BackendCapabilities(
            device_types=("cpu",), dtypes=(DType.float16, DType.float32),
            unsupported_dtypes={DType.bfloat16: "this planted bug keeps numpy's float16 and "
                                                "float32 only"},
            swap_device_types=("cpu",))
