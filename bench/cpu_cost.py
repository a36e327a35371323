"""CPU milliseconds per step outside the model, per source format, at real shapes (rows of area `extract`).

What a GPU worker's CPU does per step, on one thread, on frames of each format's real size: read + decode
(`Source.read` in batches, as the worker reads), the host part of preprocessing (`host_frames`; nothing for
`sf`, whose lanczos3 and bicubic run on the device) and the page-locked copy for the transfer (made only
where CUDA is: 0 on a CPU-only machine, about a 0.4 MB memcpy per step where it is), and the
store write of [steps, V, 256, 2048] float16 already cast on the device (2 MiB per step for 2 views).
`..._cpu_preprocess` adds what moves to the device (the lanczos3 / bicubic to 518 on the CPU) and the
cast to float16 on the CPU: the per-step CPU cost before this pipeline, or of extraction on a CPU.
`cores_per_gpu_at_100_steps_per_s_<format>`: that value x 100 steps/s, against the same for the CPU path.
The forward baseline: VGGT-1B's ms per step at this batch on this device with the `vggt-1b` preset (on a
CPU at batch 1: about 100 s per 2-view step on one thread of this 2-core VM, estimated from its blocks); with
`tiny`, 10 ms, the time a GPU has per step at 100 steps/s, so the ratio is the cores one GPU needs.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from bench import device_sync, preset_settings, row, scratch_store_config
from sfcache.device import pinned
from sfcache.sources import open_source
from sfcache.sources import synthetic as syn
from sfcache.store import create_store, encode, lock_store
from sfcache.vggt import load_vggt
from sfcache.vggt.preprocess import device_images, host_frames

IMG_SIZE, TOKENS, CHANNELS, MODE = 518, 256, 2048, "sf"  # VGGT-1B's input and SF's 16x16 targets
GPU_STEP_MS = 10.0  # 100 steps/s
# steps per synthetic episode; the forward baseline: None = GPU_STEP_MS, else VGGT timed at these weights
PRESETS = {"tiny": {"steps": 16, "forward": None}, "vggt-1b": {"steps": 32, "forward": "random:vggt-1b"}}


def cpu_cost_rows(workdir: Path, preset: str, batch: int, where: str) -> list[dict]:
    figure = partial(row, "extract", device=where)
    settings = preset_settings(PRESETS, preset, "cpu_cost")
    steps_each = settings["steps"]
    cases = {
        "libero_hdf5": (
            syn.write_libero_hdf5(workdir / "cost-h5", tasks=1, demos=2, steps=steps_each, no_noops=True),
            2,
        ),
        "libero_rlds": (syn.write_libero_rlds(workdir / "cost-rlds", episodes=2, steps=steps_each, shards=1), 2),
        "lerobot": (syn.write_lerobot(workdir / "cost-lerobot", episodes=2, steps=steps_each), 2),
        "robotwin_legacy": (syn.write_robotwin(workdir / "cost-rt", tasks=1, episodes=2, steps=steps_each), 3),
        "robotwin_xpolicylab": (
            syn.write_robotwin(workdir / "cost-xpl", layout="xpolicylab", tasks=1, episodes=2, steps=steps_each),
            3,
        ),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # cost per core
    try:
        forward_ms, forward_how = _forward_ms_per_step(settings["forward"], batch)
        write_ms = {
            views: _write_ms_per_step(workdir / f"cost-store-{views}", views, 2 * steps_each)
            for views in sorted({views for _, views in cases.values()})
        }
        rows = []
        for name, (written, views) in cases.items():
            read, host, device = _stage_ms_per_step(written.path, batch)
            lean = read + host + write_ms[views][0]
            cpu_path = read + host + device + write_ms[views][1]
            shape = f"[steps, {views}, {TOKENS}, {CHANNELS}] float16"
            frame = open_source(written.path).read(open_source(written.path).episodes()[0].key, 0, 1).frames.shape[2:4]
            parts = (
                f"read+decode {read:.2f}, host preprocess+pin {host:.2f}, write {write_ms[views][0]:.2f} ms; "
                f"{views} views of {frame[0]}x{frame[1]}, {shape}, batch {batch}, 1 thread"
            )
            rows += [
                figure(f"cpu_ms_per_step_{name}", lean, forward_ms, "ms/step", f"{parts}; baseline: {forward_how}"),
                figure(
                    f"cpu_ms_per_step_{name}_cpu_preprocess",
                    cpu_path,
                    forward_ms,
                    "ms/step",
                    f"adds lanczos3/bicubic to {IMG_SIZE} on the CPU {device:.2f} ms and the float16 cast there "
                    f"(write {write_ms[views][1]:.2f} ms); baseline: {forward_how}",
                ),
                figure(
                    f"cores_per_gpu_at_100_steps_per_s_{name}",
                    lean / GPU_STEP_MS,
                    cpu_path / GPU_STEP_MS,
                    "cores",
                    "device preprocessing and cast; baseline: preprocessing and cast on the CPU",
                ),
            ]
        return rows
    finally:
        torch.set_num_threads(threads)


def _stage_ms_per_step(path: Path, batch: int) -> tuple[float, float, float]:
    """ms per step: read + decode, host preprocessing + pinning, and the device stage run on the CPU."""
    source = open_source(path)
    pieces = [
        (info.key, a, min(a + batch, info.num_steps))
        for info in source.episodes()
        for a in range(0, info.num_steps, batch)
    ]
    steps = sum(b - a for _, a, b in pieces)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    frames = [source.read(key, a, b).frames for key, a, b in pieces]
    read = time.perf_counter() - started
    started = time.perf_counter()
    staged = [(pinned(host_frames(f, MODE, IMG_SIZE), device), f.shape[2:4]) for f in frames]
    host = time.perf_counter() - started
    started = time.perf_counter()
    for tensor, size in staged:
        device_images(tensor, MODE, IMG_SIZE, size)
    on_cpu = time.perf_counter() - started
    return tuple(1000 * seconds / steps for seconds in (read, host, on_cpu))


def _write_ms_per_step(path: Path, views: int, steps: int) -> tuple[float, float]:
    """ms per step of `write_shard` at real shapes: float16 cast on the device, and float32 cast on the CPU."""
    values = np.random.default_rng(0).standard_normal((steps, views, TOKENS, CHANNELS), dtype=np.float32)
    out = []
    for k, given in enumerate((encode(values, "float16"), values)):
        config = scratch_store_config(steps, CHANNELS, views=tuple(f"v{i}" for i in range(views)))
        best = float("inf")
        for repeat in range(2):
            with lock_store(path / f"{k}-{repeat}"):
                cache = create_store(path / f"{k}-{repeat}", config)
                started = time.perf_counter()
                cache.write_shard(0, {0: given})
                best = min(best, time.perf_counter() - started)
        out.append(1000 * best / steps)
    return out[0], out[1]


def _forward_ms_per_step(weights: str | None, batch: int) -> tuple[float, str]:
    """The baseline: ms of one VGGT forward per 2-view step at `weights`, or GPU_STEP_MS without weights."""
    if weights is None:
        return GPU_STEP_MS, "10 ms, a GPU's time per step at 100 steps/s (ratio = cores per GPU)"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = batch if device.type == "cuda" else 1
    model, _ = load_vggt(weights, device)
    images = torch.rand(batch, 2, 3, IMG_SIZE, IMG_SIZE, device=device)
    sync = device_sync(device)
    with torch.inference_mode():
        if device.type == "cuda":
            model(images)
        sync()
        started = time.perf_counter()
        model(images)
        sync()
    seconds = time.perf_counter() - started
    return 1000 * seconds / batch, f"{weights} forward per 2-view step, batch {batch}, {device.type}"
