"""`sf inspect-source`: what sfcache sees in a dataset before extracting from it."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from sfcache.cli.options import path_text
from sfcache.sources import FORMATS, open_source

SHOWN_EPISODES = 8


def inspect_source(
    path: str = typer.Argument(..., help="Dataset folder or file.", metavar="PATH"),
    format: str = typer.Option("auto", "--format", help=f"auto or one of: {', '.join(FORMATS)}."),
    views: str = typer.Option(
        None, "--views", help="Comma list of views in VGGT order, each a name or name=column (default: the format's)."
    ),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="List structurally bad episodes instead of stopping."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON report instead of tables."),
) -> None:
    """Show the detected format, episodes, steps, views and frame size of a dataset."""
    path = path_text(path, "PATH")
    chosen = tuple(view.strip() for view in views.split(",")) if views else None
    source = open_source(path, format=format, views=chosen, skip_bad=skip_bad)
    episodes = source.episodes()
    frame_size = list(source.read(episodes[0].key, 0, 1).frames.shape[2:4]) if episodes else None
    report = {
        **source.describe(),
        "available_views": list(source.view_keys),
        "episodes": len(episodes),
        "steps": sum(info.num_steps for info in episodes),
        "frame_size": frame_size,
        "first_episodes": [
            {"key": i.key, "steps": i.num_steps, "instruction": i.instruction} for i in episodes[:SHOWN_EPISODES]
        ],
        "skipped": [str(err) for err in source.skipped],
    }
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    console = Console()
    summary = Table(title=f"{path}", show_header=False)
    for label, value in [
        ("format", report["format"] + (f" ({report['variant']})" if "variant" in report else "")),
        ("episodes", report["episodes"]),
        ("steps", report["steps"]),
        ("views (chosen)", ", ".join(report["views"])),
        ("views (available)", ", ".join(report["available_views"])),
        ("frame size", "x".join(map(str, frame_size)) if frame_size else "-"),
        ("rotate 180", report["rotate"]),
        ("skipped", len(report["skipped"])),
    ]:
        summary.add_row(label, str(value))
    console.print(summary)
    listing = Table(title=f"first {min(len(episodes), SHOWN_EPISODES)} episodes")
    listing.add_column("key", overflow="fold")
    listing.add_column("steps", justify="right")
    listing.add_column("instruction")
    for item in report["first_episodes"]:
        listing.add_row(item["key"], str(item["steps"]), item["instruction"])
    console.print(listing)
    for line in report["skipped"]:
        console.print(f"[yellow]skipped:[/] {line}", highlight=False, soft_wrap=True)
