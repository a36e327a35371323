"""Fixtures for the trainer tests: a small LIBERO dataset and target stores written through the store API.

Running the Dask extractor takes tens of seconds even for a few steps, so these stores are written
with `create_store` / `write_shard` directly: same layout and provenance, targets that follow the
image content (pooled pixels through a fixed random projection), so the SF loss has something to learn.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sfcache.sources import open_source
from sfcache.sources.synthetic import write_libero_hdf5
from sfcache.store import StoreConfig, create_store, lock_store, pack_episodes
from sfcache.vggt import VGGTConfig

GRID = 4  # policy and cache: 4x4 tokens per view (56 px images), small enough for CPU tests
CHANNELS = 32
LAYER = 3


def write_dataset(root: Path, demos: int = 8, steps: int = 20, seed: int = 0) -> Path:
    """LIBERO HDF5, 2 tasks x `demos` demos x `steps` steps, 64 px frames."""
    return write_libero_hdf5(root, tasks=2, demos=demos, steps=steps, size=64, seed=seed).path


def content_targets(frames: np.ndarray, grid: int, channels: int) -> np.ndarray:
    """uint8 [T, V, H, W, 3] -> float32 [T, V, grid*grid, C]: area-pooled colour through a fixed projection."""
    pixels = torch.from_numpy(frames).float().div(255).flatten(0, 1).permute(0, 3, 1, 2)
    pooled = F.adaptive_avg_pool2d(pixels, grid).flatten(2).transpose(1, 2)  # [T*V, g*g, 3]
    projection = torch.from_numpy(np.random.default_rng(0).normal(size=(3, channels)).astype(np.float32))
    values = torch.tanh(2 * (pooled - 0.5) @ projection)
    return values.reshape(*frames.shape[:2], grid * grid, channels).numpy()


def write_store(
    path: Path,
    source_path: Path,
    *,
    views: tuple[str, ...] | None = None,
    grid: int = GRID,
    channels: int = CHANNELS,
    steps_per_shard: int = 16,
    unfinished_shards: int = 0,
) -> Path:
    """A complete store for the dataset (or with its last `unfinished_shards` shards not done)."""
    source = open_source(source_path, views=views)
    config = StoreConfig(
        episodes=pack_episodes(source.episodes()),
        layers=(LAYER,),
        grid=(grid, grid),
        native_grid=(16, 16),
        aspect_ratio=1.0,
        views=source.views,
        channels=channels,
        vggt={
            "weights": "random:tiny",
            "weights_id": "random:tiny+seed0",
            "config": VGGTConfig.tiny().to_dict(),
            "preprocess": "sf",
            "compute_dtype": "float32",
        },
        source=source.describe(),
        steps_per_shard=steps_per_shard,
    )
    rows = np.concatenate([content_targets(source.read(e.key).frames, grid, channels) for e in source.episodes()])
    with lock_store(path):
        cache = create_store(path, config)
        for shard in range(config.num_shards - unfinished_shards):
            span = cache.shard_rows(shard)
            cache.write_shard(shard, {LAYER: rows[span]})
    return path


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (to prove training leaves a store untouched)."""
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }
