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
