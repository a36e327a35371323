"""`sf reproduce-libero` (and `make reproduce-libero`): the whole SF pipeline over the LIBERO suites, with a report."""

from __future__ import annotations

import typer
from rich.console import Console

from sfcache.cli.options import config_command
from sfcache.train.reproduce import ReproduceConfig, reproduce


@config_command(ReproduceConfig)
def reproduce_libero(fields: dict) -> None:
    """Reproduce Spatial Forcing on LIBERO from cached VGGT targets: extract, train with/without SF, report."""
    config = ReproduceConfig(**fields)
    try:
        reproduce(config)
    except KeyboardInterrupt:
        Console(stderr=True).print(
            "[yellow]interrupted:[/] finished work is kept; run the same command again to continue"
        )
        raise typer.Exit(130) from None
