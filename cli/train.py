"""`sf train`: train the small VLA policy with Spatial Forcing targets from a cache (or online VGGT)."""

from __future__ import annotations

import typer
from rich.console import Console

from sfcache.cli.options import config_command, said_as_flags
from sfcache.train.loop import TrainConfig, train
from sfcache.vggt import random_weights_warning


@config_command(TrainConfig)
def train_command(fields: dict) -> None:
    """Train a small VLA policy; the SF loss aligns its visual tokens with cached VGGT targets."""
    config = TrainConfig(**fields)
    errors = Console(stderr=True)
    for warning in config.warnings():
        errors.print(f"[yellow]warning:[/] {said_as_flags(warning, TrainConfig)}", highlight=False, soft_wrap=True)
    result = train(config)
    if result.resumed_from is not None and result.resumed_from >= config.steps:
        typer.echo(
            f"{result.out} is already complete: {result.resumed_from} of {config.steps} steps trained; nothing to do "
            "(raise --steps to train on)"
        )
    elif result.resumed_from is not None:
        typer.echo(f"resumed from step {result.resumed_from}")
    if result.val_action_l1 is not None:
        typer.echo(
            f"validation action L1 {result.val_action_l1:.4f} (mean-action baseline {result.val_mean_action_l1:.4f})"
        )
    warning = random_weights_warning(result.weights_id)
    if warning:
        errors.print(f"[bold red]{warning}[/]", highlight=False, soft_wrap=True)
    typer.echo(f"checkpoint: {result.checkpoint}\nmetrics:    {result.metrics}\nplot:       {result.plot}")
