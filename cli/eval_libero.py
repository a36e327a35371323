"""`sf eval-libero`: success rates of an `sf train` checkpoint in the LIBERO simulator (OpenVLA-OFT's protocol)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from sfcache.device import DEVICE_CHOICES
from sfcache.errors import SfcacheError
from sfcache.libero_eval import MAX_STEPS, SUITES, EvalConfig, evaluate, results_table
from sfcache.train.libero_policy import CheckpointPolicy


def parse_tasks(tasks: str | None) -> tuple[int, ...] | None:
    """'0,3,5' or '0-4' -> task indices."""
    if not tasks:
        return None
    chosen: list[int] = []
    try:
        for part in tasks.split(","):
            low, _, high = part.strip().partition("-")
            chosen += list(range(int(low), int(high or low) + 1))
    except ValueError:
        raise SfcacheError(f"--tasks {tasks}: expected task indices like 0,3,5 or 0-4") from None
    return tuple(chosen)


def eval_libero(
    checkpoint: Path = typer.Argument(..., help="An `sf train` run folder or its checkpoint.pt."),
    suite: str = typer.Option(..., "--suite", help=" | ".join(SUITES)),
    tasks: str = typer.Option(None, "--tasks", help="Task indices, e.g. 0,3,5 or 0-4 (default: all 10)."),
    trials_per_task: int = typer.Option(50, "--trials-per-task", help="Episodes per task, on LIBERO's fixed "
                                                                      "init states 0..N-1."),
    seed: int = typer.Option(7, "--seed", help="Seed of the evaluation (OFT: 7)."),
    out: Path = typer.Option(None, "--out", help="Results folder (default: RUN/eval_libero_<suite>); "
                                                 "resumes the episodes it already holds."),
    video: int = typer.Option(1, "--video", help="Save rollout videos of the first N trials of each task."),
    max_steps: int = typer.Option(None, "--max-steps", help="Policy steps per episode (default: the protocol's "
                                                            + ", ".join(f"{s} {n}" for s, n in MAX_STEPS.items())
                                                            + "); shorter only for quick checks."),
    device: str = typer.Option("auto", "--device", help=f"{DEVICE_CHOICES} (the policy's device)."),
) -> None:
    """Closed-loop success rates in the LIBERO simulator: results.jsonl, summary.json, videos, a table."""
    policy = CheckpointPolicy(checkpoint, device=device, seed=seed)
    out = out or policy.path.parent / f"eval_libero_{suite}"
    config = EvalConfig(suite=suite, out=out, tasks=parse_tasks(tasks), trials_per_task=trials_per_task, seed=seed,
                        video=video, max_steps=max_steps)
    summary = evaluate(policy, config, policy.describe())
    Console().print(results_table(summary))
    typer.echo(f"success {100 * summary['success_rate']:.1f}% over {summary['episodes']} episodes "
               f"({summary['sim_steps_per_s']:.1f} simulator steps/s, {summary['seconds_per_episode']:.1f} s/episode)\n"
               f"results: {out / 'results.jsonl'}\nsummary: {out / 'summary.json'}")
