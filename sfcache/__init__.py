"""sfcache: run VGGT once over a robot dataset, store Spatial Forcing targets, train from the store."""

from __future__ import annotations

from sfcache.version import __version__

__all__ = ["__version__", "open_cache"]


def open_cache(path, mode: str = "r", verify: bool = False):
    """Open a target store (read-only by default; `verify`: check each shard against its recorded digests before
    its first read). See sfcache.store.Cache."""
    from sfcache.store import open_cache as _open

    return _open(path, mode=mode, verify=verify)
