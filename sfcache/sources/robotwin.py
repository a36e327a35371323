"""RoboTwin 2.0 episodes, both layouts, told apart per file by their top-level groups.

Legacy 2.0 (`observation/` group): `<task>/<config>/data/episode{N}.hdf5` with NUL-padded JPEG bytes in
`observation/<cam>/rgb`, `joint_action/vector` (T, 14) and `../instructions/episode{N}.json`
(first "seen" instruction). The one recorded joint vector is both actions and proprio (RoboTwin's
own policies shift it by a step to get targets). Key: `robotwin/<task>/<config>/episode{N}`.
XPolicyLab (`vision/` group): `<bench>/<task>/<env_cfg>/data/episode_{N:07d}.hdf5` with
`vision/<cam>/colors`, `state/*` and `action/*` packed [left arm, left ee, right arm, right ee],
`instructions` a JSON list. Key: `<bench>/<task>/<env_cfg>/episode_{N:07d}`.
JPEG channel order: cv2-written frames (no XPL-RGB1 marker) decode to BGR and are swapped.
Views by mapping: `name=column` reads any camera, as an HDF5 dataset path or a camera group name
(`front_camera`, `cam_third_view`), resolved per file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from sfcache.errors import SourceError
from sfcache.sources.base import Episode, EpisodeInfo, Source, require_finite
from sfcache.sources.hdf5 import HandleCache, checked, read_range, require_steps, scan_files
from sfcache.sources.images import decode_views

LEGACY, XPOLICYLAB = "legacy_2.0", "xpolicylab"
CAMERAS = {
    LEGACY: {
        "head": "observation/head_camera/rgb",
        "left_wrist": "observation/left_camera/rgb",
        "right_wrist": "observation/right_camera/rgb",
        "front": "observation/front_camera/rgb",
    },
    XPOLICYLAB: {
        "head": "vision/cam_head/colors",
        "left_wrist": "vision/cam_left_wrist/colors",
        "right_wrist": "vision/cam_right_wrist/colors",
        "third_view": "vision/cam_third_view/colors",
    },
}
XPOLICYLAB_JOINTS = ("left_arm_joint_states", "left_ee_joint_states", "right_arm_joint_states", "right_ee_joint_states")


class RoboTwin(Source):
    """A folder of RoboTwin episode files (any level: data/, a task, a config) or one episode file."""

    format = "robotwin"
    jpeg_frames = True
    view_keys = {**CAMERAS[LEGACY], **CAMERAS[XPOLICYLAB]}
    default_views = ("head", "left_wrist", "right_wrist")

    def _files(self) -> list[Path]:
        return [self.path] if self.path.is_file() else sorted(self.path.rglob("episode*.hdf5"))

    def _view_keys(self) -> dict[str, str]:
        """The views this dataset offers: the layout's three cameras (every file must have them; a file without
        one is reported by the scan, or skipped with --skip-bad) and an optional camera (front, third_view) only
        if the first file has it, so `sf inspect-source` lists what the data holds. Without a readable first
        file, every canonical name: the scan then reports that file."""
        try:
            with h5py.File(self._files()[0], "r") as h5:
                layout = LEGACY if "observation" in h5 else XPOLICYLAB if "vision" in h5 else None
                if layout is not None:
                    return {
                        view: name
                        for view, name in CAMERAS[layout].items()
                        if view in self.default_views or isinstance(h5.get(name), h5py.Dataset)
                    }
        except (IndexError, OSError):
            pass
        return dict(self.view_keys)

    def _scan(self) -> Iterator[Episode | SourceError]:
        return scan_files(
            self._files(),
            self.path,
            "episode*.hdf5 files (expected <task>/<config>/data/episode<N>.hdf5)",
            lambda file, h5: [self._check(file, h5)],
        )

    def _check(self, file: Path, h5: h5py.File) -> Episode:
        layout = LEGACY if "observation" in h5 else XPOLICYLAB if "vision" in h5 else None
        if layout is None:
            raise SourceError(
                file, f"neither observation/ (RoboTwin 2.0) nor vision/ (XPolicyLab) group; has {sorted(h5)}"
            )
        parents = [parent.name for parent in file.parents[1:4]][::-1]
        key = "/".join((["robotwin"] + parents[1:] if layout == LEGACY else parents) + [file.stem])
        lengths, cameras = {}, []
        for view in self.views:
            name = self._camera(h5, layout, view, file, key)
            cameras.append(name)
            lengths[name] = checked(h5, name, file, key, kind="bytes", shape=(None,)).shape[0]
        if layout == LEGACY:
            lengths["joint_action/vector"] = checked(
                h5, "joint_action/vector", file, key, kind="float", shape=(None, 14)
            ).shape[0]
            instruction = self._legacy_instruction(file, key)
        else:
            for group in ("state", "action"):
                for joint in XPOLICYLAB_JOINTS:
                    dataset = checked(h5, f"{group}/{joint}", file, key, kind="float", shape=(None, None))
                    lengths[dataset.name.lstrip("/")] = dataset.shape[0]
            instruction = self._xpolicylab_instruction(h5, file, key)
        return Episode(EpisodeInfo(key, instruction, require_steps(file, key, lengths)), file, (layout, tuple(cameras)))

    def _camera(self, h5: h5py.File, layout: str, view: str, file: Path, key: str) -> str:
        """The dataset holding `view`'s JPEGs: the layout's canonical camera, or a mapped `name=column`
        given as a dataset path or a camera group (`front_camera`, `cam_third_view`)."""
        if view not in self.view_map:
            if view not in CAMERAS[layout]:
                raise SourceError(
                    file,
                    f"view {view!r} does not exist in the {layout} layout "
                    f"(it has {list(CAMERAS[layout])}; map others with name=camera)",
                    episode=key,
                )
            return CAMERAS[layout][view]
        column = self.view_map[view]
        for name in (column, f"observation/{column}/rgb", f"vision/{column}/colors"):
            if isinstance(h5.get(name), h5py.Dataset):
                return name
        group = h5["observation" if layout == LEGACY else "vision"]
        raise SourceError(file, f"view {view}={column}: no such camera (cameras: {sorted(group)})", episode=key)

    @staticmethod
    def _legacy_instruction(file: Path, key: str) -> str:
        path = file.parent.parent / "instructions" / f"{file.stem}.json"
        try:
            return str(json.loads(path.read_text())["seen"][0])
        except FileNotFoundError:
            raise SourceError(path, 'missing instructions file (expected {"seen": [...], ...})', episode=key) from None
        except (OSError, json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise SourceError(path, 'expected JSON with a non-empty "seen" list', episode=key, key="seen") from None

    @staticmethod
    def _xpolicylab_instruction(h5: h5py.File, file: Path, key: str) -> str:
        if "instructions" not in h5:
            raise SourceError(file, "missing (expected a JSON list of instructions)", episode=key, key="instructions")
        raw = h5["instructions"][()]
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return text
        if isinstance(value, list) and value and isinstance(value[0], str):
            return value[0]
        if isinstance(value, str):
            return value
        raise SourceError(file, f"{text[:60]!r} is not a list of instructions", episode=key, key="instructions")

    def _read_frames(self, episode: Episode, start: int, stop: int) -> np.ndarray:
        (_, names), key, file = episode.where, episode.info.key, episode.file
        h5 = self._process_local("h5", HandleCache)
        return decode_views(
            [read_range(h5.dataset(file, name), start, stop, file, key) for name in names],
            self.views,
            names,
            start,
            file,
            key,
            robotwin_channels=True,
        )

    def _read_vectors(self, episode: Episode, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        (layout, _), key, file = episode.where, episode.info.key, episode.file
        h5 = self._process_local("h5", HandleCache)
        if layout == LEGACY:
            actions = read_range(h5.dataset(file, "joint_action/vector"), start, stop, file, key).astype(np.float32)
            require_finite(actions, file, key, "joint_action/vector", start)
            return actions, actions.copy()
        packed = {}
        for group in ("state", "action"):
            parts = []
            for joint in XPOLICYLAB_JOINTS:
                parts.append(
                    read_range(h5.dataset(file, f"{group}/{joint}"), start, stop, file, key).astype(np.float32)
                )
                require_finite(parts[-1], file, key, f"{group}/{joint}", start)
            packed[group] = np.concatenate(parts, axis=1)
        return packed["action"], packed["state"]

    def _variant(self) -> str:
        return "+".join(sorted({episode.where[0] for episode in self._entries().values()}))
