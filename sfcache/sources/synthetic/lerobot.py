"""LeRobot datasets (v2.1, v3.0) with openpi's LIBERO column names or LeRobot's own, video cameras included."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sfcache.keys import episode_key
from sfcache.sources.images import encode_png
from sfcache.sources.libero_hdf5 import instruction_from_file_name
from sfcache.sources.synthetic.libero import LIBERO_TASKS
from sfcache.sources.synthetic.scenes import ExpectedEpisode, Written, episode_motion, render_episode

LEROBOT_CAMERAS = {
    "openpi": ["image", "wrist_image"],
    "lerobot": [
        "observation.images.cam_high",
        "observation.images.cam_left_wrist",
        "observation.images.cam_right_wrist",
    ],
}
LEROBOT_VECTORS = {"openpi": ("actions", "state"), "lerobot": ("action", "observation.state")}
_LEROBOT_SCALARS = [
    ("timestamp", "float32"),
    ("frame_index", "int64"),
    ("episode_index", "int64"),
    ("index", "int64"),
    ("task_index", "int64"),
]
_FPS = 10


def write_lerobot(root: Path, *, episodes: int = 3, steps: int = 8, size: int = 256, version: str = "v2.1",
                  names: str = "openpi", cameras: int = 2, videos: int = 0, action_dim: int | None = None,
                  state_dim: int | None = None, seed: int = 0) -> Written:  # fmt: skip
    """A LeRobot dataset: v2.1 (one parquet and one mp4 per camera per episode, meta/*.jsonl) or v3.0
    (episodes packed into one data file in row groups of 3 and one mp4 per camera, meta/episodes/*.parquet).

    names: "openpi" (`image`, `wrist_image`, `state` (8), `actions` (7)) or "lerobot"
    (`observation.images.cam_high` / `cam_left_wrist` / `cam_right_wrist`, `observation.state`, `action`, 14 each).
    videos: how many of the cameras (the first ones) are stored as video the way LeRobot encodes them
    (AV1 with libsvtav1, yuv420p, GOP 2, crf 30); the others as PNG bytes in parquet. Expected frames of a
    video camera are the frames a sequential decode of the written file returns.
    """
    if version not in ("v2.1", "v3.0"):
        raise ValueError(f"version must be 'v2.1' or 'v3.0', not {version!r}")
    if videos and size < 32:
        raise ValueError(f"video frames of {size} px: libsvtav1 needs at least 32 (smaller ones crash it)")
    columns = LEROBOT_CAMERAS[names][:cameras]
    action_name, state_name = LEROBOT_VECTORS[names]
    action_dim = action_dim or (7 if names == "openpi" else 14)
    state_dim = state_dim or (8 if names == "openpi" else 14)
    root = Path(root)
    (root / "meta").mkdir(parents=True, exist_ok=True)
    written = Written(root, "lerobot")
    rng = np.random.default_rng(seed)
    tasks = [
        instruction_from_file_name(Path(t))
        for suite in ("libero_spatial", "libero_10")
        for t in LIBERO_TASKS[suite][:2]
    ]
    video_columns, image_columns = columns[:videos], columns[videos:]
    schema = _lerobot_schema(image_columns, (action_name, action_dim), (state_name, state_dim))
    tables, listing, rendered, total = [], [], [], 0
    for index in range(episodes):
        task_index = index % len(tasks)
        actions, path = episode_motion(rng, steps, action_dim)
        frames = render_episode(path, len(columns), size, size)
        state = np.concatenate([path, rng.normal(size=(steps, state_dim - 2))], axis=1).astype(np.float32)
        tables.append(
            pa.table(
                {
                    **{
                        c: [{"bytes": encode_png(f), "path": None} for f in frames[:, columns.index(c)]]
                        for c in image_columns
                    },
                    state_name: state.tolist(),
                    action_name: actions.tolist(),
                    "timestamp": np.arange(steps, dtype=np.float32) / _FPS,
                    "frame_index": np.arange(steps),
                    "episode_index": np.full(steps, index),
                    "index": total + np.arange(steps),
                    "task_index": np.full(steps, task_index),
                },
                schema=schema,
            )
        )
        listing.append({"episode_index": index, "tasks": [tasks[task_index]], "length": steps})
        written.episodes[episode_key(index)] = ExpectedEpisode(tasks[task_index], frames, actions, state)
        rendered.append(frames)
        total += steps
    if version == "v2.1":
        data_path = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
        video_path = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
        for index, table in enumerate(tables):
            where = dict(episode_chunk=index // 1000, episode_index=index)
            written.files.append(_write_parquet(table, root / data_path.format(**where)))
            for column in video_columns:
                decoded = _encode_video(
                    rendered[index][:, columns.index(column)], root / video_path.format(video_key=column, **where)
                )
                written.episodes[episode_key(index)].frames[:, columns.index(column)] = decoded
        (root / "meta" / "episodes.jsonl").write_text("".join(json.dumps(line) + "\n" for line in listing))
        (root / "meta" / "tasks.jsonl").write_text(
            "".join(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in enumerate(tasks))
        )
    else:
        data_path = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
        video_path = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
        written.files.append(
            _write_parquet(pa.concat_tables(tables), root / data_path.format(chunk_index=0, file_index=0), 3)
        )
        starts = np.cumsum([0] + [line["length"] for line in listing])
        meta = {
            **{key: [line[key] for line in listing] for key in ("episode_index", "tasks", "length")},
            "data/chunk_index": [0] * episodes,
            "data/file_index": [0] * episodes,
            "dataset_from_index": starts[:-1].tolist(),
            "dataset_to_index": starts[1:].tolist(),
        }
        for column in video_columns:
            decoded = _encode_video(
                np.concatenate([frames[:, columns.index(column)] for frames in rendered]),
                root / video_path.format(video_key=column, chunk_index=0, file_index=0),
            )
            for index in range(episodes):
                written.episodes[episode_key(index)].frames[:, columns.index(column)] = decoded[
                    starts[index] : starts[index + 1]
                ]
            meta.update(
                {
                    f"videos/{column}/chunk_index": [0] * episodes,
                    f"videos/{column}/file_index": [0] * episodes,
                    f"videos/{column}/from_timestamp": (starts[:-1] / _FPS).tolist(),
                    f"videos/{column}/to_timestamp": (starts[1:] / _FPS).tolist(),
                }
            )
        meta.update({"meta/episodes/chunk_index": [0] * episodes, "meta/episodes/file_index": [0] * episodes})
        _write_parquet(pa.table(meta), root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
        _write_parquet(
            pa.table({"task_index": list(range(len(tasks))), "task": tasks}), root / "meta" / "tasks.parquet"
        )
    written.files.extend(sorted(root.glob("videos/**/*.mp4")))
    image = {"shape": [size, size, 3], "names": ["height", "width", "channel"]}
    video_info = {
        "video.height": size,
        "video.width": size,
        "video.codec": "av1",
        "video.pix_fmt": "yuv420p",
        "video.is_depth_map": False,
        "video.fps": _FPS,
        "video.channels": 3,
        "has_audio": False,
    }
    info = {
        "codebase_version": version,
        "robot_type": "panda",
        "total_episodes": episodes,
        "total_frames": total,
        "total_tasks": len(tasks),
        "total_videos": len(video_columns) * episodes,
        "total_chunks": 1,
        "chunks_size": 1000,
        "fps": _FPS,
        "splits": {"train": f"0:{episodes}"},
        "data_path": data_path,
        "video_path": video_path if video_columns else None,
        "features": {
            **{c: {"dtype": "video", **image, "info": video_info} for c in video_columns},
            **{c: {"dtype": "image", **image} for c in image_columns},
            state_name: {"dtype": "float32", "shape": [state_dim], "names": None},
            action_name: {"dtype": "float32", "shape": [action_dim], "names": None},
            **{name: {"dtype": dtype, "shape": [1], "names": None} for name, dtype in _LEROBOT_SCALARS},
        },
    }
    if version == "v3.0":
        info.update(data_files_size_in_mb=100, video_files_size_in_mb=500)
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    return written


def _encode_video(frames: np.ndarray, file: Path) -> np.ndarray:
    """uint8 [T, H, W, 3] -> an mp4 as LeRobot's `encode_video_frames` writes it; returns the decoded frames."""
    file.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(file), "w") as output:
        stream = output.add_stream("libsvtav1", _FPS, options={"g": "2", "crf": "30"})
        stream.pix_fmt, stream.width, stream.height = "yuv420p", frames.shape[2], frames.shape[1]
        for frame in frames:
            output.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        output.mux(stream.encode())
    with av.open(str(file)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def _lerobot_schema(images: list[str], action: tuple[str, int], state: tuple[str, int]) -> pa.Schema:
    """The parquet schema HF datasets writes, with its `huggingface` features metadata."""
    hf_features = {
        **{c: {"_type": "Image"} for c in images},
        **{
            name: {"feature": {"dtype": "float32", "_type": "Value"}, "length": width, "_type": "Sequence"}
            for name, width in (state, action)
        },
        **{name: {"dtype": dtype, "_type": "Value"} for name, dtype in _LEROBOT_SCALARS},
    }
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.schema(
        [
            *((c, image_type) for c in images),
            (state[0], pa.list_(pa.float32())),
            (action[0], pa.list_(pa.float32())),
            *((name, pa.float32() if dtype == "float32" else pa.int64()) for name, dtype in _LEROBOT_SCALARS),
        ],
        metadata={"huggingface": json.dumps({"info": {"features": hf_features}})},
    )


def _write_parquet(table: pa.Table, file: Path, row_group_size: int | None = None) -> Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, file, row_group_size=row_group_size)
    return file
