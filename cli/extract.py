"""`sf extract`: run VGGT once over a dataset and write pooled SF targets into a Zarr store."""

from __future__ import annotations

import logging

import typer
from rich.console import Console

from sfcache.cli.options import config_command, said_as_flags
from sfcache.extract import ExtractConfig, plan
from sfcache.extract import extract as run_extract
from sfcache.vggt import random_weights_warning


def plan_lines(facts: dict) -> list[str]:
    """`plan`'s facts as a user reads them: 'views: primary, wrist', 'grid: 16x16', sizes in MiB/GiB."""
    shown = {
        "vggt": facts["vggt"] or "none given; a run needs --vggt (facebook/VGGT-1B: the sizes here are its)",
        "frame size": "x".join(map(str, facts["frame_size"])) + " px (height x width)",
        "grid": "x".join(map(str, facts["grid"])),
        "skipped episodes": ", ".join(facts["skipped_episodes"]) or "none",
        "bytes per step": f"{facts['bytes_per_step']:,}",
        "store size": f"about {facts['store_bytes_uncompressed'] / 2**30:.2f} GiB before compression",
    }
    lines = []
    for name, value in facts.items():
        label = name.replace("_", " ")
        if label in shown or label == "store bytes uncompressed":
            continue
        lines.append(f"{label}: {', '.join(map(str, value)) if isinstance(value, list) else value}")
    return lines + [f"{label}: {value}" for label, value in shown.items()]


@config_command(ExtractConfig)
def extract(
    fields: dict,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be extracted and the store size."),
) -> None:
    """Extract Spatial Forcing targets: VGGT over every step, pooled, into a resumable Zarr store."""
    cfg = ExtractConfig(**fields)
    console = Console(soft_wrap=True)
    if dry_run:
        for line in plan_lines(plan(cfg).facts()):
            console.print(line, highlight=False, soft_wrap=True)
        return
    for name in ["distributed", *logging.root.manager.loggerDict]:  # failures reach the user as one line of ours
        if name.startswith("distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    summary = run_extract(cfg)  # `sf` turns Ctrl-C, SIGTERM and SIGHUP into one line (sfcache.cli.main)
    console.print(
        f"store {summary.store}: {summary.shards_done}/{summary.shards} shards done, "
        f"{summary.steps} steps of {summary.episodes} episodes ({summary.format}, recipe "
        f"{summary.recipe}, views "
        f"{','.join(summary.views)}, layers {','.join(map(str, summary.layers))})",
        highlight=False,
    )
    if summary.extracted_steps == 0 and not summary.failed and summary.shards_done == summary.shards:
        console.print(
            f"{summary.store} is already complete: {summary.steps} steps in {summary.shards} shards; nothing to do",
            highlight=False,
        )
    else:
        console.print(
            f"extracted {summary.extracted_steps} steps in {summary.extract_s:.1f} s "
            f"({summary.steps_per_s:.2f} steps/s on {summary.workers} worker(s), {summary.device}); "
            f"{summary.already_done_steps} were already done"
            + (
                f" and {summary.adopted_steps} written by an earlier attempt were confirmed, not recomputed"
                if summary.adopted_steps
                else ""
            )
            + "; cluster startup "
            f"{summary.cluster_startup_s:.1f} s",
            highlight=False,
        )
    if summary.reduce:
        figures = summary.reduce["fidelity"]
        console.print(
            f"basis {summary.basis} ({summary.reduce['asked']}): "
            + "; ".join(
                f"layer {layer} K={f['k']}, held-out cosine mean {f['mean']:.5f}, "
                f"p1 {f['p1']:.5f}, worst {f['worst']:.5f}"
                for layer, f in figures.items()
            )
            + f"; {summary.reduce['bytes_per_step']} bytes per step",
            highlight=False,
        )
    warning = random_weights_warning(summary.weights_id)
    if warning:
        console.print(f"[bold red]{warning}[/]", highlight=False, soft_wrap=True)
    for fixed in summary.repaired:
        why = said_as_flags(fixed["why"], ExtractConfig)
        console.print(f"[yellow]redid shard {fixed['shard']}:[/] {why}", highlight=False, soft_wrap=True)
    for skipped in summary.skipped_episodes:
        console.print(f"[yellow]skipped episode:[/] {skipped}", highlight=False, soft_wrap=True)
    for failure in summary.failed:
        console.print(f"[red]failed shard {failure['shard']}:[/] {failure['message']}", highlight=False, soft_wrap=True)
    if summary.failed:
        console.print(
            f"[red]{len(summary.failed)} shard(s) not extracted[/]; fix the data and run the same "
            "command again to fill them in",
            highlight=False,
        )
        raise typer.Exit(1)
