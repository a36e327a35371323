"""`sf eval-libero`: success rates of an `sf train` checkpoint in the LIBERO simulator (OpenVLA-OFT's protocol)."""

from __future__ import annotations

import typer
from rich.console import Console

from sfcache.cli.options import config_command, path_text
from sfcache.device import DEVICE_CHOICES, resolve_device
from sfcache.libero_eval import EvalConfig, evaluate
from sfcache.libero_results import results_table
from sfcache.libero_sim import RESOLUTION
from sfcache.options import default_of
from sfcache.train.libero_policy import CheckpointPolicy
from sfcache.train.loop import TrainConfig


@config_command(EvalConfig, defaults={"out": None})
def eval_libero(
    fields: dict,
    checkpoint: str = typer.Argument(..., help="An `sf train` run folder or its checkpoint.pt.", metavar="CHECKPOINT"),
    device: str = typer.Option(
        default_of(TrainConfig, "device"), "--device", help=f"{DEVICE_CHOICES} (the policy's device)."
    ),
) -> None:
    """Closed-loop success rates in the LIBERO simulator: results.jsonl, summary.json, videos, a table."""
    resolve_device(device, name="--device")  # first: the policy would name it as its argument, device
    policy = CheckpointPolicy(path_text(checkpoint, "CHECKPOINT"), device=device, seed=fields["seed"])
    config = EvalConfig(
        **{
            **fields,
            "out": fields["out"] or policy.path.parent / f"eval_libero_{fields['suite']}",
            "resolution": policy.render_size(RESOLUTION),  # render the size the policy was trained on
        }
    )
    summary = evaluate(policy, config, policy.describe())
    Console().print(results_table(summary))
    typer.echo(
        f"success {100 * summary.success_rate:.1f}% over {summary.episodes} episodes "
        f"({summary.sim_steps_per_s:.1f} simulator steps/s, {summary.seconds_per_episode:.1f} s/episode)\n"
        f"results: {config.out / 'results.jsonl'}\nsummary: {config.out / 'summary.json'}"
    )
