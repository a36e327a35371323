"""What every inspection reads through: the complete store, its extracted rows, its source as extraction read it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sfcache.errors import StoreError
from sfcache.recipes import get_recipe
from sfcache.sources import Source, open_source, recorded_views
from sfcache.store import Cache, is_locked, open_cache


def open_store(path: str | Path) -> Cache:
    """open_cache, requiring the complete provenance `sf extract` records (so no half-store gives a KeyError)."""
    return open_cache(path, complete=True)


def shown_layer(cache: Cache, layer: int | None) -> int:
    """The stored layer a report shows: the asked one (StoreError naming the stored layers), else the last."""
    return cache.resolve_layer(cache.layers[-1] if layer is None else layer)


def extracted_rows(cache: Cache, purpose: str) -> np.ndarray:
    """All rows in done shards, ascending; StoreError if there are none."""
    shards = np.flatnonzero(cache.done_shards())
    if shards.size == 0:
        raise StoreError(f"{cache.path}: no shard is extracted yet; nothing to {purpose}")
    return np.concatenate([np.arange(cache.shard_rows(int(s)).start, cache.shard_rows(int(s)).stop) for s in shards])


def open_recorded_source(cache: Cache, source_path: str | Path | None) -> Source:
    """The dataset exactly as extraction read it: recorded format, views (order), rotation, recipe's decode."""
    recorded = cache.provenance.source
    source = open_source(
        source_path or recorded["path"], recorded["format"], recorded_views(recorded), rotate=recorded["rotate"]
    )
    source.jpeg_fast_dct = get_recipe(cache.recipe).jpeg_fast_dct
    return source


def lock_state(path: Path) -> str:
    """What a lock file means: a live extractor holds it (flock), or one stopped mid-run and left it."""
    if is_locked(path):
        return "store is locked: an extractor is writing it now"
    return (
        "store was left locked by an extractor that stopped mid-run; run `sf extract` again to finish "
        "(the leftover file blocks nothing)"
    )
