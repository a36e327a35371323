"""Entry point of `sf`: registers one command per module and turns expected errors into one line.

`main` installs the interrupt handlers before it imports the commands (torch, Dask: seconds), so that Ctrl-C,
SIGTERM or SIGHUP at any moment, start-up included, ends `sf` with one line and exit status 128 + signal.
"""

from __future__ import annotations

import sys
from functools import cache

from sfcache.errors import Interrupted, SfcacheError, interrupts_deferred, interrupts_raise


@cache
def _app():
    """The typer app with every command (imported on first use: the imports are the slow part of start-up)."""
    import typer

    import sfcache
    from sfcache.cli import (
        collect_libero,
        eval_libero,
        extract,
        inspect_cache,
        inspect_source,
        probe,
        render_depth,
        reproduce,
        train,
    )

    app = typer.Typer(
        name="sf",
        help="sfcache: precompute VGGT targets for Spatial Forcing once, then train from the cache.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )

    def version(value: bool) -> None:
        if value:
            print(f"sfcache {sfcache.__version__}")
            raise typer.Exit()

    @app.callback()
    def _root(
        version: bool = typer.Option(
            False, "--version", callback=version, is_eager=True, help="Print the sfcache version and exit."
        ),
    ) -> None:
        """sfcache command line."""

    app.command("extract")(extract.extract)
    app.command("inspect-source")(inspect_source.inspect_source)
    app.command("inspect-cache")(inspect_cache.inspect_cache)
    app.command("train")(train.train_command)
    app.command("eval-libero")(eval_libero.eval_libero)
    app.command("collect-libero")(collect_libero.collect_libero)
    app.command("render-depth")(render_depth.render_depth_command)
    app.command("reproduce-libero")(reproduce.reproduce_libero)
    app.command("probe")(probe.probe)
    return app


def __getattr__(name: str):
    """`sfcache.cli.main.app`: the typer app (for tests and embedding), built on first use."""
    if name == "app":
        return _app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_app(typer_app, argv: list[str] | None = None) -> None:
    """Run a typer app; an SfcacheError ends it with one red line and exit status 2, never a traceback."""
    import typer

    from sfcache.cli.options import plain_help

    try:  # what typer_app(...) runs, with every command's --help names made plain first
        plain_help(typer.main.get_command(typer_app))(args=argv, standalone_mode=True)
    except SfcacheError as err:
        _fail(err)


def _fail(err: SfcacheError) -> None:
    """One red line on stderr, then exit 2 (128 + signal for an interrupt)."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
    sys.exit(128 + err.signum if isinstance(err, Interrupted) else 2)


def main(argv: list[str] | None = None) -> None:
    """Run `sf`; a signal during the imports or the command is one line (`Interrupted`).

    A signal during the imports is held until they finish: raised inside them, some library's `except Exception`
    could swallow it and the command would run on (torch's import does that)."""
    try:
        with interrupts_raise():
            with interrupts_deferred():
                app = _app()
            run_app(app, argv)
    except Interrupted as err:  # arrived while importing, or while the line of another error was printed
        _fail(err)


if __name__ == "__main__":
    main()
