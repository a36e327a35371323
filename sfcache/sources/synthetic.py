"""Write small datasets in each exact on-disk format, for tests, benchmarks and `make demo`.

No real dataset can be downloaded here, so these writers reproduce the layouts byte for byte where
it matters to a reader: keys, dtypes, attributes, file names, folder layout, JPEG/PNG encodings,
TFRecord framing with masked CRC32C, TFDS and LeRobot metadata, and the known quirks (upside-down
LIBERO frames, `liber_o10`, NUL-padded OpenCV-channel-order RoboTwin JPEGs, XPL-RGB1 markers).
Frames are rendered scenes (sky, table, a corner marker, an object that moves with the actions),
different per view, deterministic from the seed. Every writer returns `Written`: the path to open
and, per episode key, what a reader must return (frames as the policy sees them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import av
import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sfcache.keys import episode_key
from sfcache.sources.images import encode_jpeg, encode_png
from sfcache.sources.libero_hdf5 import instruction_from_file_name
from sfcache.sources.libero_rlds import write_record
from sfcache.sources.tf_example import encode_example

LIBERO_TASKS = {
    "libero_spatial": [
        "pick_up_the_black_bowl_between_the_plate_and_the_ramekin_and_place_it_on_the_plate",
        "pick_up_the_black_bowl_next_to_the_ramekin_and_place_it_on_the_plate",
        "pick_up_the_black_bowl_on_the_stove_and_place_it_on_the_plate",
    ],
    "libero_object": [
        "pick_up_the_alphabet_soup_and_place_it_in_the_basket",
        "pick_up_the_cream_cheese_and_place_it_in_the_basket",
    ],
    "libero_goal": ["open_the_middle_drawer_of_the_cabinet", "put_the_bowl_on_the_stove"],
    "libero_10": [
        "LIVING_ROOM_SCENE2_put_both_the_alphabet_soup_and_the_tomato_sauce_in_the_basket",
        "KITCHEN_SCENE3_turn_on_the_stove_and_put_the_moka_pot_on_it",
        "KITCHEN_SCENE4_put_the_black_bowl_in_the_bottom_drawer_of_the_cabinet_and_close_it",
    ],
}
RLDS_BUILDER_NAMES = {"libero_10": "liber_o10"}  # sic: TFDS snake-cases the LIBERO_10 builder class
ROBOTWIN_TASKS = ["place_dual_shoes", "stack_bowls_two", "handover_block"]
ROBOTWIN_INSTRUCTIONS = {
    "place_dual_shoes": "Place the two shoes side by side on the mat.",
    "stack_bowls_two": "Stack the green bowl on top of the blue bowl.",
    "handover_block": "Hand the red block over to the other arm.",
}

# Per view: sky, table, object, marker colours (channel-asymmetric so a BGR swap shows).
_PALETTES = [
    ((70, 120, 210), (150, 100, 60), (220, 40, 30), (240, 210, 40)),
    ((40, 160, 90), (90, 90, 110), (30, 60, 220), (250, 120, 200)),
    ((180, 90, 160), (120, 140, 60), (240, 160, 20), (20, 220, 230)),
    ((200, 200, 80), (60, 70, 140), (130, 30, 170), (250, 250, 250)),
]
_XPL_MARKER = b"XPL-RGB1"


@dataclass
class ExpectedEpisode:
    """What a reader must return for one episode (frames in the format's default view order)."""

    instruction: str
    frames: np.ndarray  # uint8 [T, V, H, W, 3] as the policy sees them
    actions: np.ndarray  # float32 [T, A]
    proprio: np.ndarray  # float32 [T, P]
    depth: np.ndarray | None = None  # float32 [T, V, H, W] metres as the policy sees them (LIBERO with depth=True)


@dataclass
class Written:
    """A written dataset: the path to open and the expected episodes by key, in key order."""

    path: Path
    format: str
    episodes: dict[str, ExpectedEpisode] = field(default_factory=dict)
    lossy: bool = False  # frames went through JPEG: compare within a tolerance
    files: list[Path] = field(default_factory=list)


def render_view(view: int, position: np.ndarray, height: int, width: int) -> np.ndarray:
    """One camera frame: gradient sky, table, a fixed top-left marker, the object at `position` (x, y in 0..1)."""
    sky, table, obj, marker = (np.array(c, np.float32) for c in _PALETTES[view % len(_PALETTES)])
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = y / height, x / width
    shade = (0.75 + 0.25 * y)[..., None]
    image = np.where((y < 0.4)[..., None], sky * shade, table * (1.1 - 0.2 * x)[..., None])
    zoom = 1.0 + 0.6 * view  # wrist views see the object larger and off-centre
    cx, cy = 0.5 + (position[0] - 0.5) / zoom, 0.55 + (position[1] - 0.5) / zoom
    half = 0.09 * zoom
    image[(np.abs(x - cx) < half) & (np.abs(y - cy) < half * 0.8)] = obj
    image[(x < 0.14) & (y < 0.1 + 0.04 * view)] = marker
    return np.clip(image, 0, 255).astype(np.uint8)


def render_depth(view: int, position: np.ndarray, height: int, width: int) -> np.ndarray:
    """Metric depth of `render_view`'s scene: a far wall behind the sky, a table plane nearing the camera
    towards the bottom, the object box standing out of it; the wrist view is ~20x closer (LIBERO: agentview
    0.7-3 m, eye-in-hand 0.03-0.13 m). float32 [H, W]."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = (y + 0.5) / height, (x + 0.5) / width
    depth = np.where(y < 0.4, 3.0, 2.4 - 1.6 * (y - 0.4) / 0.6 + 0.1 * x).astype(np.float32)
    zoom = 1.0 + 0.6 * view
    cx, cy = 0.5 + (position[0] - 0.5) / zoom, 0.55 + (position[1] - 0.5) / zoom
    half = 0.09 * zoom
    box = (np.abs(x - cx) < half) & (np.abs(y - cy) < half * 0.8)
    depth[box] -= 0.35 + 0.2 * (1 - np.abs(x - cx)[box] / half)  # a rounded front face
    return depth / (1.0 + 19.0 * (view % 2))


def _episode_motion(rng: np.random.Generator, steps: int, action_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth actions in [-1, 1] and the object path they drive (x, y per step)."""
    actions = np.tanh(0.35 * rng.normal(size=(steps, action_dim)).cumsum(axis=0)).astype(np.float32)
    path = 0.5 + 0.35 * np.tanh(0.3 * actions[:, :2].cumsum(axis=0))
    return actions, path


def _render_episode(path: np.ndarray, views: int, height: int, width: int) -> np.ndarray:
    return np.stack([np.stack([render_view(v, p, height, width) for v in range(views)]) for p in path])


def _jpeg_with_marker(rgb: np.ndarray) -> bytes:
    """XPolicyLab's standard encoding: true-RGB JPEG with a COM `XPL-RGB1` segment after APP0."""
    data = encode_jpeg(rgb)
    app0_end = 4 + int.from_bytes(data[4:6], "big") if data[2:4] == b"\xff\xe0" else 2
    segment = b"\xff\xfe" + (len(_XPL_MARKER) + 2).to_bytes(2, "big") + _XPL_MARKER
    return data[:app0_end] + segment + data[app0_end:]


def _opencv_jpeg(rgb: np.ndarray) -> bytes:
    """What cv2.imencode writes when handed an RGB array: it reads the channels as BGR."""
    return encode_jpeg(rgb[..., ::-1])


# --- LIBERO HDF5 (original and no_noops) ------------------------------------------------------------


def write_libero_hdf5(root: Path, *, suite: str = "libero_spatial", tasks: int = 2, demos: int = 3, steps: int = 10,
                      size: int | None = None, no_noops: bool = False, seed: int = 0,
                      depth: bool = False) -> Written:  # fmt: skip
    """LIBERO task files `<suite>/<task>_demo.hdf5` (original: 128px, problem_info attrs; no_noops:
    256px, no attributes, gaps in demo numbering, folder `<suite>_no_noops`). `depth`: also
    `obs/agentview_depth` and `obs/eye_in_hand_depth`, float16 [T, H, W] metres, upside down like the frames
    (what `sf collect-libero --depth` records)."""
    size = size or (256 if no_noops else 128)
    folder = Path(root) / (f"{suite}_no_noops" if no_noops else suite)
    folder.mkdir(parents=True, exist_ok=True)
    written = Written(folder, "libero_hdf5")
    rng = np.random.default_rng(seed)
    for task in LIBERO_TASKS[suite][:tasks]:
        instruction = instruction_from_file_name(Path(f"{task}_demo.hdf5"))
        file = folder / f"{task}_demo.hdf5"
        numbers = [2 * i + (i % 2) for i in range(demos)] if no_noops else list(range(demos))
        with h5py.File(file, "w") as h5:
            data = h5.create_group("data")
            if not no_noops:
                data.attrs["problem_info"] = json.dumps(
                    {
                        "problem_name": "libero_tabletop_manipulation",
                        "domain_name": "robosuite",
                        "language_instruction": instruction,
                    }
                )
                data.attrs["env_args"] = json.dumps(
                    {
                        "type": 1,
                        "env_name": "Libero_Tabletop_Manipulation",
                        "env_kwargs": {"camera_heights": size, "camera_widths": size},
                    }
                )
                data.attrs["bddl_file_name"] = f"libero/libero/bddl_files/{suite}/{task}.bddl"
                data.attrs["macros_image_convention"] = "opengl"
                data.attrs["num_demos"] = demos
                data.attrs["total"] = demos * steps
            for number in numbers:
                key = f"{folder.name}/{task}/demo_{number}"
                written.episodes[key] = _write_libero_demo(
                    data.create_group(f"demo_{number}"), rng, steps, size, instruction, attrs=not no_noops, depth=depth
                )
        written.files.append(file)
    return written


def _write_libero_demo(
    demo: h5py.Group, rng: np.random.Generator, steps: int, size: int, instruction: str, attrs: bool, depth: bool
) -> ExpectedEpisode:
    actions, path = _episode_motion(rng, steps, 7)
    actions[:, 6] = np.where(actions[:, 6] > 0, 1.0, -1.0)  # gripper: -1 open .. 1 close
    frames = _render_episode(path, 2, size, size)  # as the policy sees them
    stored = frames[:, :, ::-1, ::-1]  # LIBERO keeps them upside down
    ee_pos = np.concatenate([path, np.full((steps, 1), 0.9)], axis=1)
    ee_ori = rng.normal(size=(steps, 3)) * 0.1 + np.array([3.1, 0.0, 0.0])
    gripper = np.stack([0.04 - 0.02 * (actions[:, 6] > 0), -0.04 + 0.02 * (actions[:, 6] > 0)], axis=1)
    if attrs:
        demo.attrs["num_samples"] = steps
        demo.attrs["model_file"] = "<mujoco model='base'></mujoco>"
        demo.attrs["init_state"] = rng.normal(size=79)
    demo["actions"] = actions.astype(np.float64)
    demo["states"] = rng.normal(size=(steps, 79))
    demo["robot_states"] = np.concatenate([gripper, ee_pos, rng.normal(size=(steps, 4))], axis=1)
    demo["rewards"] = np.eye(1, steps, steps - 1, dtype=np.uint8)[0]
    demo["dones"] = np.eye(1, steps, steps - 1, dtype=np.uint8)[0]
    obs = demo.create_group("obs")
    obs["agentview_rgb"] = np.ascontiguousarray(stored[:, 0])
    obs["eye_in_hand_rgb"] = np.ascontiguousarray(stored[:, 1])
    obs["joint_states"] = rng.normal(size=(steps, 7))
    obs["gripper_states"] = gripper
    obs["ee_states"] = np.concatenate([ee_pos, ee_ori], axis=1)
    obs["ee_pos"] = ee_pos
    obs["ee_ori"] = ee_ori
    proprio = np.concatenate([ee_pos, ee_ori, gripper], axis=1).astype(np.float32)
    metres = None
    if depth:
        stored_depth = np.stack([np.stack([render_depth(v, p, size, size) for v in range(2)]) for p in path]).astype(
            np.float16
        )[:, :, ::-1, ::-1]
        obs["agentview_depth"] = np.ascontiguousarray(stored_depth[:, 0])
        obs["eye_in_hand_depth"] = np.ascontiguousarray(stored_depth[:, 1])
        metres = stored_depth[:, :, ::-1, ::-1].astype(np.float32)
    return ExpectedEpisode(instruction, frames, actions, proprio, metres)


def write_demo_dataset(root: Path) -> Path:
    """The small LIBERO dataset `make demo` extracts: libero_spatial, 2 tasks x 3 demos x 16 steps, 128px."""
    return write_libero_hdf5(root, suite="libero_spatial", tasks=2, demos=3, steps=16, size=128).path


# --- LIBERO RLDS (TFDS TFRecords) ---------------------------------------------------------------------


def write_libero_rlds(root: Path, *, suite: str = "libero_10", episodes: int = 3, steps: int = 8, size: int = 256,
                      shards: int = 2, seed: int = 0) -> Written:  # fmt: skip
    """`<suite>_no_noops/1.0.0/` as modified_libero_rlds ships it: one tf.train.Example per episode."""
    name = RLDS_BUILDER_NAMES.get(suite, suite)
    folder = Path(root) / f"{suite}_no_noops" / "1.0.0"
    folder.mkdir(parents=True, exist_ok=True)
    written = Written(folder.parent, "libero_rlds", lossy=True)
    rng = np.random.default_rng(seed)
    lengths = [len(part) for part in np.array_split(np.arange(episodes), shards)]
    tasks = LIBERO_TASKS[suite]
    index = 0
    for shard, count in enumerate(lengths):
        file = folder / f"{name}-train.tfrecord-{shard:05d}-of-{shards:05d}"
        with open(file, "wb") as handle:
            for _ in range(count):
                instruction = instruction_from_file_name(Path(tasks[index % len(tasks)]))
                actions, path = _episode_motion(rng, steps, 7)
                frames = _render_episode(path, 2, size, size)  # stored already rotated
                state = np.concatenate([path, np.full((steps, 1), 0.9), rng.normal(size=(steps, 5))], axis=1).astype(
                    np.float32
                )
                flags = np.zeros(steps, np.int64)
                record = {
                    "steps/observation/image": ([encode_jpeg(f) for f in frames[:, 0]], "byte"),
                    "steps/observation/wrist_image": ([encode_jpeg(f) for f in frames[:, 1]], "byte"),
                    "steps/observation/state": (state.ravel().tolist(), "float"),
                    "steps/observation/joint_state": (rng.normal(size=steps * 7).tolist(), "float"),
                    "steps/action": (actions.ravel().tolist(), "float"),
                    "steps/reward": (np.eye(1, steps, steps - 1)[0].tolist(), "float"),
                    "steps/discount": (np.ones(steps).tolist(), "float"),
                    "steps/is_first": ((flags + np.eye(1, steps, 0, dtype=np.int64)[0]).tolist(), "int"),
                    "steps/is_last": ((flags + np.eye(1, steps, steps - 1, dtype=np.int64)[0]).tolist(), "int"),
                    "steps/is_terminal": ((flags + np.eye(1, steps, steps - 1, dtype=np.int64)[0]).tolist(), "int"),
                    "steps/language_instruction": ([instruction.encode()] * steps, "byte"),
                    "episode_metadata/file_path": ([f"/data/{suite}_no_noops/{tasks[0]}_demo.hdf5".encode()], "byte"),
                }
                order = rng.permutation(len(record))  # key order varies with protobuf versions
                write_record(handle, encode_example(dict(list(record.items())[i] for i in order)))
                key = episode_key(index, f"{suite}_no_noops")
                written.episodes[key] = ExpectedEpisode(instruction, frames, actions, state)
                index += 1
        written.files.append(file)
    _write_tfds_metadata(folder, name, lengths, size)
    return written


def _write_tfds_metadata(folder: Path, name: str, lengths: list[int], size: int) -> None:
    split = {
        "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
        "name": "train",
        "numBytes": str(sum(f.stat().st_size for f in folder.glob(f"{name}-train.tfrecord-*"))),
        "shardLengths": [str(n) for n in lengths],
    }
    info = {
        "citation": "// TODO(example_dataset): BibTeX citation",
        "description": "LIBERO, no no-op steps.",
        "fileFormat": "tfrecord",
        "moduleName": f"{name}_dataset_builder",
        "name": name,
        "releaseNotes": {"1.0.0": "Initial release."},
        "splits": [split],
        "version": "1.0.0",
    }
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2))

    def tensor(shape: list[int], dtype: str, encoding: str = "none") -> dict:
        return {
            "pythonClassName": "tensorflow_datasets.core.features.tensor_feature.Tensor",
            "tensor": {"shape": {"dimensions": [str(d) for d in shape]}, "dtype": dtype, "encoding": encoding},
        }

    image = {
        "pythonClassName": "tensorflow_datasets.core.features.image_feature.Image",
        "image": {"shape": {"dimensions": [str(size), str(size), "3"]}, "dtype": "uint8", "encodingFormat": "jpeg"},
    }
    step = {
        "observation": {
            "pythonClassName": "tensorflow_datasets.core.features.features_dict.FeaturesDict",
            "featuresDict": {
                "features": {
                    "image": image,
                    "wrist_image": image,
                    "state": tensor([8], "float32"),
                    "joint_state": tensor([7], "float32"),
                }
            },
        },
        "action": tensor([7], "float32"),
        "reward": tensor([], "float32"),
        "discount": tensor([], "float32"),
        "is_first": tensor([], "bool"),
        "is_last": tensor([], "bool"),
        "is_terminal": tensor([], "bool"),
        "language_instruction": {"pythonClassName": "tensorflow_datasets.core.features.text_feature.Text", "text": {}},
    }
    features = {
        "pythonClassName": "tensorflow_datasets.core.features.features_dict.FeaturesDict",
        "featuresDict": {
            "features": {
                "steps": {
                    "pythonClassName": "tensorflow_datasets.core.features.dataset_feature.Dataset",
                    "sequence": {
                        "feature": {
                            "pythonClassName": "tensorflow_datasets.core.features.features_dict.FeaturesDict",
                            "featuresDict": {"features": step},
                        },
                        "length": "-1",
                    },
                },
                "episode_metadata": {
                    "pythonClassName": "tensorflow_datasets.core.features.features_dict.FeaturesDict",
                    "featuresDict": {
                        "features": {
                            "file_path": {
                                "pythonClassName": "tensorflow_datasets.core.features.text_feature.Text",
                                "text": {},
                            }
                        }
                    },
                },
            }
        },
    }
    (folder / "features.json").write_text(json.dumps(features, indent=2))


