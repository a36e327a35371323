"""Turn uint8 frames, exactly as the policy sees them, into the float images VGGT is fed.

Modes:
- "sf":   what Spatial Forcing's OpenVLA-OFT trainer feeds VGGT: the policy's 224x224 input (frames of
          another size are first resized like the RLDS pipeline does: TF lanczos3 with antialias, rounded
          to uint8), turned into float through the processor's normalize/un-normalize round trip, then
          bicubic-upsampled (align_corners=False) to img_size, not clamped.
- "crop": the official `load_and_preprocess_images(mode="crop")`: width -> img_size, height kept in
          aspect ratio rounded to a multiple of 14 (PIL bicubic), center-cropped to img_size if taller.
- "pad":  the same with the long side -> img_size and white (1.0) padding to img_size x img_size.
- "letterbox": what openpi-SF feeds VGGT: the policy's 224x224 image made by openpi's `resize_with_pad`
          (PIL bilinear, aspect kept, centred, black padding), as float via openpi's [-1, 1] round trip,
          padding set to white (1.0), then bicubic (align_corners=False) to img_size, not clamped.
          `letterbox_mask` gives the pixels that hold image content.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MODES = ("sf", "crop", "pad", "letterbox")
POLICY_SIZE = 224  # OpenVLA-OFT's image size (RLDS resize_resolution)
PATCH = 14  # the official preprocessing rounds to multiples of VGGT's patch size
POLICY_MEAN = (0.485, 0.456, 0.406)  # OpenVLA's DINOv2 normalisation, undone by SF before VGGT
POLICY_STD = (0.229, 0.224, 0.225)
LANCZOS_RADIUS = 3
TF_PI = np.float32(3.14159265359)  # the constant TF's sampling kernels use


def preprocess(frames: np.ndarray | torch.Tensor, mode: str = "sf", img_size: int = 518) -> torch.Tensor:
    """uint8 frames [B, S, H, W, 3] -> float32 images [B, S, 3, H', W'] for VGGTFeatures (on the CPU)."""
    frames = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    staged = host_frames(frames, mode, img_size)
    return device_images(torch.from_numpy(staged), mode, img_size, frames.shape[2:4])


def host_frames(frames: np.ndarray, mode: str = "sf", img_size: int = 518) -> np.ndarray:
    """The part of `preprocess` that stays on the CPU, uint8 [B, S, H, W, 3] -> uint8 [B, S, h, w, 3].

    PIL's resizes (crop/pad bicubic, letterbox bilinear) run here; everything after them, and all of
    "sf" (TF lanczos3 included), is `device_images`, so only uint8 frames cross to an accelerator.
    """
    if frames.dtype != np.uint8 or frames.ndim != 5 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [B, S, H, W, 3], got {frames.dtype} {frames.shape}")
    if mode not in MODES:
        raise ValueError(f"preprocess mode must be one of {', '.join(MODES)}, not {mode!r}")
    if img_size % PATCH:
        raise ValueError(f"img_size {img_size} is not a multiple of {PATCH}")
    if mode == "sf":
        return frames
    batch, views = frames.shape[:2]
    flat = frames.reshape(batch * views, *frames.shape[2:])
    staged = letterbox(flat) if mode == "letterbox" else _official_resize(flat, mode, img_size)
    return staged.reshape(batch, views, *staged.shape[1:])


def output_size(frames: np.ndarray, mode: str, img_size: int) -> tuple[int, int]:
    """(H', W') that `device_images` makes of these `host_frames`, without computing them."""
    if mode == "crop":
        return min(frames.shape[-3], img_size), img_size
    return img_size, img_size


def device_images(frames: torch.Tensor, mode: str, img_size: int, source_size: tuple[int, int]) -> torch.Tensor:
    """`host_frames` output as a uint8 tensor on any device -> float32 [B, S, 3, H', W'] on that device.

    `source_size` is the (H, W) of the frames before `host_frames` (the letterbox mask needs it).
    The same code runs on the CPU (`preprocess`) and on the model's GPU, so they agree: the lanczos3
    taps are separate float32 multiplies and adds (no fused multiply-add) in TF's order, hence bit-exact
    after the uint8 rounding on any IEEE device; only the bicubic kernel's float rounding may differ.
    """
    batch, views = frames.shape[:2]
    flat = frames.reshape(batch * views, *frames.shape[2:])
    if mode == "sf":
        images = _sf_images(flat, img_size)
    elif mode == "letterbox":
        images = _letterbox_images(flat, img_size, source_size)
    else:
        images = _official_images(flat, mode, img_size)
    return images.reshape(batch, views, *images.shape[1:])


def letterbox_geometry(height: int, width: int, size: int = POLICY_SIZE) -> tuple[int, int, int, int]:
    """(top, left, resized height, resized width) of an H x W frame in openpi's size x size letterbox,
    with openpi's own float arithmetic and truncations (`_resize_with_pad_pil`)."""
    if (height, width) == (size, size):
        return 0, 0, size, size
    ratio = max(width / size, height / size)
    new_height, new_width = int(height / ratio), int(width / ratio)
    return max(0, int((size - new_height) / 2)), max(0, int((size - new_width) / 2)), new_height, new_width


