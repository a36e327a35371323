"""Extraction throughput against a bare model loop, and stored-target fidelity and size per dtype/codec.

Throughput: `extract` on a LIBERO-RLDS fixture (JPEG decode, preprocess, VGGT, pooling, cast, write,
fsync, done flags) with one Dask worker, cluster startup and model load excluded (reported
as its own row), against a loop in this process doing only what cannot be avoided (preprocess, the
same model forward, pooling) on the same frames already decoded in memory. Ratio goal >= 0.9.
Fidelity: the float32 targets of that loop stored per dtype/codec and read back (per-token cosine),
and bytes per step on disk. Random weights: real VGGT features may compress differently.
CPU cost per step at real shapes per source format: see bench/cpu_cost.py.
int8 outliers: heavy-tailed synthetic features (Student-t, spread channel magnitudes, 1% of tokens 50x)
through the store's int8 encoding, against version 1's per-channel scales on the same features.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from distributed import LocalCluster

from bench import preset_settings, row, scratch_store_config
from bench.cpu_cost import cpu_cost_rows
from sfcache.extract import TASKS_IN_FLIGHT, ExtractConfig, extract, torch_threads
from sfcache.inspection import token_cosine
from sfcache.pooling import pool_grid
from sfcache.sources import open_source
from sfcache.sources.synthetic import write_libero_rlds
from sfcache.store import (
    CODECS,
    DTYPES,
    create_store,
    decode,
    encode,
    lock_store,
    open_cache,
)
from sfcache.vggt import load_vggt, preprocess

PRESETS = {
    "tiny": {"weights": "random:tiny", "episodes": 4, "steps": 12, "batch_size": 4, "steps_per_shard": 12},
    "vggt-1b": {"weights": "random:vggt-1b", "episodes": 8, "steps": 32, "batch_size": 8, "steps_per_shard": 32},
}
GRID = (16, 16)


def run(workdir: Path, preset: str) -> list[dict]:
    """Rows in the ARCHITECTURE.md benchmark format."""
    settings = preset_settings(PRESETS, preset, "extract")
    workdir = Path(workdir)
    data = write_libero_rlds(workdir / "data", episodes=settings["episodes"], steps=settings["steps"]).path
    device = "cuda" if torch.cuda.is_available() else "cpu"
    where = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({torch_threads(1)} torch threads)"
    figure = partial(row, "extract", device=where)

    started = time.perf_counter()
    with LocalCluster(
        n_workers=1,
        threads_per_worker=TASKS_IN_FLIGHT,
        dashboard_address=":0",  # as sf extract's
        silence_logs=logging.CRITICAL,
    ) as cluster:

        def run_extract(out: str, episodes: str | None) -> dict:
            return extract(
                ExtractConfig(
                    source=data,
                    out=workdir / out,
                    vggt=settings["weights"],
                    batch_size=settings["batch_size"],
                    steps_per_shard=settings["steps_per_shard"],
                    device=device,
                    episodes=episodes,
                    scheduler=cluster.scheduler_address,
                ),
                progress=False,
            )

        run_extract("warm-up", open_source(data).episodes()[0].key)  # imports, kernels, first batch
        startup = time.perf_counter() - started
        summary = run_extract("store", None)
    targets, bare_rate = _bare_loop(data, settings["weights"], settings["batch_size"], device)
    pipeline_rate = summary.steps_per_s
    rows = [
        figure(
            "steps_per_s",
            pipeline_rate,
            bare_rate,
            "steps/s",
            f"extract, 1 warm worker, {summary.steps} steps x {len(summary.views)} views, batch "
            f"{settings['batch_size']}; baseline: preprocess+forward+pool on frames in memory",
        ),
        figure(
            "startup_s",
            startup + summary.cluster_startup_s,
            summary.extract_s,
            "s",
            "excluded above: Dask cluster start, worker warm-up (one episode), model load; "
            "baseline: the extraction itself",
        ),
    ]
    rows += _fidelity_and_size(workdir, targets, where)
    rows += _int8_outliers(where)
    rows += cpu_cost_rows(workdir, preset, settings["batch_size"], where)
    return rows


def _int8_outliers(where: str, steps: int = 4, channels: int = 2048) -> list[dict]:
    """Per-token cosine after int8 on heavy-tailed features with 1% of tokens 50x larger (VGGT-1B width)."""
    figure = partial(row, "extract", device=where)
    rng = np.random.default_rng(0)
    x = rng.standard_t(3, (steps, 2, GRID[0] * GRID[1], channels)).astype(np.float32)
    x *= np.exp(rng.normal(0.0, 1.0, channels)).astype(np.float32)  # channels of very different size
    x[rng.random(x.shape[:3]) < 0.01] *= 50
    stored, scale = encode(x, "int8")
    cosine = token_cosine(decode(stored, "int8", scale), x)
    legacy_scale = np.abs(x).max(axis=2) / np.float32(127)  # format 1: per step/view/channel
    legacy = np.clip(np.rint(x / legacy_scale[:, :, None]), -127, 127).astype(np.int8)
    baseline = token_cosine(decode(legacy, "int8", legacy_scale), x)
    notes = (
        f"{steps} steps x 2 views x {GRID[0] * GRID[1]} tokens x {channels} ch, Student-t(3), log-normal channel "
        "sizes, 1% of tokens x50; per-token 128-channel-block scales; baseline: format-1 per-channel scales"
    )
    return [
        figure(f"int8_outlier_cosine_{name}", float(reduce(cosine)), float(reduce(baseline)), "cosine", notes)
        for name, reduce in (("worst", np.min), ("mean", np.mean))
    ]


def _bare_loop(data: Path, weights: str, batch_size: int, device: str) -> tuple[np.ndarray, float]:
    """The compute extraction cannot avoid, on decoded frames already in memory: float32 targets and steps/s."""
    source = open_source(data)
    frames = np.concatenate([source.read(info.key).frames for info in source.episodes()])
    torch.set_num_threads(torch_threads(1))  # what the single extraction worker uses
    model, _ = load_vggt(weights, device)
    patch, img_size = model.config.patch_size, model.config.img_size

    def loop(stop: int) -> np.ndarray:
        outputs = []
        for start in range(0, stop, batch_size):
            images = preprocess(frames[start : start + batch_size], "sf", img_size).to(device)
            tokens = model(images, layers=(-1,))[-1]
            native = (images.shape[-2] // patch, images.shape[-1] // patch)
            outputs.append(pool_grid(tokens, native, GRID).float().cpu().numpy())
        return np.concatenate(outputs)

    loop(batch_size)  # one warm-up batch (allocator, kernels); the worker's first batch pays the same
    started = time.perf_counter()
    targets = loop(len(frames))
    seconds = time.perf_counter() - started
    return targets, len(frames) / seconds


def _fidelity_and_size(workdir: Path, targets: np.ndarray, where: str) -> list[dict]:
    """Store the float32 targets once per dtype/codec; cosine of what reads back, bytes per step on disk."""
    figure = partial(row, "extract", device=where)
    rows = []
    steps = len(targets)
    float32_bytes = targets[0].nbytes
    for dtype in DTYPES:
        for codec in CODECS:
            path = workdir / f"fidelity-{dtype}-{codec}"
            config = scratch_store_config(
                steps,
                targets.shape[-1],
                grid=GRID,
                native_grid=GRID,
                views=tuple(f"view{v}" for v in range(targets.shape[1])),
                dtype=dtype,
                codec=codec,
            )
            with lock_store(path):
                create_store(path, config).write_shard(0, {0: targets})
            on_disk = sum(f.stat().st_size for f in (path / "targets").rglob("*") if f.is_file() and "c" in f.parts)
            rows.append(
                figure(
                    f"bytes_per_step_{dtype}_{codec}",
                    on_disk / steps,
                    float32_bytes,
                    "bytes",
                    "baseline: float32 bytes per step; random-weight features",
                )
            )
            if codec == "none":
                back = open_cache(path).read_rows(slice(0, steps))
                cosine = token_cosine(back, targets)
                rows.append(
                    figure(
                        f"cosine_mean_{dtype}",
                        float(cosine.mean()),
                        1.0,
                        "cosine",
                        "fidelity check: per-token cosine of what reads back to the float32 targets; "
                        "baseline 1 = lossless, expected just under 1 (only the dtype's rounding)",
                    )
                )
                rows.append(
                    figure(
                        f"cosine_worst_{dtype}",
                        float(cosine.min()),
                        1.0,
                        "cosine",
                        "worst token over all steps and views; baseline 1 = lossless",
                    )
                )
    return rows