# --- LeRobot v2.1 and v3.0 (openpi's LIBERO names, or LeRobot's own with video cameras) -------------------

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
        actions, path = _episode_motion(rng, steps, action_dim)
        frames = _render_episode(path, len(columns), size, size)
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


# --- RoboTwin 2.0 (legacy) and XPolicyLab -------------------------------------------------------------


def write_robotwin(root: Path, *, layout: str = "legacy", tasks: int = 2, episodes: int = 2, steps: int = 6,
                   height: int = 240, width: int = 320, front_camera: bool = False, xpl_marker: bool = True,
                   seed: int = 0) -> Written:  # fmt: skip
    """RoboTwin episodes under `root/data`: legacy `<task>/<config>/data/episode{N}.hdf5` + instructions,
    or XPolicyLab `<bench>/<task>/<env_cfg>/data/episode_{N:07d}.hdf5` (JPEGs with or without XPL-RGB1)."""
    if layout not in ("legacy", "xpolicylab"):
        raise ValueError(f"layout must be 'legacy' or 'xpolicylab', not {layout!r}")
    data_root = Path(root) / "data"
    written = Written(data_root, "robotwin", lossy=True)
    rng = np.random.default_rng(seed)
    views = 4 if front_camera else 3
    for task in ROBOTWIN_TASKS[:tasks]:
        for number in range(episodes):
            actions, path = _episode_motion(rng, steps, 14)
            actions[:, [6, 13]] = (actions[:, [6, 13]] + 1) / 2  # grippers in [0, 1]
            frames = _render_episode(path, views, height, width)
            instruction = ROBOTWIN_INSTRUCTIONS[task]
            if layout == "legacy":
                folder = data_root / task / "demo_clean"
                file = folder / "data" / f"episode{number}.hdf5"
                _write_robotwin_legacy(file, frames, actions, rng)
                (folder / "instructions").mkdir(parents=True, exist_ok=True)
                (folder / "instructions" / f"episode{number}.json").write_text(
                    json.dumps({"seen": [instruction, instruction.lower()], "unseen": [instruction.upper()]})
                )
                key, proprio = f"robotwin/{task}/demo_clean/episode{number}", actions
            else:
                file = data_root / "robotwin" / task / "aloha-agilex_clean_50" / "data" / f"episode_{number:07d}.hdf5"
                proprio = actions + rng.normal(scale=0.01, size=actions.shape).astype(np.float32)
                _write_xpolicylab(file, frames[:, :3], actions, proprio, instruction, xpl_marker)
                key = f"robotwin/{task}/aloha-agilex_clean_50/episode_{number:07d}"
                frames = frames[:, :3]
            written.episodes[key] = ExpectedEpisode(instruction, frames, actions, proprio)
            written.files.append(file)
    written.episodes = dict(sorted(written.episodes.items()))
    return written