def letterbox(frames: np.ndarray, size: int = POLICY_SIZE) -> np.ndarray:
    """uint8 [N, H, W, 3] -> uint8 [N, size, size, 3] as `openpi_client.image_tools.resize_with_pad`:
    PIL bilinear resize keeping the aspect ratio, pasted into a black canvas."""
    height, width = frames.shape[1:3]
    if (height, width) == (size, size):
        return frames
    top, left, new_height, new_width = letterbox_geometry(height, width, size)
    out = np.zeros((len(frames), size, size, 3), np.uint8)
    for canvas, frame in zip(out, frames):
        resized = Image.fromarray(frame).resize((new_width, new_height), Image.Resampling.BILINEAR)
        canvas[top : top + new_height, left : left + new_width] = np.asarray(resized)
    return out


def letterbox_mask(height: int, width: int, size: int = POLICY_SIZE) -> np.ndarray:
    """bool [size, size]: True where the letterboxed H x W frame has image content (openpi's padding mask)."""
    top, left, new_height, new_width = letterbox_geometry(height, width, size)
    mask = np.zeros((size, size), bool)
    mask[top : top + new_height, left : left + new_width] = True
    return mask


def _letterbox_images(frames: torch.Tensor, img_size: int, source_size: tuple[int, int]) -> torch.Tensor:
    content = torch.from_numpy(letterbox_mask(*source_size)).to(frames.device)
    images = frames.permute(0, 3, 1, 2).float()
    images = (images / 255.0 * 2.0 - 1.0) / 2.0 + 0.5  # openpi's uint8 -> [-1, 1], then SF's back to [0, 1]
    images = images.masked_fill(~content, 1.0)  # padding -> white in the VGGT copy
    return _upsample(images, img_size)


def _sf_images(frames: torch.Tensor, img_size: int) -> torch.Tensor:
    if frames.shape[1:3] != (POLICY_SIZE, POLICY_SIZE):
        frames = resize_like_rlds_tensor(frames, POLICY_SIZE, POLICY_SIZE)
    images = frames.permute(0, 3, 1, 2).float().div(255)
    # pixel_values -> VGGT input in SF: torchvision normalize, then normalize with (-mean/std, 1/std)
    mean, std = np.array(POLICY_MEAN), np.array(POLICY_STD)
    images = _normalize(images, mean, std)
    images = _normalize(images, -mean / std, 1 / std)
    return _upsample(images, img_size)


def _upsample(images: torch.Tensor, img_size: int) -> torch.Tensor:
    """Bicubic (align_corners=False) to img_size, not clamped; a contiguous input takes torch's faster
    kernel (the channels-last one that a permuted HWC frame would select gives the same values, slower)."""
    return F.interpolate(images.contiguous(), size=(img_size, img_size), mode="bicubic", align_corners=False)


