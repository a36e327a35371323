"""Third-party notes that mean nothing to a user stay out of sfcache's output; the package's other messages pass."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sfcache.libero_sim import simulator_available


def test_importing_the_libero_simulator_prints_no_robosuite_macro_notes(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "osmesa")  # the backend the script below renders with
    monkeypatch.setenv("PYOPENGL_PLATFORM", "osmesa")
    missing = simulator_available()
    if missing is not None:
        pytest.skip(f"LIBERO simulator not usable: {missing}")
    script = (
        "import logging\n"
        "from sfcache.libero_sim import _libero\n"
        "_libero()\n"  # the real LIBERO (and robosuite) import, as sf eval-libero does it
        "logging.getLogger('robosuite_logs').warning('robosuite still speaks')\n"
    )
    env = {**os.environ, "MUJOCO_GL": "osmesa", "PYOPENGL_PLATFORM": "osmesa"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "macro" not in done.stdout + done.stderr
    assert "robosuite still speaks" in done.stderr  # only the macro notes are dropped
