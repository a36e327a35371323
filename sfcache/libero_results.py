"""Success rates of a LIBERO evaluation from its episode records, with 95% Wilson intervals."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.table import Table

from sfcache.libero_sim import RESOLUTION, SUITES

if TYPE_CHECKING:
    from sfcache.libero_eval import EvalConfig

__all__ = ["EvalSummary", "TaskSuccess", "results_table", "success_summary", "wilson_interval"]


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a success rate (sensible at 0 and at 100%, unlike p +- 1.96 se)."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    scale = 1 + z * z / trials
    center = (p + z * z / (2 * trials)) / scale
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / scale
    return max(0.0, center - half), min(1.0, center + half)


@dataclass(frozen=True)
class TaskSuccess:
    """One task's episodes and success rate."""

    task_id: int
    task: str
    episodes: int
    successes: int
    success_rate: float
    ci95: list[float]  # 95% Wilson interval [low, high]
    mean_steps: float
    seconds_per_episode: float
    sim_steps_per_s: float


@dataclass(frozen=True)
class EvalSummary:
    """A suite's success rate over its chosen tasks (summary.json is `asdict` of it), per task in `tasks`."""

    suite: str  # libero_<suite>
    config: dict  # EvalConfig as JSON, with its step_limit
    policy: dict  # what the policy said of itself
    protocol: str  # "OpenVLA-OFT run_libero_eval" or "shortened (...)"
    episodes: int
    successes: int
    success_rate: float
    ci95: list[float]
    mean_steps: float
    seconds_per_episode: float
    sim_steps_per_s: float
    tasks: list[TaskSuccess]
    videos: list[str]  # relative to OUT


def _rate(records: list[dict]) -> dict:
    """The success fields of `TaskSuccess` and `EvalSummary` over `records`."""
    successes = sum(bool(r["success"]) for r in records)
    low, high = wilson_interval(successes, len(records))
    seconds = sum(r["seconds"] for r in records)
    return {
        "episodes": len(records),
        "successes": successes,
        "success_rate": successes / len(records) if records else 0.0,
        "ci95": [round(low, 4), round(high, 4)],
        "mean_steps": float(np.mean([r["steps"] for r in records])) if records else 0.0,
        "seconds_per_episode": seconds / len(records) if records else 0.0,
        "sim_steps_per_s": sum(r["sim_steps"] for r in records) / seconds if seconds else 0.0,
    }


def success_summary(records: Iterable[dict], config: EvalConfig, policy_info: dict) -> EvalSummary:
    """Per-task and suite success rates with 95% Wilson intervals, steps and timing."""
    records = list(records)
    tasks: dict[int, list[dict]] = {}
    for record in records:
        tasks.setdefault(record["task_id"], []).append(record)
    config_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    return EvalSummary(
        suite=SUITES[config.suite],
        config={**config_dict, "step_limit": config.step_limit},
        policy=policy_info,
        protocol="OpenVLA-OFT run_libero_eval"
        if config.max_steps is None
        and config.resolution == RESOLUTION
        and config.trials_per_task == 50
        and config.tasks is None
        and config.replan_steps is None
        else "shortened (not the protocol's tasks, trials, step limit, resolution or whole chunks)",
        **_rate(records),
        tasks=[TaskSuccess(task_id=i, task=rs[0]["task"], **_rate(rs)) for i, rs in sorted(tasks.items())],
        videos=[r["video"] for r in records if "video" in r],
    )


def results_table(summary: EvalSummary) -> Table:
    """The summary as a rich table: one row per task, then the suite."""
    table = Table("task", "episodes", "success", "95% interval", "steps", "s/episode", title=summary.suite)
    table.caption, table.caption_style = summary.policy.get("random_weights"), "bold red"  # in summary.json too

    def row(name: str, r: EvalSummary | TaskSuccess, style: str | None = None) -> None:
        table.add_row(
            name,
            str(r.episodes),
            f"{100 * r.success_rate:.1f}%",
            f"{100 * r.ci95[0]:.1f}-{100 * r.ci95[1]:.1f}%",
            f"{r.mean_steps:.0f}",
            f"{r.seconds_per_episode:.1f}",
            style=style,
        )

    for task in summary.tasks:
        row(f"{task.task_id}: {task.task}", task)
    row("suite", summary, style="bold")
    return table
