"""`sf probe`: train DPT depth heads on a frozen `sf train` policy's visual tokens and report depth metrics."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from sfcache.cli.options import config_command
from sfcache.options import comma_text
from sfcache.probe import MEAN_DEPTH
from sfcache.probe.metrics import figure
from sfcache.train.probe import PATCH_EMBEDDING, POLICY, ProbeConfig, run_probe


@config_command(ProbeConfig)
def probe(fields: dict) -> None:
    """Depth probe: how much metric depth the policy's visual tokens carry, against its patch embedding and the
    mean-depth image (probe.json, metrics.jsonl, a picture per view)."""
    config = ProbeConfig(**fields)
    report = run_probe(config)
    console = Console()
    names = {POLICY: f"policy blocks {comma_text(report['about']['layers'])}", PATCH_EMBEDDING: "patch embedding"}
    names[MEAN_DEPTH] = "mean depth image"
    for set_name, results in report["results"].items():
        table = Table(title=f"depth probe, {set_name}")
        for column in ("view", "tokens", "AbsRel", "RMSE (m)", "delta<1.25"):
            table.add_column(column, justify="left" if column in ("view", "tokens") else "right")
        for view in results[POLICY]:
            for name in (POLICY, PATCH_EMBEDDING, MEAN_DEPTH):
                m = results[name][view]
                table.add_row(view, names[name], *(figure(m[key]) for key in ("abs_rel", "rmse_m", "delta1")))
        console.print(table)
        for view, ratios in report["comparison"][set_name][POLICY].items():
            over = [
                f"{figure(ratios[f'abs_rel_over_{n}'], 2)}x the {names[n]}'s" for n in (PATCH_EMBEDDING, MEAN_DEPTH)
            ]
            console.print(f"{set_name}, {view}: the policy's AbsRel is {' and '.join(over)} (below 1: it carries more)")
    if report["about"]["warning"]:
        Console(stderr=True).print(
            f"[bold red]the policy's SF targets: {report['about']['warning']}[/]", highlight=False, soft_wrap=True
        )
    typer.echo(f"report: {config.out / 'probe.json'}\npictures: {', '.join(report['pictures'])}")
