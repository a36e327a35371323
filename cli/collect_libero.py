"""`sf collect-libero`: scripted demonstrations in the LIBERO simulator, written as a LIBERO HDF5 dataset."""

from __future__ import annotations

import typer
from rich.console import Console

from sfcache.cli.options import config_command
from sfcache.libero_collect import CollectConfig, collect, report_table, write_report


@config_command(CollectConfig)
def collect_libero(fields: dict) -> None:
    """Record scripted pick-and-place demonstrations (RGB, optional metric depth) in the simulator.

    Fresh random placements (never the benchmark's evaluation init states); only successful episodes are kept.

    Tasks the controller solves (successes of 5 fresh placements; the README's "Real scenes" lists all 40):
    spatial: 0, 2, 5, 8 (5/5); 1, 3 (4/5)
    object: 0, 2, 3, 4, 5, 6, 8 (5/5)
    goal: 1, 2, 4, 6, 9 (5/5)
    10: 5 (4/5)
    The others fail (0/5) or have no script (drawers, the stove knob, two-object goals).
    """
    config = CollectConfig(**fields)
    reports = collect(config)
    Console().print(report_table(reports))
    report = write_report(config, reports)
    for r in reports:
        for why, count in r.failures.items():
            typer.echo(f"{r.suite} task {r.task_id}: {count} failed attempt(s): {why}")
    short = [r for r in reports if r.demos < config.episodes]
    for r in short:
        Console(stderr=True).print(
            f"[yellow]{r.suite} task {r.task_id}: {r.demos} of {config.episodes} demonstrations after "
            f"{r.attempts} attempts (--max-attempts); the controller rarely solves it[/]"
        )
    typer.echo(f"dataset: {config.out}\nreport:  {report}")
