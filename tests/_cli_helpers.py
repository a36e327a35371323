"""Running a command's `main(argv)` in-process, the way a user's shell would see it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run_main(main: Callable[[list[str]], None], capsys, *args) -> tuple[int, str]:
    """Exit status and console output (stdout + stderr) of `main(ARGS)`."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def sf_command(*args) -> list[str]:
    """The command line of `sf ARGS` in a fresh interpreter (this venv's python, the installed sfcache.cli)."""
    return [sys.executable, "-m", "sfcache.cli.main", *(str(a) for a in args)]


def sf_subprocess(*args) -> subprocess.Popen:
    """`sf ARGS` started in the checkout on one thread; stderr kept for the failure message."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(sf_command(*args), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_9_then_resume(reference_args: list, killed_args: list, checkpoint: Path) -> int:
    """Run `sf REFERENCE_ARGS` and `sf KILLED_ARGS` side by side; kill -9 the second as soon as it has saved
    `checkpoint`, run it again to the end, and return the step that checkpoint held when it was killed."""
    reference = sf_subprocess(*reference_args)
    victim = sf_subprocess(*killed_args)
    try:
        while not checkpoint.exists() and victim.poll() is None:
            time.sleep(0.02)
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait() == -signal.SIGKILL
        killed_at = torch.load(checkpoint, weights_only=False)["step"]
        resumed = sf_subprocess(*killed_args)
        assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
        assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()
    finally:
        for process in (reference, victim):
            if process.poll() is None:
                process.kill()
    return killed_at
