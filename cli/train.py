"""`sf train`: train the small VLA policy with Spatial Forcing targets from a cache (or online VGGT)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from sfcache.device import DEVICE_CHOICES
from sfcache.vggt import random_weights_warning
from sfcache.train.loop import TrainConfig
from sfcache.train.loop import train as run_training


def train(
    source: Path = typer.Option(..., "--source", help="Dataset the cache was extracted from (any sf format)."),
    out: Path = typer.Option(..., "--out", help="Run folder: checkpoint.pt, metrics.jsonl, loss_curves.png."),
    cache: Path = typer.Option(None, "--cache", help="Target store made by `sf extract` (read only)."),
    steps: int = typer.Option(2000, "--steps", help="Optimizer steps in total (a resumed run counts on)."),
    batch_size: int = typer.Option(16, "--batch-size"),
    lr: float = typer.Option(3e-4, "--lr", help="Peak AdamW learning rate (linear warmup, cosine decay)."),
    warmup_steps: int = typer.Option(100, "--warmup-steps"),
    align_weight: float = typer.Option(0.5, "--align-weight", help="SF's alpha; 0 trains the baseline without SF."),
    align_layer: int = typer.Option(None, "--align-layer", help="Policy block whose visual tokens are aligned "
                                                                  "(default: 3/4 of the depth)."),
    cache_layer: int = typer.Option(None, "--cache-layer", help="Stored VGGT layer (default: the only one)."),
    model_size: str = typer.Option("small", "--model-size", help="tiny | small | base."),
    grid: int = typer.Option(16, "--grid", help="Visual tokens per side; images are grid*14 px (16 -> 224)."),
    views: str = typer.Option(None, "--views", help="Comma-separated camera views (default: the cache's)."),
    online_vggt: str = typer.Option(None, "--online-vggt", help="VGGT weights: compute targets inside each "
                                                                  "step like the public SF trainer (to compare)."),
    device: str = typer.Option("auto", "--device", help=f"{DEVICE_CHOICES}."),
    val_episodes: int = typer.Option(2, "--val-episodes", help="Episodes held out for validation action L1."),
    val_every: int = typer.Option(200, "--val-every"),
    save_every: int = typer.Option(200, "--save-every"),
    seed: int = typer.Option(0, "--seed"),
    workers: int = typer.Option(2, "--workers", help="DataLoader worker processes."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Random 90% crop + colour jitter."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from OUT/checkpoint.pt if present."),
    deterministic: bool = typer.Option(False, "--deterministic", help="Deterministic kernels (bitwise resume)."),
) -> None:
    """Train a small VLA policy; the SF loss aligns its visual tokens with cached VGGT targets."""
    config = TrainConfig(
        source=source, out=out, cache=cache, steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
        align_weight=align_weight, align_layer=align_layer, cache_layer=cache_layer, model_size=model_size,
        grid=grid, views=tuple(v.strip() for v in views.split(",")) if views else None, online_vggt=online_vggt,
        device=device, val_episodes=val_episodes, val_every=val_every, save_every=save_every, seed=seed,
        workers=workers, augment=augment, resume=resume, deterministic=deterministic)
    summary = run_training(config)
    if summary["resumed_from"] is not None:
        typer.echo(f"resumed from step {summary['resumed_from']}")
    if "val_action_l1" in summary:
        typer.echo(f"validation action L1 {summary['val_action_l1']:.4f} "
                   f"(mean-action baseline {summary['val_mean_action_l1']:.4f})")
    warning = random_weights_warning(summary["weights_id"])
    if warning:
        Console(stderr=True).print(f"[bold red]{warning}[/]", highlight=False, soft_wrap=True)
    typer.echo(f"checkpoint: {summary['checkpoint']}\nmetrics:    {summary['metrics']}\nplot:       {summary['plot']}")
