"""Crop + colour augmentation as OpenVLA-OFT, with the same crop applied to the cached target grid.

Online SF runs VGGT on the augmented image, so its targets follow the crop. A cache holds
targets of the un-augmented frame; resampling the cached grid over the same crop box keeps
each target token on the image content its VLA token sees. Colour jitter changes no geometry,
so it leaves targets alone.

Boxes are (y0, x0, y1, x1) in fractions of the image, one per sample; `sfcache.crop.crop_target_grid`
resamples the cached grid over them.
"""

from __future__ import annotations

import math

import torch

from sfcache.crop import crop_resize

CROP_AREA = 0.9  # OpenVLA-OFT: random_resized_crop scale [0.9, 0.9], ratio [1, 1]


def random_boxes(batch: int, generator: torch.Generator, area: float = CROP_AREA) -> torch.Tensor:
    """Square-in-relative-units boxes of `area` of the image at uniform random positions: [B, 4]."""
    side = math.sqrt(area)
    corner = torch.rand(batch, 2, generator=generator) * (1.0 - side)
    return torch.cat([corner, corner + side], dim=1)


def center_boxes(batch: int, area: float = CROP_AREA) -> torch.Tensor:
    """The evaluation crop: the central `area` of the image, [B, 4]."""
    side = math.sqrt(area)
    lo = (1.0 - side) / 2
    return torch.tensor([lo, lo, lo + side, lo + side]).expand(batch, 4).clone()


def crop_images(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each sample's views [B, V, 3, H, W] to its box and resize to size x size (bilinear).

    Pixel centers of the output map to the box linearly (the resize of a crop).
    """
    batch, views = images.shape[:2]
    out = crop_resize(images.flatten(0, 1), boxes.repeat_interleave(views, dim=0), size)
    return out.view(batch, views, 3, size, size)


def colour_jitter(
    images: torch.Tensor,
    generator: torch.Generator,
    brightness: float = 0.2,
    contrast: float = 0.2,
    saturation: float = 0.2,
    hue: float = 0.05,
) -> torch.Tensor:
    """OpenVLA-OFT's colour augmentation on [B, V, 3, H, W] in [0, 1], one draw per sample.

    Brightness adds delta in [-b, b], contrast and saturation scale by [1-c, 1+c] about the
    mean / the grey value, hue rotates chroma by up to `hue` turns (in YIQ space). Clamped to [0, 1].
    """
    batch = images.shape[0]

    def uniform(half_width: float) -> torch.Tensor:
        return ((torch.rand(batch, generator=generator) * 2 - 1) * half_width).to(images.device).view(batch, 1, 1, 1, 1)

    grey_weights = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 1, 3, 1, 1)
    x = images + uniform(brightness)
    x = (x - x.mean(dim=(2, 3, 4), keepdim=True)) * (1 + uniform(contrast)) + x.mean(dim=(2, 3, 4), keepdim=True)
    grey = (x * grey_weights).sum(dim=2, keepdim=True)
    x = (x - grey) * (1 + uniform(saturation)) + grey
    x = _rotate_hue(x, uniform(hue) * 2 * math.pi)
    return x.clamp(0.0, 1.0)


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _rotate_hue(images: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma (I, Q) plane of [B, V, 3, H, W] by per-sample `angle` radians."""
    to_yiq = _RGB_TO_YIQ.to(images.device)
    yiq = torch.einsum("ij,bvjhw->bvihw", to_yiq, images)
    cos, sin = angle.cos()[:, :, 0], angle.sin()[:, :, 0]  # [B, 1, 1, 1]
    i, q = yiq[:, :, 1:2], yiq[:, :, 2:3]
    yiq = torch.cat(
        [yiq[:, :, :1], i * cos[..., None] - q * sin[..., None], i * sin[..., None] + q * cos[..., None]], dim=2
    )
    return torch.einsum("ij,bvjhw->bvihw", torch.linalg.inv(to_yiq), yiq)