def _normalize(images: torch.Tensor, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    """torchvision's normalize: float32 mean/std, subtract then divide."""

    def as_channels(values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(values, dtype=images.dtype).view(1, 3, 1, 1)

    return images.sub(as_channels(mean)).div(as_channels(std))


def _official_size(height: int, width: int, mode: str, img_size: int) -> tuple[int, int]:
    """(height, width) the official preprocessing resizes an H x W frame to, before crop or pad."""
    if mode == "crop" or width >= height:
        return round(height * (img_size / width) / PATCH) * PATCH, img_size
    return img_size, round(width * (img_size / height) / PATCH) * PATCH


def _official_resize(frames: np.ndarray, mode: str, img_size: int) -> np.ndarray:
    new_height, new_width = _official_size(*frames.shape[1:3], mode, img_size)
    return np.stack(
        [
            np.asarray(Image.fromarray(frame).resize((new_width, new_height), Image.Resampling.BICUBIC))
            for frame in frames
        ]
    )


def _official_images(resized: torch.Tensor, mode: str, img_size: int) -> torch.Tensor:
    new_height, new_width = resized.shape[1:3]
    images = resized.permute(0, 3, 1, 2).float().div(255)
    if mode == "crop":
        top = max(new_height - img_size, 0) // 2
        return images[:, :, top : top + img_size]
    pad_h, pad_w = img_size - new_height, img_size - new_width
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=1.0)


def resize_like_rlds(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [N, H, W, 3] resized as OpenVLA's RLDS pipeline does (dlimp `resize_image`).

    That is `tf.image.resize(method="lanczos3", antialias=True)`, then round half to even and clip to uint8.
    Reimplemented from TF's ScaleAndTranslate kernel: same spans and normalised float32 weights, rows then
    columns, float32 multiply-adds in span order (a matrix product would round differently near .5).
    """
    return resize_like_rlds_tensor(torch.from_numpy(frames), height, width).numpy()


def resize_like_rlds_tensor(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`resize_like_rlds` on a uint8 tensor of any device, computed there."""
    device = frames.device
    image = _resample_rows(frames.float(), *_spans_on(frames.shape[1], height, device))
    image = _resample_rows(image.transpose(1, 2), *_spans_on(frames.shape[2], width, device)).transpose(1, 2)
    return image.round().clamp(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=16)
def _spans_on(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`_lanczos3_spans` kept on `device` (copied there once, not per batch)."""
    indices, weights = _lanczos3_spans(in_size, out_size)
    return indices.to(device), weights.to(device)


@functools.lru_cache(maxsize=16)
def _lanczos3_spans(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output pixel, the input indices [out, span] and float32 weights [out, span] of TF's lanczos3."""
    f32 = np.float32
    scale = f32(out_size) / f32(in_size)
    inv_scale = f32(1.0 / float(scale))
    kernel_scale = max(inv_scale, f32(1.0))  # widen the kernel when shrinking: the antialias
    reach = f32(LANCZOS_RADIUS) * kernel_scale
    span_size = min(2 * math.ceil(reach) + 1, in_size)
    indices = np.zeros((out_size, span_size), dtype=np.int64)
    weights = np.zeros((out_size, span_size), dtype=np.float32)
    for x in range(out_size):
        sample = f32(x + 0.5) * inv_scale
        first = min(max(math.ceil(sample - reach - f32(0.5)), 0), in_size - 1)
        last = min(max(math.floor(sample + reach - f32(0.5)), 0), in_size - 1) + 1
        offsets = (np.arange(first, last, dtype=np.float32) + f32(0.5) - sample) * (f32(1.0) / kernel_scale)
        span = _lanczos3(np.abs(offsets))
        total = f32(0.0)
        for weight in span:  # TF sums in span order, in float32
            total = f32(total + weight)
        weights[x, : len(span)] = span * (f32(1.0) / total)
        indices[x] = np.minimum(np.arange(first, first + span_size), in_size - 1)  # padding taps weigh 0
    return torch.from_numpy(indices), torch.from_numpy(weights)


def _resample_rows(image: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sums over spans of axis 1 of [N, H, W, C], accumulated tap by tap like TF."""
    image = image.contiguous()
    out = torch.zeros(image.shape[0], len(indices), *image.shape[2:], device=image.device)
    for tap in range(indices.shape[1]):  # a separate multiply, then add: never fused, so exact anywhere
        out += image.index_select(1, indices[:, tap]) * weights[:, tap].view(1, -1, 1, 1)
    return out


def _lanczos3(x: np.ndarray) -> np.ndarray:
    radius = np.float32(LANCZOS_RADIUS)

    def sin(angle: np.ndarray) -> np.ndarray:  # correctly rounded float32 sine, like C's sinf
        return np.sin(angle.astype(np.float64)).astype(np.float32)

    with np.errstate(divide="ignore", invalid="ignore"):
        value = radius * sin(TF_PI * x) * sin(TF_PI * x / radius) / (TF_PI * TF_PI * x * x)
    return np.where(x <= 1e-3, np.float32(1.0), np.where(x > radius, np.float32(0.0), value)).astype(np.float32)
