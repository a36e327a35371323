"""`make demo`: the whole pipeline on real LIBERO scenes in a few minutes on a CPU.

The data is the small dataset `sf collect-libero` recorded in the simulator and the repository keeps in
data/libero-demo (its README has the command); an installed sfcache without the repository falls back to
synthetic LIBERO-layout data. Each stage runs the real `sf` command in a subprocess, printed as the user
would type it, so the demo doubles as a transcript of how to use sfcache. Re-running resumes every stage.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from sfcache.sources.synthetic import write_demo_dataset

console = Console()
RECORDED = Path(__file__).resolve().parents[1] / "data" / "libero-demo"  # in the repository, not in a wheel


def sf(*args: str) -> None:
    """Run `sf ARGS` as a user would, stopping the demo if it fails."""
    console.rule(f"[bold]$ sf {shlex.join(args)}")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sfcache.cli.main", *args])
    if done.returncode != 0:
        console.print(f"[red]`sf {args[0]}` failed (exit {done.returncode}); the demo stops here.")
        raise SystemExit(done.returncode)
    console.print(f"[dim]{args[0]} took {time.perf_counter() - start:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--data", type=Path, default=RECORDED, help="a LIBERO HDF5 dataset")
    args = parser.parse_args()
    out = args.out.resolve()
    data, cache, run, pca = out / "data", out / "cache", out / "train", out / "pca.png"

    console.rule("[bold]sfcache demo: LIBERO scenes recorded in the simulator, random tiny VGGT, CPU")
    if args.data.exists():
        dataset = args.data.resolve()
        console.print(f"demo dataset (recorded by `sf collect-libero`, see {dataset / 'README.md'}): {dataset}")
    else:
        dataset = write_demo_dataset(data) if not data.exists() else next(data.iterdir())
        console.print(f"{args.data} is not here (sfcache installed without its repository): synthetic {dataset}")

    sf("inspect-source", str(dataset))
    sf(
        "extract",
        str(dataset),
        "--out",
        str(cache),
        "--vggt",
        "random:tiny",
        "--workers",
        "1",
        "--device",
        "cpu",
        "--steps-per-shard",
        "16",
    )
    sf("inspect-cache", str(cache), "--check", "--pca", str(pca))
    sf(
        "train",
        "--source",
        str(dataset),
        "--cache",
        str(cache),
        "--out",
        str(run),
        "--steps",
        str(args.train_steps),
        "--model-size",
        "tiny",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--loader-workers",
        "0",
        "--val-every",
        "50",
        "--save-every",
        "50",
    )

    console.rule("[bold green]demo finished")
    console.print(
        f"  dataset      {dataset}\n  cache        {cache}\n  PCA picture  {pca}\n"
        f"  training     {run} (metrics.jsonl, loss_curves.png, checkpoint.pt)"
    )
    console.print(
        "\nNext, on real data with the real checkpoint (see README):\n"
        "  sf extract /data/libero_spatial_no_noops --out caches/libero_spatial "
        "--vggt /path/to/VGGT-1B/model.pt\n"
        "  make reproduce-libero LIBERO_DIR=/data/modified_libero_rlds VGGT=/path/to/VGGT-1B/model.pt"
    )


if __name__ == "__main__":
    main()
