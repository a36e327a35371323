"""Entry point of `sf`: registers one command per module and turns expected errors into one line."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

import sfcache
from sfcache.cli import (
    collect_libero,
    eval_libero,
    extract,
    inspect_cache,
    inspect_source,
    render_depth,
    reproduce,
    train,
)
from sfcache.errors import Interrupted, SfcacheError

app = typer.Typer(
    name="sf",
    help="sfcache: precompute VGGT targets for Spatial Forcing once, then train from the cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"sfcache {sfcache.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the sfcache version and exit."
    ),
) -> None:
    """sfcache command line."""


app.command("extract")(extract.extract)
app.command("inspect-source")(inspect_source.inspect_source)
app.command("inspect-cache")(inspect_cache.inspect_cache)
app.command("train")(train.train)
app.command("eval-libero")(eval_libero.eval_libero)
app.command("collect-libero")(collect_libero.collect_libero)
app.command("render-depth")(render_depth.render_depth_command)
app.command("reproduce-libero")(reproduce.reproduce_libero)


def run_app(typer_app: typer.Typer, argv: list[str] | None = None) -> None:
    """Run a typer app; an SfcacheError ends it with one red line and exit status 2, never a traceback."""
    try:
        typer_app(args=argv, standalone_mode=True)
    except SfcacheError as err:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(128 + err.signum if isinstance(err, Interrupted) else 2)


def main(argv: list[str] | None = None) -> None:
    """Run `sf`."""
    run_app(app, argv)


if __name__ == "__main__":
    main()
