"""`make bench`: run every area's benchmark, print one table, write report.md and report.json.

Each area module exposes run(workdir, preset) -> list of rows (see ARCHITECTURE.md); both
numbers of a row are measured side by side in this run, so ratios hold across machines.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import tempfile
import time
import traceback
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bench import PRESETS

AREAS = ("sources", "vggt", "store", "extract", "compact", "train")


def device_name() -> str:
    """The accelerator if there is one, else the CPU model and core count."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}, {os.cpu_count()} cores, torch {torch.__version__}"


def markdown(rows: list[dict], device: str, preset: str) -> str:
    lines = [
        f"# sfcache benchmark\n\npreset `{preset}`, device: {device}\n",
        "| area | metric | value | baseline | ratio | unit | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['bench']} | {r['metric']} | {r['value']:.6g} | {r['baseline']:.6g} | "
            f"{r['ratio']:.3f} | {r['unit']} | {r.get('notes', '')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--preset", default=os.environ.get("BENCH_PRESET", "tiny"))
    parser.add_argument("--areas", default=",".join(AREAS), help="comma list of " + ", ".join(AREAS))
    args = parser.parse_args()
    if args.preset not in PRESETS:
        parser.error(f"BENCH_PRESET / --preset {args.preset!r} is unknown; expected one of {', '.join(PRESETS)}")
    console = Console()
    device = device_name()
    rows: list[dict] = []
    failed: list[str] = []
    args.out.mkdir(parents=True, exist_ok=True)
    for area in args.areas.split(","):
        console.rule(f"bench: {area}")
        start = time.perf_counter()
        try:
            module = importlib.import_module(f"bench.{area}")
            with tempfile.TemporaryDirectory(prefix=f"sfbench-{area}-") as workdir:
                area_rows = module.run(Path(workdir), args.preset)
        except Exception:  # a broken area must not hide the others' figures
            console.print(f"[red]{area} failed:[/]\n{traceback.format_exc()}")
            failed.append(area)
            continue
        for row in area_rows:
            row.setdefault("device", device)
        rows.extend(area_rows)
        console.print(f"{area}: {len(area_rows)} figures in {time.perf_counter() - start:.1f} s")

    table = Table(title=f"sfcache bench ({args.preset}) on {device}")
    for col in ("area", "metric", "value", "baseline", "ratio", "unit"):
        table.add_column(col, justify="right" if col in ("value", "baseline", "ratio") else "left")
    for r in rows:
        table.add_row(
            r["bench"], r["metric"], f"{r['value']:.4g}", f"{r['baseline']:.4g}", f"{r['ratio']:.3f}", r["unit"]
        )
    console.print(table)
    (args.out / "report.md").write_text(markdown(rows, device, args.preset))
    (args.out / "report.json").write_text(
        json.dumps({"preset": args.preset, "device": device, "rows": rows, "failed": failed}, indent=2)
    )
    console.print(f"report: {args.out / 'report.md'} and {args.out / 'report.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
