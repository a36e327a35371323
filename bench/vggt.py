"""VGGT forward and preprocessing throughput (frames/s, best of a few runs), each against a same-run baseline.

- stop early: SF-style targets from a middle layer computed by stopping there, against a full-depth forward.
- autocast (CUDA only): the default bf16/fp16 autocast against plain fp32.
- sf preprocessing of 256x256 frames (TF-exact lanczos3 to 224, then bicubic to img_size) against PIL's
  lanczos resize + the same upsample: the price of matching the RLDS pipeline bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import best_seconds, device_sync, preset_settings, row
from sfcache.vggt import load_vggt, preprocess
from sfcache.vggt.preprocess import POLICY_SIZE

PRESETS = {
    "tiny": {"weights": "random:tiny", "batch": 4, "views": 2, "repeats": 3, "frames": 64},
    "vggt-1b": {"weights": "random:vggt-1b", "batch": 4, "views": 2, "repeats": 3, "frames": 256},
}


def _best_rate(frames: int, work: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    work()  # warm-up: kernels, caches, allocator
    sync()
    return frames / best_seconds(repeats, work, sync)


def run(workdir: Path, preset: str) -> list[dict]:
    settings = preset_settings(PRESETS, preset, "vggt")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = device_sync(device)
    model, _ = load_vggt(settings["weights"], device)
    size, depth = model.config.img_size, model.config.depth
    batch, views, repeats = settings["batch"], settings["views"], settings["repeats"]
    frames = np.random.default_rng(0).integers(0, 256, (batch, views, POLICY_SIZE, POLICY_SIZE, 3), dtype=np.uint8)
    images = preprocess(frames, "sf", size).to(device)
    count = batch * views
    middle = depth // 2 - 1
    shape = f"[{batch}, {views}, 3, {size}, {size}], {settings['weights']}"

    rows = [
        row(
            "vggt",
            "forward to a middle layer",
            _best_rate(count, lambda: model(images, layers=(middle,)), repeats, sync),
            _best_rate(count, lambda: model(images, layers=(-1,)), repeats, sync),
            "frames/s",
            f"layer {middle} vs all {depth} layers; {shape}",
        )
    ]
    if device.type == "cuda":
        fp32, _ = load_vggt(settings["weights"], device, compute_dtype=torch.float32)
        rows.append(
            row(
                "vggt",
                "forward under autocast",
                _best_rate(count, lambda: model(images), repeats, sync),
                _best_rate(count, lambda: fp32(images), repeats, sync),
                "frames/s",
                f"{model.compute_dtype_for(device)} vs float32; {shape}",
            )
        )

    raw = np.random.default_rng(1).integers(0, 256, (settings["frames"], 1, 256, 256, 3), dtype=np.uint8)

    def pil_lanczos() -> torch.Tensor:
        small = np.stack(
            [
                np.array(Image.fromarray(f).resize((POLICY_SIZE, POLICY_SIZE), Image.Resampling.LANCZOS))
                for f in raw[:, 0]
            ]
        )
        return preprocess(small[:, None], "sf", size)

    rows.append(
        row(
            "vggt",
            "sf preprocess 256->224->img_size",
            _best_rate(len(raw), lambda: preprocess(raw, "sf", size), repeats, lambda: None),
            _best_rate(len(raw), pil_lanczos, repeats, lambda: None),
            "frames/s",
            f"TF-exact lanczos3 vs PIL lanczos, then bicubic to {size}; CPU, {torch.get_num_threads()} threads",
        )
    )
    return rows
