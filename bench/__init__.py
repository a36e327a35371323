"""Benchmarks: every figure is a ratio against a baseline measured in the same run."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from sfcache.errors import SfcacheError
from sfcache.sources import EpisodeInfo
from sfcache.store import StoreConfig, pack_episodes

PRESETS = ("tiny", "vggt-1b")  # BENCH_PRESET: tiny (CPU, minutes) or vggt-1b (the full architecture, a GPU)


def preset_settings(settings: dict, preset: str, area: str) -> dict:
    """An area's settings for `preset`, one of PRESETS (the one list every area and entry point checks);
    an unknown one is an error, never a silent tiny run."""
    if preset not in PRESETS:
        raise SfcacheError(
            f"bench {area}: unknown preset {preset!r} (BENCH_PRESET / --preset); expected one of {', '.join(PRESETS)}"
        )
    return settings[preset]


def row(
    area: str, metric: str, value: float, baseline: float, unit: str, notes: str, device: str | None = None
) -> dict:
    """One figure of report.json, the same shape from every area: `ratio` is value / baseline (NaN for a zero
    baseline, never a crash); without `device` bench.run fills in the machine's."""
    figure = {
        "bench": area,
        "metric": metric,
        "value": float(value),
        "baseline": float(baseline),
        "ratio": float(value) / float(baseline) if baseline else float("nan"),
        "unit": unit,
        "notes": notes,
    }
    if device is not None:
        figure["device"] = device
    return figure


def best_seconds(repeats: int, work: Callable[[], object], sync: Callable[[], None] = lambda: None) -> float:
    """Fastest of `repeats` timed runs of `work`, each followed by `sync` inside the timing (a GPU's queued
    kernels count, not just their launch)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        sync()
        best = min(best, time.perf_counter() - started)
    return best


def device_sync(device: torch.device) -> Callable[[], None]:
    """What waits for `device`'s queued work before a clock is read: CUDA runs kernels asynchronously."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def scratch_store_config(steps: int, channels: int, **fields) -> StoreConfig:
    """A benchmark's scratch store: one episode of `steps` in one shard, layer 0, two views of 16x16 tokens cropped
    from VGGT's 37x37, square, no provenance; `fields` are what an area varies (dtype, codec, views, ...)."""
    defaults = {
        "episodes": pack_episodes([EpisodeInfo("bench", "", steps)]),
        "layers": (0,),
        "grid": (16, 16),
        "native_grid": (37, 37),
        "aspect_ratio": 1.0,
        "views": ("primary", "wrist"),
        "vggt": {},
        "source": {},
        "steps_per_shard": steps,
    }
    return StoreConfig(**{**defaults, "channels": channels, **fields})