def _write_robotwin_legacy(file: Path, frames: np.ndarray, actions: np.ndarray, rng: np.random.Generator) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    steps = len(frames)
    with h5py.File(file, "w") as h5:
        for view, camera in enumerate(
            ["head_camera", "left_camera", "right_camera", "front_camera"][: frames.shape[1]]
        ):
            group = h5.create_group(f"observation/{camera}")
            encoded = [_opencv_jpeg(frame) for frame in frames[:, view]]
            group.create_dataset("rgb", data=encoded, dtype=f"S{max(map(len, encoded))}")  # NUL padded
            group["intrinsic_cv"] = np.tile(np.array([[300.0, 0, 160], [0, 300, 120], [0, 0, 1]]), (steps, 1, 1))
            group["extrinsic_cv"] = np.tile(np.eye(3, 4), (steps, 1, 1))
            group["cam2world_gl"] = np.tile(np.eye(4), (steps, 1, 1))
        joints = h5.create_group("joint_action")
        joints["left_arm"], joints["left_gripper"] = actions[:, :6], actions[:, 6]
        joints["right_arm"], joints["right_gripper"] = actions[:, 7:13], actions[:, 13]
        joints["vector"] = actions
        endpose = h5.create_group("endpose")
        endpose["left_endpose"], endpose["right_endpose"] = rng.normal(size=(steps, 7)), rng.normal(size=(steps, 7))
        endpose["left_gripper"], endpose["right_gripper"] = actions[:, 6], actions[:, 13]
        h5["pointcloud"] = np.zeros((steps, 0), np.float32)


