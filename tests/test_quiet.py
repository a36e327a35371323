"""Third-party notes that mean nothing to a user stay out of sfcache's output; the package's other messages pass."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest


@pytest.mark.skipif(importlib.util.find_spec("libero") is None, reason="needs the LIBERO simulator (sfcache[libero])")
def test_importing_the_libero_simulator_prints_no_robosuite_macro_notes():
    script = (
        "import logging\n"
        "from sfcache.libero_eval import _libero\n"
        "_libero()\n"  # the real LIBERO (and robosuite) import, as sf eval-libero does it
        "logging.getLogger('robosuite_logs').warning('robosuite still speaks')\n"
    )
    env = {**os.environ, "MUJOCO_GL": "osmesa", "PYOPENGL_PLATFORM": "osmesa"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "macro" not in done.stdout + done.stderr
    assert "robosuite still speaks" in done.stderr  # only the macro notes are dropped
