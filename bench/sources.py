"""Source readers against the plainest read + decode of the same bytes (frames/s, best of a few runs).

The source does more than the baseline (index, structural checks, CRCs, range checks, finite checks,
channel/orientation fixes); the ratio shows what that costs.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import simplejpeg
from PIL import Image

from bench import best_seconds, preset_settings
from sfcache.sources import open_source
from sfcache.sources import synthetic as syn

PRESETS = {"tiny": {"episodes": 4, "steps": 40, "repeats": 2}, "vggt-1b": {"episodes": 10, "steps": 100, "repeats": 3}}


def _through_source(path: Path) -> Callable[[], int]:
    def work() -> int:
        source = open_source(path)
        return sum(source.read(info.key).frames.shape[0] for info in source.episodes())

    return work


def _libero_hdf5_baseline(files: list[Path]) -> Callable[[], None]:
    def work() -> None:
        for file in files:
            with h5py.File(file, "r") as h5:
                for demo in h5["data"].values():
                    for name in ("obs/agentview_rgb", "obs/eye_in_hand_rgb"):
                        np.ascontiguousarray(demo[name][:][:, ::-1, ::-1])
                    demo["actions"][:], demo["obs/gripper_states"][:]

    return work


def _rlds_baseline(files: list[Path]) -> Callable[[], None]:
    # imported here: the tfrecord package registers tf.train.Example in protobuf's default pool, which
    # TensorFlow then fails to import beside (importing this module must stay harmless)
    from tfrecord.reader import example_loader

    keys = {
        "steps/observation/image": "byte",
        "steps/observation/wrist_image": "byte",
        "steps/action": "float",
        "steps/observation/state": "float",
    }

    def work() -> None:
        for file in files:
            for record in example_loader(str(file), None, keys):
                for name in ("steps/observation/image", "steps/observation/wrist_image"):
                    [simplejpeg.decode_jpeg(bytes(jpeg)) for jpeg in record[name]]

    return work


def _lerobot_baseline(files: list[Path]) -> Callable[[], None]:
    def work() -> None:
        for file in files:
            table = pq.read_table(file, columns=["image", "wrist_image", "state", "actions"]).to_pydict()
            for name in ("image", "wrist_image"):
                [np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB")) for cell in table[name]]

    return work


def _robotwin_baseline(files: list[Path], cameras: list[str]) -> Callable[[], None]:
    def work() -> None:
        for file in files:
            with h5py.File(file, "r") as h5:
                for name in cameras:
                    [simplejpeg.decode_jpeg(jpeg)[..., ::-1] for jpeg in h5[name][:]]

    return work


def run(workdir: Path, preset: str) -> list[dict]:
    """One row per format: frames/s through open_source vs a bare read + decode of the same files."""
    settings = preset_settings(PRESETS, preset, "sources")
    episodes, steps, repeats = settings["episodes"], settings["steps"], settings["repeats"]
    legacy_cams = [f"observation/{c}/rgb" for c in ("head_camera", "left_camera", "right_camera")]
    xpl_cams = [f"vision/{c}/colors" for c in ("cam_head", "cam_left_wrist", "cam_right_wrist")]
    cases = {
        "libero_hdf5": (
            syn.write_libero_hdf5(workdir / "h5", tasks=2, demos=episodes // 2, steps=steps),
            2,
            _libero_hdf5_baseline,
            "h5py slices + 180-degree flip",
        ),
        "libero_rlds": (
            syn.write_libero_rlds(workdir / "rlds", episodes=episodes, steps=steps, shards=2),
            2,
            _rlds_baseline,
            "tfrecord example_loader (no CRC) + simplejpeg",
        ),
        "lerobot": (
            syn.write_lerobot(workdir / "lerobot", episodes=episodes, steps=steps),
            2,
            _lerobot_baseline,
            "pyarrow read_table + Pillow PNG",
        ),
        "robotwin_legacy": (
            syn.write_robotwin(workdir / "rt", tasks=2, episodes=episodes // 2, steps=steps),
            3,
            lambda files: _robotwin_baseline(files, legacy_cams),
            "h5py + simplejpeg + BGR swap",
        ),
        "robotwin_xpolicylab": (
            syn.write_robotwin(workdir / "xpl", layout="xpolicylab", tasks=2, episodes=episodes // 2, steps=steps),
            3,
            lambda files: _robotwin_baseline(files, xpl_cams),
            "h5py + simplejpeg",
        ),
    }
    rows = []
    for name, (written, views, baseline, how) in cases.items():
        frames = views * sum(len(e.actions) for e in written.episodes.values())
        value = frames / best_seconds(repeats, _through_source(written.path))
        reference = frames / best_seconds(repeats, baseline(written.files))
        rows.append(
            {
                "bench": "sources",
                "metric": f"{name} read+decode",
                "value": value,
                "baseline": reference,
                "ratio": value / reference,
                "unit": "frames/s",
                "notes": f"{frames} frames incl. indexing; baseline: {how}",
            }
        )
    return rows
