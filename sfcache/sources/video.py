"""Frames of video-encoded cameras (LeRobot's default storage), picked by timestamp as LeRobot does.

LeRobot asks a video for the frame at each timestamp (the row's `timestamp`, plus the episode's
`from_timestamp` inside a v3.0 file that packs many episodes) and takes the decoded frame whose
presentation time is closest, failing when none is within `tolerance_s` (1e-4 s by default). Here the
same rule runs on PyAV (FFmpeg, which decodes LeRobot's AV1 / H.264 / HEVC): one seek to the keyframe
before the first asked time, decoding up to the last, and only the asked frames converted to RGB.
"""

from __future__ import annotations

from collections import OrderedDict
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from sfcache.errors import SourceError

TOLERANCE_S = 1e-4  # LeRobotDataset's default tolerance_s
OPEN_FILES = 8  # containers kept open per process (v3.0 packs many episodes in one file)


class VideoFiles:
    """Per-process open PyAV containers, most recently used kept."""

    def __init__(self):
        self._open: OrderedDict[Path, av.container.InputContainer] = OrderedDict()

    def container(self, file: Path, episode: str, key: str) -> av.container.InputContainer:
        if file in self._open:
            self._open.move_to_end(file)
            return self._open[file]
        try:
            container = av.open(str(file))
            container.streams.video[0]
        except FileNotFoundError:
            raise SourceError(file, "missing video file for this camera", episode=episode, key=key) from None
        except (av.FFmpegError, IndexError, OSError) as err:
            raise SourceError(file, f"not a readable video ({err})", episode=episode, key=key) from None
        self._open[file] = container
        if len(self._open) > OPEN_FILES:
            self._open.popitem(last=False)[1].close()
        return container


def frames_at(
    container: av.container.InputContainer,
    timestamps: np.ndarray,
    file: Path,
    episode: str,
    key: str,
    tolerance_s: float = TOLERANCE_S,
) -> np.ndarray:
    """uint8 [T, H, W, 3] RGB: for each timestamp (seconds, ascending) the closest decoded frame."""
    stream = container.streams.video[0]
    base = stream.time_base or Fraction(1, 1)
    first, last = float(timestamps.min()), float(timestamps.max())
    times, frames = [], []
    try:
        container.seek(max(0, int(first / base)), stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            time = float(frame.pts * base)
            if time < first - tolerance_s:
                continue
            if time > last + tolerance_s:
                break
            times.append(time)
            frames.append(frame)
    except av.FFmpegError as err:
        raise SourceError(file, f"video decode failed near {first:.4f} s ({err})", episode=episode, key=key) from None
    if not times:
        raise SourceError(
            file, f"no frame between {first:.4f} s and {last:.4f} s (video ends early?)", episode=episode, key=key
        )
    decoded = np.asarray(times)
    nearest = np.abs(decoded[None, :] - timestamps[:, None]).argmin(axis=1)
    off = np.abs(decoded[nearest] - timestamps)
    if (off > tolerance_s).any():
        first_bad = int(np.flatnonzero(off > tolerance_s)[0])
        raise SourceError(
            file,
            f"no frame within {tolerance_s} s of timestamp {timestamps[first_bad]:.4f} s "
            f"(closest {decoded[nearest[first_bad]]:.4f} s; expected one frame per row timestamp)",
            episode=episode,
            key=key,
        )
    rgb = {int(i): frames[int(i)].to_ndarray(format="rgb24") for i in np.unique(nearest)}
    return np.stack([rgb[int(i)] for i in nearest])
