"""LIBERO datasets in both release layouts: HDF5 task files (original, no_noops), the RLDS TFRecords."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from sfcache.keys import episode_key
from sfcache.sources.images import encode_jpeg
from sfcache.sources.libero_hdf5 import instruction_from_file_name
from sfcache.sources.libero_rlds import write_record
from sfcache.sources.synthetic.scenes import ExpectedEpisode, Written, episode_motion, render_depth, render_episode
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
    actions, path = episode_motion(rng, steps, 7)
    actions[:, 6] = np.where(actions[:, 6] > 0, 1.0, -1.0)  # gripper: -1 open .. 1 close
    frames = render_episode(path, 2, size, size)  # as the policy sees them
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
                actions, path = episode_motion(rng, steps, 7)
                frames = render_episode(path, 2, size, size)  # stored already rotated
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
