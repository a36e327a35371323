"""LIBERO demonstrations in HDF5: the original release and OpenVLA-OFT's regenerated "no_noops" files.

Both keep one file per task, `<suite>/<task_name>_demo.hdf5`, with `data/demo_<i>` groups. They are
told apart by content: the original has `data.attrs["problem_info"]` (JSON with the instruction);
no_noops files carry no attributes, so the instruction comes from the file name.
Frames are stored upside down (OpenGL); the policy sees them rotated 180 degrees (default).
Depth (`sf collect-libero --depth`, `sf render-depth`) is optional: `obs/<camera>_depth` next to each
`obs/<camera>_rgb`, float16 [T, H, W] metres, stored upside down like the frames; read with `read(depth=True)`.
Proprio is the RLDS `state`: eef position (3) + axis-angle (3) from obs/ee_pos + obs/ee_ori
(or obs/ee_states when those are absent) + obs/gripper_states (2) = 8 numbers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from sfcache.errors import SourceError
from sfcache.sources.base import Episode, EpisodeInfo, Source, require_finite, stack_views
from sfcache.sources.hdf5 import HandleCache, checked, read_range, require_steps, scan_files

ORIGINAL, NO_NOOPS = "original", "no_noops"


def instruction_from_file_name(file: Path) -> str:
    """no_noops convention: drop `_demo.hdf5` and any leading `..._SCENE<n>` words, underscores -> spaces."""
    words = file.name.removesuffix(".hdf5").removesuffix("_demo").split("_")
    scene = [i for i, word in enumerate(words) if "SCENE" in word]
    if scene:
        words = words[scene[0] + 1 :]
    return " ".join(words)


def depth_key(rgb_key: str) -> str:
    """The depth dataset recorded next to a camera's frames: obs/agentview_rgb -> obs/agentview_depth."""
    return rgb_key.removesuffix("_rgb") + "_depth"


class LiberoHDF5(Source):
    """A LIBERO suite folder, a folder of suites, or one task file."""

    format = "libero_hdf5"
    view_keys = {"primary": "obs/agentview_rgb", "wrist": "obs/eye_in_hand_rgb"}
    default_views = ("primary", "wrist")
    default_rotate = True

    def _files(self) -> list[Path]:
        return [self.path] if self.path.is_file() else sorted(self.path.rglob("*.hdf5"))

    def _scan(self) -> Iterator[Episode | SourceError]:
        return scan_files(self._files(), self.path, ".hdf5 files (expected <suite>/<task>_demo.hdf5)", self._scan_file)

    def _scan_file(self, file: Path, h5: h5py.File) -> Iterator[Episode | SourceError]:
        data = h5.get("data")
        if not isinstance(data, h5py.Group):
            raise SourceError(file, "missing group (expected LIBERO demos under data/)", key="data")
        variant, instruction = self._instruction(file, data)
        demos = [name for name in data if re.fullmatch(r"demo_\d+", name)]
        if not demos:
            raise SourceError(file, "no demo_<i> groups under data/", key="data")
        task = file.name.removesuffix(".hdf5").removesuffix("_demo")
        for name in demos:
            key = f"{file.parent.name}/{task}/{name}"
            try:
                steps, proprio_keys = self._check_demo(file, key, data[name])
            except SourceError as err:
                yield err
                continue
            yield Episode(EpisodeInfo(key, instruction, steps), file, (name, variant, proprio_keys))

    def _instruction(self, file: Path, data: h5py.Group) -> tuple[str, str]:
        if "problem_info" not in data.attrs:
            return NO_NOOPS, instruction_from_file_name(file)
        try:
            instruction = json.loads(data.attrs["problem_info"])["language_instruction"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SourceError(file, "not JSON with 'language_instruction'", key="data.attrs['problem_info']") from None
        if isinstance(instruction, list):  # some LIBERO files store it as a list of pieces
            instruction = "".join(instruction)
        return ORIGINAL, str(instruction).strip().strip('"')

    def _check_demo(self, file: Path, key: str, demo: h5py.Group) -> tuple[int, tuple[str, ...]]:
        datasets = [checked(demo, "actions", file, key, kind="float", shape=(None, 7))]
        frame_shape = None
        for view in self.views:
            images = checked(demo, self.view_keys[view], file, key, kind="uint8", shape=(None, None, None, 3))
            datasets.append(images)
            if frame_shape not in (None, images.shape[1:]):
                raise SourceError(
                    file,
                    f"frame size {images.shape[1:3]} differs from the other view's "
                    f"{frame_shape[:2]} (expected one size)",
                    episode=key,
                    key=self.view_keys[view],
                )
            frame_shape = images.shape[1:]
        obs = demo.get("obs")
        has_pos_ori = isinstance(obs, h5py.Group) and "ee_pos" in obs and "ee_ori" in obs
        eef = [("obs/ee_pos", 3), ("obs/ee_ori", 3)] if has_pos_ori else [("obs/ee_states", 6)]
        for name, width in eef + [("obs/gripper_states", 2)]:
            datasets.append(checked(demo, name, file, key, kind="float", shape=(None, width)))
        lengths = {dataset.name.lstrip("/"): dataset.shape[0] for dataset in datasets}
        return require_steps(file, key, lengths), tuple(name for name, _ in eef) + ("obs/gripper_states",)

    def _dataset(self, episode: Episode, name: str) -> h5py.Dataset:
        return self._process_local("h5", HandleCache).dataset(episode.file, f"data/{episode.where[0]}/{name}")

    def _read_frames(self, episode: Episode, start: int, stop: int) -> np.ndarray:
        key, file = episode.info.key, episode.file
        return stack_views(
            [read_range(self._dataset(episode, self.view_keys[view]), start, stop, file, key) for view in self.views],
            self.views,
            file,
            key,
        )

    def _read_depth(self, episode: Episode, start: int, stop: int) -> np.ndarray:
        key, file, name = episode.info.key, episode.file, episode.where[0]
        h5 = self._process_local("h5", HandleCache)
        demo = h5.dataset(file, f"data/{name}")
        views = []
        for view in self.views:
            column = depth_key(self.view_keys[view])
            if column not in demo:
                raise SourceError(
                    file,
                    f"has no {column}: record it with `sf collect-libero --depth` or `sf render-depth`",
                    episode=key,
                )
            frames = demo[self.view_keys[view]]
            dataset = checked(demo, column, file, key, kind="float", shape=(frames.shape[0], *frames.shape[1:3]))
            views.append(read_range(dataset, start, stop, file, key).astype(np.float32))
        return np.stack(views, axis=1)

    def _read_vectors(self, episode: Episode, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        name, _, proprio_keys = episode.where
        key, file = episode.info.key, episode.file
        actions = read_range(self._dataset(episode, "actions"), start, stop, file, key).astype(np.float32)
        require_finite(actions, file, key, f"data/{name}/actions", start)
        parts = []
        for proprio_key in proprio_keys:
            parts.append(read_range(self._dataset(episode, proprio_key), start, stop, file, key).astype(np.float32))
            require_finite(parts[-1], file, key, f"data/{name}/{proprio_key}", start)
        return actions, np.concatenate(parts, axis=1)

    def _variant(self) -> str:
        return "+".join(sorted({episode.where[1] for episode in self._entries().values()})) or ORIGINAL
