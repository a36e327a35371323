"""Dataset readers: one module per on-disk format behind one interface (see base.py).

src = open_source(path)                      # format detected from the files
for info in src.episodes(): steps = src.read(info.key, 0, 8)
"""

from __future__ import annotations

from pathlib import Path

import h5py

from sfcache.errors import SfcacheError, SourceError
from sfcache.sources.base import Episode, EpisodeInfo, Source, Steps, recorded_views
from sfcache.sources.hdf5 import open_h5
from sfcache.sources.lerobot import LeRobot
from sfcache.sources.libero_hdf5 import LiberoHDF5
from sfcache.sources.libero_rlds import LiberoRLDS
from sfcache.sources.robotwin import RoboTwin

FORMATS: dict[str, type[Source]] = {cls.format: cls for cls in (LiberoHDF5, LiberoRLDS, LeRobot, RoboTwin)}

__all__ = ["FORMATS", "Episode", "EpisodeInfo", "Source", "Steps", "detect_format", "open_source", "recorded_views"]


def open_source(
    path: str | Path,
    format: str = "auto",
    views: tuple[str, ...] | None = None,
    rotate: bool | None = None,
    skip_bad: bool = False,
) -> Source:
    """Open a dataset lazily; nothing is decoded until read().

    format: "auto" or a name in FORMATS. views: names in VGGT order (format default if None), each a
    view name or `name=column` mapping an on-disk camera (any LeRobot `observation.images.*`, a RoboTwin camera).
    rotate: turn frames 180 degrees (default: only LIBERO HDF5). skip_bad: leave structurally bad
    episodes out (listed in `source.skipped`) instead of raising the first SourceError.
    """
    path = Path(path)
    if format == "auto":
        format = detect_format(path)
    if format not in FORMATS:
        raise SfcacheError(f"unknown source format {format!r}; choose 'auto' or one of {list(FORMATS)}")
    return FORMATS[format](path, views, rotate=rotate, skip_bad=skip_bad)


def detect_format(path: Path) -> str:
    """Tell the format from marker files (TFDS/LeRobot metadata) or the first HDF5 file's groups."""
    if not path.exists():
        raise SourceError(path, "no such file or directory")
    if path.is_dir():
        if (path / "meta" / "info.json").is_file():
            return "lerobot"
        if (
            any(path.glob("dataset_info.json"))
            or any(path.glob("*/dataset_info.json"))
            or any(path.glob("*/*/dataset_info.json"))
        ):
            return "libero_rlds"
        first = next(iter(sorted(path.rglob("*.hdf5"))), None)
        if first is None:
            raise SourceError(
                path,
                "cannot tell the dataset format: no meta/info.json (LeRobot), "
                "dataset_info.json (RLDS) or .hdf5 files (LIBERO, RoboTwin); give the dataset's own folder, "
                f"or --format one of {', '.join(FORMATS)}",
            )
        path = first
    with open_h5(path) as h5:
        groups = set(h5)
        if isinstance(h5.get("data"), h5py.Group):
            return "libero_hdf5"
    if groups & {"observation", "vision"}:
        return "robotwin"
    raise SourceError(
        path,
        f"cannot tell the dataset format from HDF5 groups {sorted(groups)} (expected data/ "
        f"for LIBERO, observation/ or vision/ for RoboTwin)",
    )
