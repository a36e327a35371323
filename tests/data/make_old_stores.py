"""Writes tests/data/old_stores/: small stores as an earlier sfcache wrote them (tests/test_store_compat.py reads and
resumes them with today's code). Made with the code of commit c8760c4 (the last single-module sfcache/store.py):

    git archive c8760c4 sfcache | tar -x -C /tmp/old && PYTHONPATH=/tmp/old python -m tests.data.make_old_stores

Each store has its last shard left unwritten, so that resuming it has work to do.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from sfcache.sources.base import EpisodeInfo
from sfcache.store import StoreConfig, create_store, lock_store, pack_episodes

HERE = Path(__file__).resolve().parent / "old_stores"
LAYER = 3
VARIANTS = {"float16": {"dtype": "float16"}, "int8": {"dtype": "int8", "codec": "zstd", "checksum": True}}


def config(name: str) -> StoreConfig:
    """The configuration the store `name` was made with (its `created` is not part of its identity)."""
    episodes = pack_episodes(
        [
            EpisodeInfo("suite/a/demo_0", "pick the bowl", 5),
            EpisodeInfo("suite/a/demo_1", "place the bowl", 7),
            EpisodeInfo("suite/b/demo_0", "open the drawer", 3),
        ]
    )
    return StoreConfig(
        episodes=episodes,
        layers=(LAYER,),
        grid=(2, 3),
        native_grid=(4, 4),
        aspect_ratio=1.0,
        views=("primary", "wrist"),
        channels=8,
        vggt={
            "weights": "random:tiny",
            "weights_id": "random:tiny+seed0",
            "config": {"depth": 4},
            "preprocess": "sf",
            "compute_dtype": "float32",
        },
        source={
            "format": "libero_hdf5",
            "path": "/data/libero",
            "views": ["primary", "wrist"],
            "rotate": True,
            "fingerprint": "sha256:0",
        },
        steps_per_shard=4,
        created="2026-12-07T00:00:00+00:00",
        **VARIANTS[name],
    )


def targets(config: StoreConfig) -> np.ndarray:
    """float32 [N, V, h*w, C]: what each store holds, before encoding."""
    rng = np.random.default_rng(7)
    shape = (config.num_steps, len(config.views), config.grid[0] * config.grid[1], config.channels)
    return (rng.standard_normal(shape) * rng.uniform(0.1, 10, size=(1, 1, 1, config.channels))).astype(np.float32)


def write(path: Path, config: StoreConfig, shards: range | None = None) -> None:
    """`config`'s store at `path` with `shards` written (default: all but the last)."""
    values = targets(config)
    with lock_store(path):
        cache = create_store(path, config)
        for shard in range(cache.num_shards - 1) if shards is None else shards:
            cache.write_shard(shard, {LAYER: values[cache.shard_rows(shard)]})


if __name__ == "__main__":
    for name in VARIANTS:
        shutil.rmtree(HERE / name, ignore_errors=True)
        write(HERE / name, config(name))
