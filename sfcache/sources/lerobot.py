"""LeRobot datasets as LeRobot writes them (v2.1 and v3.0), columns taken from `meta/info.json`.

Cameras: every feature of dtype `image` (PNG/JPEG bytes in parquet, HF Image struct) or `video` (an mp4
per camera, LeRobot's default). Views are named by camera (`cam_high` for `observation.images.cam_high`),
by openpi's LIBERO aliases (`primary` = `image`, `wrist` = `wrist_image`), or mapped (`base=<column>`).
Vectors: `action` (or openpi's `actions`) and `observation.state` (or `state`), widths from info.json.
v2.1: `meta/episodes.jsonl` lists episodes; one parquet (and one mp4 per camera) per episode, paths from
      info.json's templates. v3.0: `meta/episodes/*/*.parquet` lists each episode's data file and global
      row range and, per video camera, its file and `from_timestamp`: many episodes share one file.
Frames are stored already rotated. Keys: `episode_<index:06d>`. episodes() reads metadata and parquet
footers; read() reads the needed columns of the row groups that hold the episode, and seeks each video once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sfcache.errors import SourceError
from sfcache.keys import episode_key
from sfcache.sources.base import Episode, EpisodeInfo, Source, require_finite, stack_views
from sfcache.sources.images import decode_views
from sfcache.sources.video import VideoFiles, frames_at

CAMERA_PREFIX = "observation.images."
OPENPI_VIEWS = {"primary": "image", "wrist": "wrist_image"}  # openpi's LIBERO conversion
VECTOR_COLUMNS = {"actions": ("action", "actions"), "proprio": ("observation.state", "state")}
V3_EPISODE_COLUMNS = ["episode_index", "tasks", "length", "data/chunk_index", "data/file_index", "dataset_from_index"]


@dataclass(frozen=True)
class Rows:
    """Where an episode is: its first row in the data file, and per video camera (file, from_timestamp)."""

    first: int
    videos: tuple[tuple[str, Path, float], ...] = ()


def _json_lines(file: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as err:
        raise SourceError(file, f"expected JSON lines ({type(err).__name__}: {err})") from None


class LeRobot(Source):
    """A LeRobot dataset root (the folder holding meta/ and data/, and videos/ for video cameras)."""

    format = "lerobot"
    view_keys: dict[str, str] = {}
    default_views = ("primary", "wrist")

    # --- columns from meta/info.json ------------------------------------------------------------

    def _info(self) -> dict:
        if "_info_json" in self.__dict__:
            return self.__dict__["_info_json"]
        file = self.path / "meta" / "info.json"
        try:
            info = json.loads(file.read_text())
            version = str(info["codebase_version"])
            info["data_path"].format(episode_chunk=0, episode_index=0, chunk_index=0, file_index=0)
            int(info["chunks_size"])
            features = dict(info["features"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise SourceError(
                file,
                f"expected LeRobot metadata with codebase_version, data_path, chunks_size and "
                f"features ({type(err).__name__}: {err})",
            ) from None
        if not version.startswith(("v2", "v3")):
            raise SourceError(file, f"codebase_version {version!r}; expected v2.x or v3.x", key="codebase_version")
        if any(f.get("dtype") == "video" for f in features.values() if isinstance(f, dict)) and not isinstance(
            info.get("video_path"), str
        ):
            raise SourceError(file, "video features but no video_path template", key="video_path")
        self.__dict__["_info_json"] = info
        return info

    def _cameras(self) -> dict[str, str]:
        """Camera column -> 'image' | 'video', in info.json order."""
        features = self._info()["features"]
        return {
            name: f["dtype"]
            for name, f in features.items()
            if isinstance(f, dict) and f.get("dtype") in ("image", "video")
        }

    def _view_keys(self) -> dict[str, str]:
        cameras = self._cameras()
        keys = {alias: column for alias, column in OPENPI_VIEWS.items() if column in cameras}
        keys.update(
            {column.removeprefix(CAMERA_PREFIX): column for column in cameras if column not in OPENPI_VIEWS.values()}
        )
        return keys

    def _default_views(self) -> tuple[str, ...]:
        keys = self._view_keys()
        return tuple(OPENPI_VIEWS) if all(alias in keys for alias in OPENPI_VIEWS) else tuple(keys)

    def _vector(self, role: str) -> tuple[str, int]:
        """(column, width) of the actions or the proprio, as info.json declares them."""
        features, file = self._info()["features"], self.path / "meta" / "info.json"
        for name in VECTOR_COLUMNS[role]:
            if name in features:
                try:
                    return name, int(np.prod(features[name]["shape"]))
                except (KeyError, TypeError, ValueError):
                    raise SourceError(file, "expected a feature with a shape", key=name) from None
        raise SourceError(
            file,
            f"no {' or '.join(map(repr, VECTOR_COLUMNS[role]))} feature (features: {list(features)})",
            key="features",
        )

    def _columns(self) -> tuple[list[str], list[str]]:
        """The chosen views' (image columns, video columns)."""
        cameras, chosen = self._cameras(), [self.view_keys[view] for view in self.views]
        file = self.path / "meta" / "info.json"
        for view, column in zip(self.views, chosen):
            if column not in cameras:
                raise SourceError(
                    file, f"view {view}={column}: not an image or video feature (cameras: {list(cameras)})", key=column
                )
        return ([c for c in chosen if cameras[c] == "image"], [c for c in chosen if cameras[c] == "video"])

    # --- listing ----------------------------------------------------------------------------------

    def _files(self) -> list[Path]:
        return sorted(
            [
                *self.path.glob("meta/*.json*"),
                *self.path.glob("meta/*.parquet"),
                *self.path.glob("meta/episodes/*/*.parquet"),
                *self.path.glob("data/*/*.parquet"),
                *self.path.glob("videos/**/*.mp4"),
            ]
        )

    def _scan(self) -> Iterator[Episode | SourceError]:
        info = self._info()
        images, videos = self._columns()
        vectors = [self._vector(role)[0] for role in VECTOR_COLUMNS]
        needed = {*images, *vectors, "frame_index", *(["timestamp"] if videos else [])}
        v3 = info["codebase_version"].startswith("v3")
        listing = self._listing_v3(info, videos) if v3 else self._listing_v2(info, videos)
        rows_in: dict[Path, int] = {}
        for item in listing:
            if isinstance(item, SourceError):
                yield item
                continue
            key, instruction, length, file, rows = item
            try:
                if length <= 0:
                    raise SourceError(file, "empty episode (0 steps in the episode metadata)", episode=key)
                if file not in rows_in:
                    rows_in[file] = self._check_file(file, key, needed)
                if rows.first + length > rows_in[file]:
                    raise SourceError(
                        file,
                        f"{rows_in[file]} rows, the episode metadata needs rows [{rows.first}, {rows.first + length})",
                        episode=key,
                    )
                for column, video, _ in rows.videos:
                    if not video.is_file():
                        raise SourceError(video, "missing video file for this camera", episode=key, key=column)
            except SourceError as err:
                yield err
                continue
            yield Episode(EpisodeInfo(key, instruction, length), file, rows)

    def _listing_v2(self, info: dict, videos: list[str]) -> Iterator[tuple | SourceError]:
        """(key, instruction, length, data file, Rows) per line of meta/episodes.jsonl."""
        meta = self.path / "meta" / "episodes.jsonl"
        for line in _json_lines(meta):
            try:
                index, length, instruction = int(line["episode_index"]), int(line["length"]), str(line["tasks"][0])
            except (KeyError, IndexError, TypeError, ValueError):
                yield SourceError(meta, f"line {line!r}: expected episode_index, length and tasks")
                continue
            chunk = index // int(info["chunks_size"])
            where = dict(episode_chunk=chunk, episode_index=index)
            yield (
                episode_key(index),
                instruction,
                length,
                self.path / info["data_path"].format(**where),
                Rows(0, tuple((c, self.path / info["video_path"].format(video_key=c, **where), 0.0) for c in videos)),
            )

    def _listing_v3(self, info: dict, videos: list[str]) -> Iterator[tuple | SourceError]:
        """The same from meta/episodes/*/*.parquet; rows are offsets inside the shared data file."""
        first_in_file: dict[Path, int] = {}
        entries = []
        video_columns = [
            f"videos/{c}/{field}" for c in videos for field in ("chunk_index", "file_index", "from_timestamp")
        ]
        for meta in sorted(self.path.glob("meta/episodes/*/*.parquet")):
            try:
                rows = pq.read_table(meta, columns=V3_EPISODE_COLUMNS + video_columns).to_pylist()
            except (OSError, pa.ArrowException, KeyError) as err:
                yield SourceError(
                    meta, f"expected episode metadata with columns {V3_EPISODE_COLUMNS + video_columns} ({err})"
                )
                continue
            for row in rows:
                file = self.path / info["data_path"].format(
                    chunk_index=row["data/chunk_index"], file_index=row["data/file_index"]
                )
                first_in_file[file] = min(first_in_file.get(file, row["dataset_from_index"]), row["dataset_from_index"])
                entries.append((row, file))
        if not entries:
            yield SourceError(self.path / "meta" / "episodes", "no episode metadata parquet files (LeRobot v3)")
        for row, file in entries:
            tasks = row["tasks"] or [""]
            where = tuple(
                (
                    c,
                    self.path
                    / info["video_path"].format(
                        video_key=c,
                        chunk_index=row[f"videos/{c}/chunk_index"],
                        file_index=row[f"videos/{c}/file_index"],
                    ),
                    float(row[f"videos/{c}/from_timestamp"]),
                )
                for c in videos
            )
            yield (
                episode_key(row["episode_index"]),
                str(tasks[0]),
                int(row["length"]),
                file,
                Rows(row["dataset_from_index"] - first_in_file[file], where),
            )

    @staticmethod
    def _check_file(file: Path, key: str, columns: set[str]) -> int:
        """The footer only: readable, the needed columns present; returns the row count."""
        try:
            metadata = pq.read_metadata(file)
        except FileNotFoundError:
            raise SourceError(file, "missing parquet file listed in the episode metadata", episode=key) from None
        except (OSError, pa.ArrowException) as err:
            raise SourceError(file, f"not a readable parquet file (truncated?): {err}", episode=key) from None
        names = metadata.schema.to_arrow_schema().names
        for column in sorted(columns):
            if column not in names:
                raise SourceError(file, f"missing column (has {names})", episode=key, key=column)
        return metadata.num_rows

    # --- reading ----------------------------------------------------------------------------------

    def _load(self, episode: Episode, columns: list[str]) -> pa.Table:
        """The episode's rows, reading only the row groups that hold them."""
        first, length = episode.where.first, episode.info.num_steps
        try:
            parquet = pq.ParquetFile(episode.file)
            groups, row, skip = [], 0, None
            for group in range(parquet.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                if row < first + length and row + rows > first:
                    skip = row if skip is None else skip
                    groups.append(group)
                row += rows
            table = parquet.read_row_groups(groups, columns=columns)
        except (OSError, pa.ArrowException) as err:
            raise SourceError(episode.file, f"cannot read: {err}", episode=episode.info.key) from None
        return table.slice(first - skip, length)

    def _rows(self, episode: Episode, start: int, stop: int) -> pa.Table:
        """Rows of steps [start, stop) (the episode's table is loaded once), checked to be in step order."""
        images, videos = self._columns()
        columns = [
            *images,
            *(self._vector(role)[0] for role in VECTOR_COLUMNS),
            "frame_index",
            *(["timestamp"] if videos else []),
        ]
        table = self._last_loaded(episode, lambda: self._load(episode, columns)).slice(start, stop - start)
        if table.column("frame_index").to_pylist() != list(range(start, stop)):
            raise SourceError(
                episode.file,
                f"frame_index is not {start}..{stop - 1} in row order",
                episode=episode.info.key,
                key="frame_index",
            )
        return table

    def _read_frames(self, episode: Episode, start: int, stop: int) -> np.ndarray:
        key, file, table = episode.info.key, episode.file, self._rows(episode, start, stop)
        videos = {column: (video, offset) for column, video, offset in episode.where.videos}
        per_view = []
        for view in self.views:
            column = self.view_keys[view]
            if column in videos:
                video, offset = videos[column]
                times = offset + table.column("timestamp").to_numpy().astype(np.float64)
                container = self._process_local("videos", VideoFiles).container(video, key, column)
                per_view.append(frames_at(container, times, video, key, column))
            else:
                per_view.append(
                    decode_views(
                        [self._image_bytes(table.column(column), file, key, column)],
                        (view,),
                        (column,),
                        start,
                        file,
                        key,
                    )[:, 0]
                )
        return stack_views(per_view, self.views, file, key)

    def _read_vectors(self, episode: Episode, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        key, file, table = episode.info.key, episode.file, self._rows(episode, start, stop)
        actions, state = (
            self._vectors(table.column(name), name, width, file, key, start)
            for name, width in map(self._vector, VECTOR_COLUMNS)
        )
        return actions, state

    @staticmethod
    def _image_bytes(column: pa.ChunkedArray, file: Path, key: str, name: str) -> list[bytes]:
        """HF Image struct {bytes, path} or a plain binary column."""
        if pa.types.is_struct(column.type):
            column = pa.chunked_array([chunk.field("bytes") for chunk in column.chunks], pa.binary())
        if not pa.types.is_binary(column.type) and not pa.types.is_large_binary(column.type):
            raise SourceError(file, f"type {column.type}, expected image bytes", episode=key, key=name)
        values = column.to_pylist()
        if any(value is None for value in values):
            raise SourceError(file, "image without embedded bytes (expected PNG/JPEG bytes)", episode=key, key=name)
        return values

    @staticmethod
    def _vectors(column: pa.ChunkedArray, name: str, width: int, file: Path, key: str, start: int) -> np.ndarray:
        try:
            values = np.asarray(column.to_pylist(), dtype=np.float32)
        except (TypeError, ValueError):
            values = np.empty(0)
        values = values[:, None] if values.ndim == 1 and width == 1 else values
        if values.ndim != 2 or values.shape[1] != width:
            raise SourceError(file, f"shape {values.shape}, expected float [T, {width}]", episode=key, key=name)
        require_finite(values, file, key, name, start)
        return values

    def _variant(self) -> str:
        return self._info()["codebase_version"]
