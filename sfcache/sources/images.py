"""Decode the frames datasets embed as bytes: JPEG with libjpeg-turbo (simplejpeg), PNG with Pillow.

JPEG DCT: libjpeg's accurate ISLOW by default; `fast_dct` selects IFAST, which is what TensorFlow's
default `tf.io.decode_image` uses (so RLDS frames decode bit for bit as OpenVLA-OFT's pipeline sees them).

RoboTwin quirk: its JPEGs were written by `cv2.imencode` from RGB arrays, so a true-RGB decoder
returns BGR. XPolicyLab's newer encoder stores real RGB and stamps a JPEG comment (COM) segment
`XPL-RGB1`; `opencv_channel_order` tells the two apart from the bytes alone.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image

from sfcache.errors import SourceError

_JPEG_MAGIC = b"\xff\xd8"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_RGB_MARKER = b"XPL-RGB1"
_COM, _SOS = 0xFE, 0xDA


class ImageDecodeError(ValueError):
    """The bytes are not a decodable JPEG/PNG; readers turn it into a SourceError with context."""


def decode_image(
    data: bytes, *, bgr: bool = False, out: np.ndarray | None = None, fast_dct: bool = False
) -> np.ndarray:
    """One embedded image -> uint8 [H, W, 3] RGB; `bgr` swaps channels (in libjpeg-turbo for JPEG);
    `out` is a contiguous [H, W, 3] slot a JPEG is decoded straight into; `fast_dct`: IFAST like TF."""
    if data[:2] == _JPEG_MAGIC:
        try:
            image = simplejpeg.decode_jpeg(data, colorspace="BGR" if bgr else "RGB", buffer=out, fastdct=fast_dct)
        except ValueError as err:
            if out is not None and "too small" in str(err):
                raise ImageDecodeError(f"frame larger than the episode's {out.shape[:2]} (expected one size)") from None
            raise ImageDecodeError(f"undecodable JPEG ({len(data)} bytes: {err})") from None
    elif data[:8] == _PNG_MAGIC:
        try:
            with Image.open(io.BytesIO(data)) as opened:
                image = np.asarray(opened.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as err:
            raise ImageDecodeError(f"undecodable PNG ({len(data)} bytes: {err})") from None
        image = image[..., ::-1] if bgr else image
    else:
        raise ImageDecodeError(f"neither JPEG nor PNG ({len(data)} bytes, starts {data[:8]!r})")
    if out is not None and image.shape != out.shape:
        raise ImageDecodeError(
            f"frame {image.shape[:2]} differs from the episode's {out.shape[:2]} (expected one size)"
        )
    if out is not None and not np.shares_memory(image, out):
        out[...] = image
    return image


def opencv_channel_order(data: bytes) -> bool:
    """True for a JPEG written by cv2.imencode from an RGB array (no XPL-RGB1 comment before the scan)."""
    position = 2
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == _SOS:
            break
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == _COM and data[position + 4 : position + 2 + length] == _RGB_MARKER:
            return False
        position += 2 + length
    return True


def decode_views(
    views: Sequence[Sequence[bytes]],
    names: Sequence[str],
    keys: Sequence[str],
    first_step: int,
    file: Path,
    episode: str,
    robotwin_channels: bool = False,
    fast_dct: bool = False,
) -> np.ndarray:
    """Encoded frames per view -> uint8 [T, V, H, W, 3], each frame decoded straight into place.

    robotwin_channels: swap cv2-written JPEGs (no XPL-RGB1 marker) back to RGB; fast_dct: IFAST JPEG DCT
    (TF's default decode). A bad frame is named by view key and step; views must share one frame size.
    """

    def decode(blob, view: int, step: int, out=None) -> np.ndarray:
        data = bytes(blob)
        try:
            return decode_image(data, bgr=robotwin_channels and opencv_channel_order(data), out=out, fast_dct=fast_dct)
        except ImageDecodeError as err:
            raise SourceError(file, f"step {first_step + step}: {err}", episode=episode, key=keys[view]) from None

    firsts = [decode(blobs[0], view, 0) for view, blobs in enumerate(views)]
    check_frame_sizes([first.shape for first in firsts], names, file, episode)
    frames = np.empty((len(views[0]), len(views), *firsts[0].shape), np.uint8)
    for view, blobs in enumerate(views):
        frames[0, view] = firsts[view]
        for step in range(1, len(blobs)):
            decode(blobs[step], view, step, out=frames[step, view])
    return frames


def check_frame_sizes(shapes: Sequence[tuple], names: Sequence[str], file: Path, episode: str) -> None:
    """VGGT takes one frame size for all views of a step."""
    if len({shape[:2] for shape in shapes}) > 1:
        listed = ", ".join(f"{name} {shape[0]}x{shape[1]}" for name, shape in zip(names, shapes))
        raise SourceError(file, f"views have different frame sizes ({listed}); expected one size", episode=episode)


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    """RGB -> JPEG with OpenCV's defaults (quality 95, 4:2:0), as the datasets were written."""
    return simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality=quality, colorspace="RGB", colorsubsampling="420")


def encode_png(rgb: np.ndarray) -> bytes:
    """RGB -> PNG, as HuggingFace datasets embed images in LeRobot parquet."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()
