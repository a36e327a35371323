"""The Zarr v3 target store: pooled VGGT targets keyed by flat step rows, written shard by shard.

One module per job: `encoding` (stored dtypes, numpy and torch), `layout` (arrays), `config` (what a store is asked
to hold), `run_control` (the lock and the run fence), `cache` (reads), `integrity` (checks against the disk),
`writer` (create, resume, writes and repair); the schema of attrs["sfcache"] is `sfcache.provenance`. Everything a
user or another module needs is importable from here, `open_cache` first.
"""

from __future__ import annotations

from pathlib import Path

from sfcache.errors import StoreError
from sfcache.rows import EpisodeRecord, RowIndex, pack_episodes
from sfcache.store.cache import Cache, read_attrs
from sfcache.store.config import Reduction, StoreConfig
from sfcache.store.encoding import DTYPES, Encoded, decode, encode, int8_block
from sfcache.store.layout import (
    CODECS,
    DIGESTS_ARRAY,
    DONE_ARRAY,
    ERROR_LOG,
    FORMAT_VERSION,
    MASK_ARRAY,
    layer_array,
    step_bytes,
)
from sfcache.store.run_control import LOCK_NAME, RUN_NAME, current_run, is_locked, lock_store, store_run
from sfcache.store.writer import StoreWriter, create, create_store, resumable_reduction, resume

__all__ = [
    "CODECS",
    "DIGESTS_ARRAY",
    "DONE_ARRAY",
    "DTYPES",
    "ERROR_LOG",
    "FORMAT_VERSION",
    "LOCK_NAME",
    "MASK_ARRAY",
    "RUN_NAME",
    "Cache",
    "Encoded",
    "EpisodeRecord",
    "Reduction",
    "RowIndex",
    "StoreConfig",
    "StoreWriter",
    "create",
    "create_store",
    "current_run",
    "decode",
    "encode",
    "int8_block",
    "is_locked",
    "layer_array",
    "lock_store",
    "open_cache",
    "pack_episodes",
    "read_attrs",
    "resumable_reduction",
    "resume",
    "step_bytes",
    "store_run",
]


def open_cache(path: str | Path, mode: str = "r", complete: bool = False, verify: bool = False) -> Cache:
    """Open a store: "r" reads (`Cache`), "r+" also writes shards and done flags (`StoreWriter`, an extraction task
    or a repair). `complete` also requires every field a full `sf extract` records (the provenance's required
    fields); `verify` checks each shard's files against their recorded digests before its first read (one more
    read of the shard)."""
    if mode not in ("r", "r+"):
        raise StoreError(f"{path}: mode must be 'r' or 'r+', got {mode!r}")
    cache = Cache(path, complete=complete) if mode == "r" else StoreWriter(path)
    cache.verify = verify
    return cache
