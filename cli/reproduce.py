"""`sf reproduce-libero` (and `make reproduce-libero`): the whole SF pipeline over the LIBERO suites, with a report."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from sfcache.device import DEVICE_CHOICES
from sfcache.train.model import SIZES
from sfcache.train.reproduce import SUITES, ReproduceConfig, reproduce


def reproduce_libero(
    libero_dir: str = typer.Option("", "--libero-dir", help="Folder holding libero_<suite>_no_noops/ (RLDS or "
                                                            "HDF5) or libero_<suite>/ (HDF5) folders."),
    vggt: str = typer.Option("", "--vggt", help="VGGT checkpoint path, a cached hub id (facebook/VGGT-1B), "
                                                "or random:<preset> (pipeline tests only)."),
    device: str = typer.Option("auto", "--device", help=f"{DEVICE_CHOICES}."),
    scheduler: str = typer.Option("", "--scheduler", help="Dask scheduler address; empty for a local cluster."),
    out: str = typer.Option("out/reproduce-libero", "--out", help="Output folder (caches, runs, report)."),
    suites: str = typer.Option(",".join(SUITES), "--suites", help="Comma list of suites to run."),
    require_all: bool = typer.Option(False, "--require-all", help="Stop if any asked suite is missing."),
    steps: int = typer.Option(2000, "--steps", help="Optimizer steps per training run."),
    model_size: str = typer.Option("small", "--model-size", help="Policy size: " + " | ".join(SIZES)),
    batch_size: int = typer.Option(16, "--batch-size"),
    grid: int = typer.Option(16, "--grid", help="Target grid and policy tokens per side (16 -> 224 px)."),
    dtype: str = typer.Option("float16", "--dtype", help="Stored targets: float16, bfloat16 or int8 (half the disk)."),
    align_weight: float = typer.Option(0.5, "--align-weight", help="SF's alpha for the runs with SF."),
    val_episodes: int = typer.Option(10, "--val-episodes", help="Held-out episodes per suite."),
    eval_every: int = typer.Option(200, "--eval-every", help="Validate and checkpoint every N steps."),
    loader_workers: int = typer.Option(2, "--loader-workers", help="DataLoader worker processes."),
    extract_batch_size: int = typer.Option(8, "--extract-batch-size", help="Steps per VGGT forward pass."),
    steps_per_shard: int = typer.Option(32, "--steps-per-shard", help="Steps per cache shard (unit of resume)."),
    eval_trials: int = typer.Option(50, "--eval-trials", help="LIBERO simulator episodes per task and checkpoint "
                                                              "(OFT: 50); 0 skips the simulator evaluation."),
    eval_checkpoints: int = typer.Option(1, "--eval-checkpoints", help="Checkpoints evaluated per run, evenly "
                                                                       "spaced (>1 plots success vs steps)."),
    eval_max_steps: int = typer.Option(None, "--eval-max-steps", help="Policy steps per episode (default: the "
                                                                      "protocol's per-suite limit)."),
) -> None:
    """Reproduce Spatial Forcing on LIBERO from cached VGGT targets: extract, train with/without SF, report."""
    config = ReproduceConfig(
        libero_dir=Path(libero_dir).expanduser() if libero_dir else None, vggt=vggt or None,
        out=Path(out or "out/reproduce-libero"), device=device or "auto", scheduler=scheduler or None,
        suites=tuple(s.strip().removeprefix("libero_") for s in suites.split(",") if s.strip()),
        require_all=require_all, steps=steps, model_size=model_size, batch_size=batch_size, grid=grid,
        dtype=dtype, align_weight=align_weight, val_episodes=val_episodes, eval_every=eval_every,
        loader_workers=loader_workers, extract_batch_size=extract_batch_size, steps_per_shard=steps_per_shard,
        eval_trials=eval_trials, eval_checkpoints=eval_checkpoints, eval_max_steps=eval_max_steps)
    try:
        reproduce(config)
    except KeyboardInterrupt:
        Console(stderr=True).print("[yellow]interrupted:[/] finished work is kept; run the same command again "
                                   "to continue")
        raise typer.Exit(130) from None
