"""The one interface every dataset reader implements: episodes with stable keys, step ranges as frames.

`Source` does the work shared by all formats (catalog, skip_bad, range checks, rotation, provenance);
a format only says how to list its episodes (`_scan`) and how to read a step range's frames
(`_read_frames`) and its actions and proprio (`_read_vectors`), so `read(..., frames=False)` decodes
no image (a trainer's action chunk needs only the vectors of the next steps). A format that records metric
depth also says how to read it (`_read_depth`, for `read(..., depth=True)`; LIBERO HDF5 only).
What is checked where:
  episodes(): structure (files open, keys present, shapes/dtypes, lengths agree, no empty episode,
              instruction present, container framing/CRC); a bad episode raises or, with skip_bad,
              is left out and listed in `skipped`.
  read():     contents (JPEG/PNG decode, equal frame sizes, finite actions/proprio); always raises.
"""

from __future__ import annotations

import hashlib
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sfcache.errors import SfcacheError, SourceError
from sfcache.progress import progress_bar
from sfcache.sources.images import check_frame_sizes


@dataclass(frozen=True)
class EpisodeInfo:
    """What a source knows about an episode without decoding any frame."""

    key: str  # stable across runs, e.g. "libero_spatial/<task_name>/demo_12"
    instruction: str
    num_steps: int


@dataclass
class Steps:
    """A step range of one episode, frames as the policy sees them."""

    frames: np.ndarray | None  # uint8 [T, V, H, W, 3] RGB, views in the source's order; None: not read
    actions: np.ndarray  # float32 [T, A]
    proprio: np.ndarray  # float32 [T, P]
    depth: np.ndarray | None = None  # float32 [T, V, H, W] metres, turned and ordered like frames; None: not read


@dataclass(frozen=True)
class Episode:
    """A catalog entry: the public info plus where the format's reader finds the episode."""

    info: EpisodeInfo
    file: Path
    where: Any = None  # format-specific locator: HDF5 group name, record offset, row range


