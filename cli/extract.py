"""`sf extract`: run VGGT once over a dataset and write pooled SF targets into a Zarr store."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console

from sfcache.device import DEVICE_CHOICES
from sfcache.extract import ExtractConfig, extract as run_extract, plan
from sfcache.errors import interrupts_raise
from sfcache.vggt import random_weights_warning


def _parse_layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated layer indices like 23 or -1,11, got {text!r}") from None


def _parse_grid(text: str) -> tuple[int, int] | None:
    if text == "native":
        return None
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"expected HxW like 16x16, or native; got {text!r}") from None
    return height, width


def extract(
    source_path: Path = typer.Argument(..., help="Dataset folder or file (LIBERO HDF5/RLDS, LeRobot, RoboTwin)."),
    out: Path = typer.Option(..., "--out", help="Target store directory (created, or resumed if it exists)."),
    vggt: str = typer.Option(..., "--vggt", help="VGGT weights: checkpoint path, hub id (facebook/VGGT-1B) "
                                                  "or random:<preset> for tests."),
    format: str = typer.Option("auto", "--format", help="Source format, or auto to detect it."),
    views: str = typer.Option(None, "--views", help="Comma list of views in VGGT order, each a name or name=column "
                                                    "(default: the format's); "
                                                    "with --recipe openpi, 'blank' marks an empty camera slot."),
    recipe: str = typer.Option("none", "--recipe", help="Feed VGGT exactly what a public SF trainer does: "
                               "openvla-oft (TF JPEG decode, lanczos 224, primary+wrist) or openpi (letterbox 224, "
                               "3 camera slots, token mask); none: the source's decode and --preprocess."),
    layers: str = typer.Option("-1", "--layers", help="Comma list of VGGT layers; -1 is the last "
                                                      "(23 on VGGT-1B, the one SF uses)."),
    grid: str = typer.Option("16x16", "--grid", help="Target grid per view: HxW, or native (VGGT's patch grid)."),
    preprocess: str = typer.Option(None, "--preprocess", help="sf (OpenVLA's 224 px resize; the default), crop or "
                                   "pad (official VGGT); a --recipe fixes it."),
    compute_dtype: str = typer.Option("auto", "--compute-dtype", help="VGGT autocast: auto (bfloat16 on Ampere+ "
                                      "GPUs, float32 on CPU), bfloat16 (as SF on GPU, also on CPU) or float32."),
    dtype: str = typer.Option("float16", "--dtype", help="Stored dtype: float16, bfloat16 or int8."),
    codec: str = typer.Option("none", "--codec", help="Compression: none, zstd or blosc-zstd."),
    reduce: str = typer.Option("none", "--reduce", help="Compact store: pca:K stores K PCA coefficients per token "
                               "(basis fitted on a sample of steps, targets rebuilt on read); pca:auto picks the "
                               "smallest K reaching --min-cosine; none stores full targets."),
    min_cosine: float = typer.Option(None, "--min-cosine", help="Held-out mean per-token cosine a --reduce store "
                                     "must reach, else extract refuses to write it (needed by pca:auto)."),
    checksum: bool = typer.Option(False, "--checksum/--no-checksum",
                                  help="CRC32C per stored step: inspect-cache --check then detects any flipped byte."),
    batch_size: int = typer.Option(8, "--batch-size", help="Steps per VGGT forward pass."),
    workers: int = typer.Option(None, "--workers", help="Worker processes (default: one per GPU, else 1)."),
    scheduler: str = typer.Option(None, "--scheduler", help="Address of a running Dask scheduler (tcp://...)."),
    episodes: str = typer.Option(None, "--episodes", help="Only episodes whose key matches this fnmatch pattern."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a store made with another configuration."),
    repair: bool = typer.Option(False, "--repair", help="Also read back every done shard and redo those that fail "
                                "(what `sf inspect-cache --check` reports); missing shard files are always redone."),
    device: str = typer.Option("auto", "--device", help=f"{DEVICE_CHOICES}."),
    steps_per_shard: int = typer.Option(32, "--steps-per-shard", help="Steps per shard file (unit of resume)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Leave unreadable episodes out and list them at the end."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be extracted and the store size."),
) -> None:
    """Extract Spatial Forcing targets: VGGT over every step, pooled, into a resumable Zarr store."""
    cfg = ExtractConfig(
        source=source_path, out=out, vggt=vggt, format=format,
        views=tuple(v.strip() for v in views.split(",")) if views else None,
        layers=_parse_layers(layers), grid=_parse_grid(grid), recipe=recipe, preprocess=preprocess,
        compute_dtype=compute_dtype, dtype=dtype, codec=codec, checksum=checksum,
        batch_size=batch_size, steps_per_shard=steps_per_shard, workers=workers, scheduler=scheduler,
        episodes=episodes, device=device, skip_bad=skip_bad, overwrite=overwrite, repair=repair, reduce=reduce,
        min_cosine=min_cosine)
    console = Console(soft_wrap=True)
    if dry_run:
        facts = plan(cfg)
        for name, value in facts.items():
            console.print(f"{name}: {value}", highlight=False, soft_wrap=True)
        console.print(f"store size: about {facts['store_bytes_uncompressed'] / 2**30:.2f} GiB before compression",
                      highlight=False)
        return
    for name in ["distributed", *logging.root.manager.loggerDict]:   # failures reach the user as one line of ours
        if name.startswith("distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    with interrupts_raise():
        summary = run_extract(cfg)
    console.print(f"store {summary['store']}: {summary['shards_done']}/{summary['shards']} shards done, "
                  f"{summary['steps']} steps of {summary['episodes']} episodes ({summary['format']}, recipe "
                  f"{summary['recipe']}, views "
                  f"{','.join(summary['views'])}, layers {','.join(map(str, summary['layers']))})", highlight=False)
    console.print(f"extracted {summary['extracted_steps']} steps in {summary['extract_s']:.1f} s "
                  f"({summary['steps_per_s']:.2f} steps/s on {summary['workers']} worker(s), {summary['device']}); "
                  f"{summary['already_done_steps']} were already done; cluster startup "
                  f"{summary['cluster_startup_s']:.1f} s", highlight=False)
    if summary["reduce"]:
        figures = summary["reduce"]["fidelity"]
        console.print(f"basis {summary['basis']} ({summary['reduce']['asked']}): " + "; ".join(
            f"layer {layer} K={f['k']}, held-out cosine mean {f['mean']:.5f}, p1 {f['p1']:.5f}, worst {f['worst']:.5f}"
            for layer, f in figures.items()) + f"; {summary['reduce']['bytes_per_step']} bytes per step", highlight=False)
    warning = random_weights_warning(summary["weights_id"])
    if warning:
        console.print(f"[bold red]{warning}[/]", highlight=False, soft_wrap=True)
    for fixed in summary["repaired"]:
        console.print(f"[yellow]redid shard {fixed['shard']}:[/] {fixed['why']}", highlight=False, soft_wrap=True)
    for skipped in summary["skipped_episodes"]:
        console.print(f"[yellow]skipped episode:[/] {skipped}", highlight=False, soft_wrap=True)
    for failure in summary["failed"]:
        console.print(f"[red]failed shard {failure['shard']}:[/] {failure['message']}", highlight=False, soft_wrap=True)
    if summary["failed"]:
        console.print(f"[red]{len(summary['failed'])} shard(s) not extracted[/]; fix the data and run the same "
                      "command again to fill them in", highlight=False)
        raise typer.Exit(1)