def _write_xpolicylab(
    file: Path, frames: np.ndarray, actions: np.ndarray, proprio: np.ndarray, instruction: str, xpl_marker: bool
) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    steps = len(frames)
    encode = _jpeg_with_marker if xpl_marker else _opencv_jpeg
    with h5py.File(file, "w") as h5:
        h5["data_format_version"] = "v1.0"
        h5["instructions"] = json.dumps([instruction])
        h5["subtasks"] = json.dumps([[[0, steps - 1], instruction]])
        h5["additional_info/frequency"] = 25
        for view, camera in enumerate(["cam_head", "cam_left_wrist", "cam_right_wrist"]):
            encoded = [encode(frame) for frame in frames[:, view]]
            h5.create_dataset(f"vision/{camera}/colors", data=encoded, dtype=f"S{max(map(len, encoded))}")
            h5[f"vision/{camera}/shape"] = np.array(frames.shape[2:], np.int64)
        for group, values in (("state", proprio), ("action", actions)):
            h5[f"{group}/left_arm_joint_states"] = values[:, :6]
            h5[f"{group}/left_ee_joint_states"] = values[:, 6:7]
            h5[f"{group}/right_arm_joint_states"] = values[:, 7:13]
            h5[f"{group}/right_ee_joint_states"] = values[:, 13:14]
        h5["state/left_ee_poses"] = np.tile([0.3, 0.2, 0.9, 1.0, 0, 0, 0], (steps, 1))
        h5["state/right_ee_poses"] = np.tile([0.3, -0.2, 0.9, 1.0, 0, 0, 0], (steps, 1))