def natural_key(text: str) -> list:
    """Sort 'demo_2' before 'demo_10' so keys come out in recording order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def require_finite(values: np.ndarray, file: Path, episode: str, key: str, first_step: int) -> None:
    """NaN or inf in actions/proprio would silently poison training: name the first bad step."""
    bad = ~np.isfinite(values)
    if bad.any():
        step = first_step + int(np.argwhere(bad)[0][0])
        raise SourceError(file, f"non-finite value at step {step} (expected finite numbers)", episode=episode, key=key)


class Source(ABC):
    """A dataset on disk read lazily; never loads the whole dataset.

    Safe to pickle into worker processes: the catalog travels, open file handles do not.
    """

    format: str  # registry name, e.g. "libero_hdf5"
    view_keys: dict[str, str]  # canonical view name -> on-disk name
    default_views: tuple[str, ...]
    default_rotate: bool = False  # LIBERO HDF5 stores frames upside down
    jpeg_fast_dct: bool = False  # IFAST JPEG DCT as TF decodes (set by `--recipe openvla-oft`; RLDS reads it)
    jpeg_frames: bool = False  # the format stores every frame as JPEG bytes, so a read decodes JPEGs

    def __init__(
        self,
        path: str | Path,
        views: tuple[str, ...] | None = None,
        *,
        rotate: bool | None = None,
        skip_bad: bool = False,
    ):
        self.path = Path(path)
        if not self.path.exists():
            raise SourceError(self.path, "no such file or directory")
        wanted, self.view_map = parse_views(self.path, self._default_views() if views is None else views)
        self.view_keys = {**self._view_keys(), **self.view_map}  # view name -> on-disk name, this dataset's
        unknown = [view for view in wanted if view not in self.view_keys]
        if unknown or not wanted or len(set(wanted)) != len(wanted):
            raise SfcacheError(
                f"{self.path}: views {list(wanted)} not usable for {self.format}; "
                f"choose distinct names from {list(self.view_keys)} or map name=column"
            )
        self.views = wanted  # view names, in the order VGGT sees them
        self.rotate = self.default_rotate if rotate is None else bool(rotate)
        self.skip_bad = skip_bad
        self.skipped: list[SourceError] = []
        self._catalog: dict[str, Episode] | None = None

    # --- what a format implements -------------------------------------------------------------

    @abstractmethod
    def _files(self) -> list[Path]:
        """The data files of the dataset, sorted (for the fingerprint)."""

    @abstractmethod
    def _scan(self) -> Iterator[Episode | SourceError]:
        """Every episode after cheap structural checks; a bad one is yielded as its error."""

    @abstractmethod
    def _read_frames(self, episode: Episode, start: int, stop: int) -> np.ndarray:
        """uint8 [T, V, H, W, 3] of steps [start, stop) as stored (before rotation); decoded and checked."""

    @abstractmethod
    def _read_vectors(self, episode: Episode, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """float32 (actions [T, A], proprio [T, P]) of steps [start, stop), checked finite."""

    def _read_depth(self, episode: Episode, start: int, stop: int) -> np.ndarray:
        """float32 [T, V, H, W] metric depth of steps [start, stop) as stored (before rotation); formats
        that record depth override this."""
        raise SourceError(
            episode.file, f"the {self.format} format records no depth (depth is read from LIBERO HDF5 only)"
        )

    def _view_keys(self) -> dict[str, str]:
        """Canonical view name -> on-disk name; formats whose cameras come from metadata compute it."""
        return dict(self.view_keys)

    def _default_views(self) -> tuple[str, ...]:
        return self.default_views

    def _variant(self) -> str | None:
        """Which flavour of the format was found, recorded in describe() (None if only one)."""
        return None

    # --- the public interface -------------------------------------------------------------------

    def episodes(self) -> list[EpisodeInfo]:
        """All episodes in a stable order (natural sort of keys)."""
        return [episode.info for episode in self._entries().values()]

    def read(
        self, key: str, start: int = 0, stop: int | None = None, *, frames: bool = True, depth: bool = False
    ) -> Steps:
        """Steps [start, stop) of episode `key`, frames as the policy sees them (None when `frames=False`), and with
        `depth` the metric depth of each view, turned like the frames."""
        episode = self._entries().get(key)
        if episode is None:
            keys = list(self._entries())
            hint = f"e.g. {keys[0]!r}" if keys else "it has none"
            raise SourceError(self.path, f"no such episode ({len(keys)} episodes, {hint})", episode=key)
        length = episode.info.num_steps
        stop = length if stop is None else stop
        if not 0 <= start < stop <= length:
            raise SourceError(
                episode.file, f"step range [{start}, {stop}) outside the episode's {length} steps", episode=key
            )
        images = self._read_frames(episode, start, stop) if frames else None
        if images is not None and self.rotate:
            images = rotate_180(images)
        metres = self._read_depth(episode, start, stop) if depth else None
        if metres is not None and self.rotate:
            metres = np.ascontiguousarray(metres[..., ::-1, ::-1])
        actions, proprio = self._read_vectors(episode, start, stop)
        return Steps(images, actions, proprio, metres)

    def describe(self) -> dict:
        """Provenance recorded in a store: format, path, views, orientation, file fingerprint."""
        description = {
            "format": self.format,
            "path": str(self.path.resolve()),
            "views": list(self.views),
            "rotate": self.rotate,
            "fingerprint": self.fingerprint(),
        }
        if self.view_map:
            description["view_map"] = {view: self.view_map[view] for view in self.views if view in self.view_map}
        variant = self._variant()
        if variant is not None:
            description["variant"] = variant
        return description

    def fingerprint(self) -> str:
        """sha256 over (relative path, size, mtime) of every data file: changes when the data does."""
        root = self.path if self.path.is_dir() else self.path.parent
        digest = hashlib.sha256()
        for file in self._files():
            stat = file.stat()
            digest.update(f"{file.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return "sha256:" + digest.hexdigest()

    # --- shared machinery -----------------------------------------------------------------------

    def _entries(self) -> dict[str, Episode]:
        if self._catalog is None:
            found: list[Episode] = []
            skipped: list[SourceError] = []
            with progress_bar(unit="episodes", transient=True) as progress:  # big datasets take seconds
                task = progress.add_task(f"indexing {self.path.name}", total=None)
                for item in self._scan():
                    if isinstance(item, SourceError):
                        if not self.skip_bad:
                            raise item
                        skipped.append(item)
                    else:
                        found.append(item)
                    progress.advance(task)
            found.sort(key=lambda episode: natural_key(episode.info.key))
            catalog = {episode.info.key: episode for episode in found}
            if len(catalog) != len(found):
                raise SourceError(self.path, "two episodes map to the same key (expected unique keys)")
            self._catalog, self.skipped = catalog, skipped
        return self._catalog

    def __getstate__(self) -> dict:
        """Drop per-process state (open handles) so every worker opens its own files."""
        state = self.__dict__.copy()
        state.pop("_handles", None)
        return state

    def _process_local(self, name: str, factory: Callable[[], Any]) -> Any:
        """A per-process object (file handle cache): rebuilt after fork or unpickling."""
        handles = self.__dict__.get("_handles")
        if handles is None or handles[0] != os.getpid():
            handles = self.__dict__["_handles"] = (os.getpid(), {})
        if name not in handles[1]:
            handles[1][name] = factory()
        return handles[1][name]

    def _last_loaded(self, episode: Episode, load: Callable[[], Any]) -> Any:
        """Keep the last episode a format loads whole (RLDS record, LeRobot table): step-by-step
        readers then pay for one load per episode, not per step."""
        last = self._process_local("last", dict)
        if last.get("key") != episode.info.key:
            last.clear()
            last.update(key=episode.info.key, value=load())
        return last["value"]


def parse_views(path: Path, views: tuple[str, ...] | list[str]) -> tuple[tuple[str, ...], dict[str, str]]:
    """`--views` entries in VGGT order: a view name (`primary`) or `name=column` naming the on-disk camera
    (`base=observation.images.cam_high`); returns the names and the explicit mapping."""
    names, mapping = [], {}
    for entry in views:
        name, equals, column = (part.strip() for part in str(entry).partition("="))
        if equals:
            if not name or not column:
                raise SfcacheError(
                    f"{path}: view {entry!r}: expected name=column, e.g. base=observation.images.cam_high"
                )
            mapping[name] = column
        names.append(name)
    return tuple(names), mapping


def recorded_views(description: dict) -> tuple[str, ...]:
    """The `views` argument that reopens a source as `describe()` recorded it (names and mapping)."""
    mapping = description.get("view_map", {})
    return tuple(f"{view}={mapping[view]}" if view in mapping else view for view in description["views"])


def rotate_180(frames: np.ndarray) -> np.ndarray:
    """[..., H, W, 3] turned 180 degrees; moving whole 3-byte pixels is ~2x faster than byte strides."""
    pixels = np.ascontiguousarray(frames).view(np.dtype((np.void, 3)))[..., 0]
    return np.ascontiguousarray(pixels[..., ::-1, ::-1]).view(np.uint8).reshape(frames.shape)


def stack_views(views: list[np.ndarray], names: tuple[str, ...], file: Path, episode: str) -> np.ndarray:
    """[V] arrays [T, H, W, 3] -> [T, V, H, W, 3]; VGGT needs one frame size across views."""
    check_frame_sizes([array.shape[1:] for array in views], names, file, episode)
    return np.stack(views, axis=1)
