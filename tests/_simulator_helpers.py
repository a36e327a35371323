"""Which tests need the LIBERO simulator: they skip, with the one-line reason, where it or libOSMesa is missing."""

from __future__ import annotations

import pytest

from sfcache.libero_sim import simulator_available

MISSING = simulator_available()
skip_without_simulator = pytest.mark.skipif(MISSING is not None, reason=f"LIBERO simulator not usable: {MISSING}")


def needs_simulator(test):
    """Real simulator tests: marked `simulator` (`-m "not simulator"` leaves them out), skipped only without it,
    each in its own process (MuJoCo and TensorFlow cannot share one; see conftest.py)."""
    return pytest.mark.own_process(pytest.mark.simulator(skip_without_simulator(test)))
