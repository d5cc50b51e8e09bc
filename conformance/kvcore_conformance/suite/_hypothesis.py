"""Hypothesis profiles of the conformance suite.

They are applied to the suite's own tests only (never loaded globally), keep no example
database (nothing is written into the user's directory) and are derandomized in the CI
profile so a failure reproduces on every run and machine.
"""

from __future__ import annotations

from hypothesis import HealthCheck, Phase, settings

__all__ = ["profile"]

_COMMON = {"deadline": None, "database": None, "print_blob": False,
               "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much]}

# A few seconds per backend, dtype and device on a 2-core CI machine.  No shrinking:
# every step re-reads every sequence, so shrinking a long failing run can take minutes;
# the unshrunk failing sequence is printed all the same, and reproduces (derandomized).
settings.register_profile("kvcore-ci", max_examples=60, stateful_step_count=50,
                          derandomize=True,
                          phases=(Phase.explicit, Phase.reuse, Phase.generate), **_COMMON)
# A smoke run (a third of the CI effort), for suites that run the contract many times.
settings.register_profile("kvcore-quick", max_examples=20, stateful_step_count=40,
                          derandomize=True,
                          phases=(Phase.explicit, Phase.reuse, Phase.generate), **_COMMON)
# For a backend author hunting a bug: random seeds, ten times the effort, and the
# failing sequence shrunk to a minimal one.
settings.register_profile("kvcore-thorough", max_examples=300, stateful_step_count=60,
                          derandomize=False, **_COMMON)


def profile(name: str) -> settings:
    """The registered profile ``name`` (``kvcore-ci``, ``kvcore-quick``, ``kvcore-thorough``)."""
    return settings.get_profile(name)
