"""`sf render-depth`: add metric depth to a LIBERO HDF5 dataset by replaying its states in the simulator."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from sfcache.cli.options import config_command
from sfcache.libero_render_depth import REPORT, RenderDepthConfig, render_depth


@config_command(RenderDepthConfig)
def render_depth_command(fields: dict) -> None:
    """Metric depth (obs/agentview_depth, obs/eye_in_hand_depth: float16 metres) for every demo of a dataset."""
    config = RenderDepthConfig(**fields)
    reports = render_depth(config)
    table = Table("file", "demos", "frames", "replayed RGB = stored", "off by > 10", "agentview m", "wrist m")
    for r in reports:
        table.add_row(
            r.file,
            str(r.demos),
            str(r.frames),
            f"{100 * (1 - r.rgb_pixels_differing):.2f}% of pixels",
            f"{100 * r.rgb_pixels_off_by_more_than_10:.2f}%",
            "-".join(f"{v:.2f}" for v in r.agentview_depth_m),
            "-".join(f"{v:.3f}" for v in r.eye_in_hand_depth_m),
        )
    Console().print(table)
    typer.echo(f"dataset with depth: {config.out}\nreport: {config.out / REPORT}")
