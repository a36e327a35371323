"""`make bench-gpu`: `sf extract` against the bare VGGT forward on one GPU, for batch sizes 1/4/8/16.

On a synthetic LIBERO-RLDS dataset (256 px JPEGs, two views) with random VGGT-1B weights, per batch size:
extraction steps/s (one warm Dask worker; cluster start and model load excluded, as in `make bench`), the
bare forward's steps/s in the same run (preprocessed images already on the device, forward to the last
layer, synchronised), their ratio, peak GPU memory of each, and CPU use (cores busy, machine-wide and the
worker process's) while extracting; and how far device preprocessing is from the CPU path there. Prints a table and
writes `OUT/gpu.json`. Runs in minutes on an H100/H200; `--preset tiny --device cpu` is a dry run of the same code
(the tests run it).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from distributed import Client, LocalCluster

import bench
from bench import device_sync, preset_settings
from sfcache.extract import TASKS_IN_FLIGHT, ExtractConfig, extract
from sfcache.sources import open_source
from sfcache.sources.synthetic import write_libero_rlds
from sfcache.vggt import load_vggt, preprocess
from sfcache.vggt.preprocess import POLICY_SIZE, device_images, resize_like_rlds, resize_like_rlds_tensor

PRESETS = {
    "tiny": {"weights": "random:tiny", "episodes": 2, "steps": 16, "bare_steps": 16},
    "vggt-1b": {"weights": "random:vggt-1b", "episodes": 8, "steps": 64, "bare_steps": 128},
}
STEPS_PER_SHARD = 32


def run(
    workdir: Path,
    preset: str,
    batches: tuple[int, ...] = (1, 4, 8, 16),
    device: str = "cuda",
    scheduler: str | None = None,
) -> list[dict]:
    """One dict per batch size (see the module docstring); `scheduler`: an existing Dask scheduler address."""
    settings = preset_settings(PRESETS, preset, "gpu")
    data = write_libero_rlds(workdir / "data", episodes=settings["episodes"], steps=settings["steps"], shards=2).path
    with _cluster(scheduler) as address, Client(address) as client:

        def extract_at(batch: int, out: str, episodes: str | None = None) -> dict:
            return extract(
                ExtractConfig(
                    source=data,
                    out=workdir / out,
                    vggt=settings["weights"],
                    batch_size=batch,
                    steps_per_shard=STEPS_PER_SHARD,
                    device=device,
                    scheduler=address,
                    episodes=episodes,
                    overwrite=True,
                ),
                progress=False,
            )

        extract_at(max(batches), "warm-up", episodes="*episode_000000*")  # CUDA context, kernels, imports
        rows = []
        for batch in batches:
            client.run(_reset_peak)
            machine, worker = psutil.cpu_times(), client.run(_process_cpu_seconds)
            summary = extract_at(batch, f"store-{batch}")
            busy = _busy_seconds(machine, psutil.cpu_times())
            worker_busy = sum(client.run(_process_cpu_seconds).values()) - sum(worker.values())
            seconds = summary.total_s
            rows.append(
                {
                    "batch": batch,
                    "extract_steps_per_s": summary.steps_per_s,
                    "steps": summary.steps,
                    "extract_peak_gpu_gib": max(client.run(_peak_gib).values()),
                    "cpu_cores_busy_machine": busy / seconds,
                    "cpu_cores_busy_worker": worker_busy / seconds,
                    "cpu_cores": psutil.cpu_count(),
                }
            )
    model, _ = load_vggt(settings["weights"], torch.device(device))
    agreement = device_agreement(data, model.config.img_size, torch.device(device))
    for row in rows:
        row.update(agreement)
        row.update(_bare_forward(model, data, settings["bare_steps"], row["batch"]))
        row["ratio"] = row["extract_steps_per_s"] / row["bare_steps_per_s"]
    return rows


class _cluster:
    """The given scheduler, or a local cluster of one worker running TASKS_IN_FLIGHT tasks (as `sf extract`
    starts per GPU)."""

    def __init__(self, address: str | None):
        self.address, self.local = address, None

    def __enter__(self) -> str:
        if self.address is None:
            self.local = LocalCluster(
                n_workers=1, threads_per_worker=TASKS_IN_FLIGHT, dashboard_address=":0", silence_logs=logging.CRITICAL
            )
            self.address = self.local.scheduler_address
        return self.address

    def __exit__(self, *exc) -> None:
        if self.local is not None:
            self.local.close()


def _bare_forward(model, data: Path, steps: int, batch: int) -> dict:
    """Steps/s of the forward alone on preprocessed images already on the device, and its peak memory."""
    device = next(model.parameters()).device
    source = open_source(data)
    frames = source.read(source.episodes()[0].key, 0, batch).frames
    images = preprocess(frames, "sf", model.config.img_size).to(device)
    sync = device_sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        model(images, layers=(-1,))
        sync()
        rounds = max(1, steps // batch)
        started = time.perf_counter()
        for _ in range(rounds):
            model(images, layers=(-1,))
        sync()
        seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return {"bare_steps_per_s": rounds * batch / seconds, "bare_peak_gpu_gib": peak}


def device_agreement(data: Path, img_size: int, device: torch.device) -> dict:
    """Device preprocessing against the CPU path on the same frames: lanczos3 levels off, bicubic float error."""
    source = open_source(data)
    frames = source.read(source.episodes()[0].key, 0, 8).frames
    flat = frames.reshape(-1, *frames.shape[2:])
    on_device = resize_like_rlds_tensor(torch.from_numpy(flat).to(device), POLICY_SIZE, POLICY_SIZE).cpu().numpy()
    off = np.abs(on_device.astype(int) - resize_like_rlds(flat, POLICY_SIZE, POLICY_SIZE).astype(int))
    images = device_images(torch.from_numpy(frames).to(device), "sf", img_size, frames.shape[2:4]).cpu()
    return {
        "lanczos_fraction_off_by_one": float((off == 1).mean()),
        "lanczos_max_levels_off": int(off.max()),
        "preprocess_max_abs_diff": float((images - preprocess(frames, "sf", img_size)).abs().max()),
    }


def _busy_seconds(before, after) -> float:
    """CPU seconds spent busy across all cores between two `psutil.cpu_times()` readings."""
    idle = (after.idle - before.idle) + (getattr(after, "iowait", 0) - getattr(before, "iowait", 0))
    return sum(after) - sum(before) - idle


def _process_cpu_seconds() -> float:
    times = psutil.Process().cpu_times()
    return times.user + times.system


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--preset", default="vggt-1b", choices=bench.PRESETS)
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible (use --device cpu --preset tiny for a dry run)")
    with tempfile.TemporaryDirectory(prefix="sfbench-gpu-") as workdir:
        started = time.perf_counter()
        rows = run(Path(workdir), args.preset, tuple(int(b) for b in args.batches.split(",")), args.device)
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"preset {args.preset} on {device}, {time.perf_counter() - started:.0f} s")
    print(
        "| batch | extract steps/s | bare forward steps/s | ratio | peak GPU GiB (extract / bare) "
        "| CPU cores busy (machine / worker) |\n|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['batch']} | {r['extract_steps_per_s']:.2f} | {r['bare_steps_per_s']:.2f} | {r['ratio']:.3f} | "
            f"{r['extract_peak_gpu_gib']:.1f} / {r['bare_peak_gpu_gib']:.1f} | "
            f"{r['cpu_cores_busy_machine']:.2f} / {r['cpu_cores_busy_worker']:.2f} of {r['cpu_cores']} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(
        json.dumps(
            {
                "preset": args.preset,
                "device": device,
                "rows": rows,
                "torch": torch.__version__,
                "numpy": np.__version__,
            },
            indent=2,
        )
    )
    agree = rows[0]
    print(
        f"device vs CPU preprocessing: lanczos3 {agree['lanczos_fraction_off_by_one']:.2e} of levels off by one "
        f"(max {agree['lanczos_max_levels_off']}), images max abs diff {agree['preprocess_max_abs_diff']:.2e}; "
        "expected: 0 and 0 on --device cpu (the same code); on a GPU a rare level off by one at most (float32 "
        "sums in another order round the other way), the images then off by about a level (1/255) near it"
    )
    print(f"wrote {args.out / 'gpu.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
