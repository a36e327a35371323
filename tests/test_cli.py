from typer.testing import CliRunner

import sfcache
from sfcache.cli.main import app


def test_help_lists_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("extract", "train", "inspect-cache", "inspect-source"):
        assert name in result.output


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert sfcache.__version__ in result.output


def test_a_signal_during_the_imports_is_not_swallowed_by_them(monkeypatch, capsys):
    """torch's import catches `Exception` in places: an `Interrupted` raised inside it was lost and the command ran
    to the end (exit 0). The signal is held until the imports finish, then ends `sf` with one line."""
    import os
    import signal

    import pytest

    from sfcache.cli import main as entry

    app = entry._app()

    def swallowing_import():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except Exception:  # what a library's import may do around its optional parts
            pass
        return app

    ran = []
    monkeypatch.setattr(entry, "_app", swallowing_import)
    monkeypatch.setattr(entry, "run_app", lambda *args: ran.append(args))
    with pytest.raises(SystemExit) as exit_:
        entry.main(["--version"])
    assert exit_.value.code == 128 + signal.SIGTERM and not ran
    assert capsys.readouterr().err.strip() == (
        "error: interrupted by SIGTERM; work finished so far is kept: run the same command again to resume"
    )
