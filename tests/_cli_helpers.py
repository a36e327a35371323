"""Running a command's `main(argv)` in-process, the way a user's shell would see it."""

from __future__ import annotations

import sys
from collections.abc import Callable


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
