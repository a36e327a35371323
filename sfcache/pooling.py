"""Spatial Forcing's target grid: VGGT patch tokens resampled to the policy's token grid, plus its position embedding.

Both follow SF's OpenVLA-OFT code (prismatic/util/pooling_utils.py `interpolate_pooling` / `_apply_pos_embed`,
built on VGGT's `create_uv_grid` and `position_grid_to_embed`). Resampling is linear, so
pool_grid(f + E) == pool_grid(f) + pool_grid(E): a cache stores pool_grid(f) and adds the pooled embedding on read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from sfcache.vggt import VGGTFeatures

POSITION_OMEGA = 100.0  # omega_0 of VGGT's sinusoidal position_grid_to_embed
POSITION_SCALE = 0.1  # SF's `ratio` in _apply_pos_embed


def pooled_targets(
    model: VGGTFeatures, images: torch.Tensor, layers: Sequence[int], grid: tuple[int, int] | None
) -> dict[int, torch.Tensor]:
    """SF targets of preprocessed `images` [B, V, 3, h, w]: VGGT's patch tokens of `layers` pooled to `grid`
    per view (None keeps VGGT's grid), keyed by absolute layer, [B, V, H*W, C] on the model's device.
    The one place extraction, verification and the online baseline turn frames into targets."""
    patch = model.config.patch_size
    native = (images.shape[-2] // patch, images.shape[-1] // patch)
    out = model(images, layers=tuple(layers))
    return {
        layer: out[asked] if grid is None else pool_grid(out[asked], native, grid)
        for asked, layer in zip(layers, model.resolve_layers(layers))
    }


def pool_grid(
    tokens: torch.Tensor | np.ndarray, grid: tuple[int, int], out_grid: tuple[int, int]
) -> torch.Tensor | np.ndarray:
    """Resample row-major tokens [..., h*w, D] to [..., H*W, D]: bilinear, align_corners=True, as SF does.

    Computed in float32; the result has the input's type (numpy in, numpy out) and dtype.
    """
    as_numpy = isinstance(tokens, np.ndarray)
    source = torch.from_numpy(tokens) if as_numpy else tokens
    (grid_h, grid_w), (out_h, out_w) = grid, out_grid
    if source.ndim < 2 or source.shape[-2] != grid_h * grid_w:
        raise ValueError(f"tokens {tuple(source.shape)} do not hold a {grid_h}x{grid_w} grid on axis -2")
    lead, dim = source.shape[:-2], source.shape[-1]
    images = source.reshape(-1, grid_h, grid_w, dim).permute(0, 3, 1, 2).float()
    pooled = F.interpolate(images, size=(out_h, out_w), mode="bilinear", align_corners=True)
    pooled = pooled.permute(0, 2, 3, 1).reshape(*lead, out_h * out_w, dim).to(source.dtype)
    return pooled.numpy() if as_numpy else pooled


def position_embedding(h: int, w: int, dim: int, aspect_ratio: float) -> torch.Tensor:
    """SF's fixed 2D sinusoidal embedding of an h x w patch grid, [h*w, dim] float32, scale 0.1 included.

    aspect_ratio is the image's width / height (1.0 for VGGT's 518x518 input). Coordinates span
    +-(span * (n-1)/n) with spans normalised by the diagonal; channels are [sin(x), cos(x), sin(y), cos(y)],
    dim/4 frequencies each, omega_k = 100^(-k/(dim/4)), evaluated in float64.
    """
    if dim % 4:
        raise ValueError(f"position embedding dim {dim} is not a multiple of 4")
    diagonal = (aspect_ratio**2 + 1.0) ** 0.5
    span_x, span_y = aspect_ratio / diagonal, 1.0 / diagonal
    xs = torch.linspace(-span_x * (w - 1) / w, span_x * (w - 1) / w, steps=w, dtype=torch.float32)
    ys = torch.linspace(-span_y * (h - 1) / h, span_y * (h - 1) / h, steps=h, dtype=torch.float32)
    grid_x, grid_y = torch.meshgrid(xs, ys, indexing="xy")  # [h, w] each
    quarter = dim // 4
    omega = 1.0 / POSITION_OMEGA ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def sincos(coordinate: torch.Tensor) -> torch.Tensor:
        angle = coordinate.reshape(-1).double()[:, None] * omega
        return torch.cat((angle.sin(), angle.cos()), dim=1).float()

    return torch.cat((sincos(grid_x), sincos(grid_y)), dim=1) * POSITION_SCALE
