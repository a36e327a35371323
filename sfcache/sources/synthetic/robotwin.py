"""RoboTwin 2.0 datasets in the legacy HDF5 layout or XPolicyLab's, with their JPEG quirks."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from sfcache.sources.images import encode_jpeg
from sfcache.sources.synthetic.scenes import ExpectedEpisode, Written, episode_motion, render_episode

ROBOTWIN_TASKS = ["place_dual_shoes", "stack_bowls_two", "handover_block"]
ROBOTWIN_INSTRUCTIONS = {
    "place_dual_shoes": "Place the two shoes side by side on the mat.",
    "stack_bowls_two": "Stack the green bowl on top of the blue bowl.",
    "handover_block": "Hand the red block over to the other arm.",
}
_XPL_MARKER = b"XPL-RGB1"


def _jpeg_with_marker(rgb: np.ndarray) -> bytes:
    """XPolicyLab's standard encoding: true-RGB JPEG with a COM `XPL-RGB1` segment after APP0."""
    data = encode_jpeg(rgb)
    app0_end = 4 + int.from_bytes(data[4:6], "big") if data[2:4] == b"\xff\xe0" else 2
    segment = b"\xff\xfe" + (len(_XPL_MARKER) + 2).to_bytes(2, "big") + _XPL_MARKER
    return data[:app0_end] + segment + data[app0_end:]


def _opencv_jpeg(rgb: np.ndarray) -> bytes:
    """What cv2.imencode writes when handed an RGB array: it reads the channels as BGR."""
    return encode_jpeg(rgb[..., ::-1])


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
            actions, path = episode_motion(rng, steps, 14)
            actions[:, [6, 13]] = (actions[:, [6, 13]] + 1) / 2  # grippers in [0, 1]
            frames = render_episode(path, views, height, width)
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
