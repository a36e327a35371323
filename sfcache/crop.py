"""Cached target grids resampled over a crop box, so a target token stays on the image content its
VLA token sees after crop augmentation (online SF runs VGGT on the cropped image).

Boxes are (y0, x0, y1, x1) in fractions of the image extent, output pixel centres mapping linearly
into the box (the resize of a crop): one per sample `[B, 4]` (all views) or one per view `[B, V, 4]`
(OpenVLA-OFT draws each camera's crop with its own seed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sfcache.errors import SfcacheError

__all__ = ["crop_resize", "crop_target_grid", "per_view_boxes"]


def crop_resize(maps: torch.Tensor, boxes: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Crop each map [N, C, H, W] to its box [N, 4] and resize to size x size: the policy's image crop
    (`bilinear`) and, with `nearest`, the same crop of a depth map (no depth blended across an object's edge)."""
    y0, x0, y1, x1 = boxes.float().unbind(1)
    theta = torch.zeros(len(boxes), 2, 3, dtype=torch.float32)  # output pixel-centre fraction u -> y0 + (y1-y0)*u
    theta[:, 0, 0], theta[:, 0, 2] = x1 - x0, x0 + x1 - 1.0
    theta[:, 1, 1], theta[:, 1, 2] = y1 - y0, y0 + y1 - 1.0
    grid = F.affine_grid(theta.to(maps.device), [maps.shape[0], maps.shape[1], size, size], align_corners=False)
    return F.grid_sample(maps.float(), grid, mode=mode, padding_mode="border", align_corners=False)


def per_view_boxes(boxes: torch.Tensor, batch: int, views: int) -> torch.Tensor:
    """[B, 4] or [B, V, 4] boxes as float32 [B, V, 4]; SfcacheError naming both shapes otherwise."""
    if boxes.shape == (batch, 4):
        boxes = boxes[:, None].expand(batch, views, 4)
    if boxes.shape != (batch, views, 4):
        raise SfcacheError(
            f"crop boxes of shape {tuple(boxes.shape)} do not fit {batch} samples x {views} views: "
            f"expected [{batch}, 4] or [{batch}, {views}, 4] (y0, x0, y1, x1)"
        )
    return boxes.float()


def crop_target_grid(
    targets: torch.Tensor, grid: tuple[int, int], native: tuple[int, int], boxes: torch.Tensor
) -> torch.Tensor:
    """Resample cached targets [B, V, h*w, C] over each sample's (or view's) crop box (bilinear): same shape.

    SF pools VGGT's native grid (n tokens per side) to the VLA grid (h) bilinearly with
    align_corners=True, so VLA token j sits at native index j*(n-1)/(h-1). After a crop, online
    SF's token j sees native position j*(n-1)/(h-1) of the cropped image, i.e. image fraction
    y0 + (y1 - y0) * (0.5 + j*(n-1)/(h-1)) / n. This samples the cached grid at those points.
    """
    batch, views, tokens, channels = targets.shape
    h, w = grid
    (nh, nw) = native
    boxes = per_view_boxes(boxes.to(targets.device), batch, views).reshape(batch * views, 4)
    # Cached index i <-> image fraction p: p = (0.5 + i*(n-1)/(h-1)) / n; grid_sample coordinate
    # with align_corners=True is g = 2*i/(h-1) - 1 = 2*(p*n - 0.5)/(n-1) - 1. Compose with the box.
    theta = torch.zeros(batch * views, 2, 3, dtype=torch.float32, device=targets.device)
    for axis, (n, lo, hi) in enumerate(((nw, boxes[:, 1], boxes[:, 3]), (nh, boxes[:, 0], boxes[:, 2]))):
        # output coordinate t in [-1, 1] -> box fraction u = (0.5 + (t+1)/2*(n-1)) / n
        # -> image fraction p = lo + (hi-lo)*u -> g = 2*(p*n - 0.5)/(n-1) - 1
        span = hi - lo
        theta[:, axis, axis] = span
        theta[:, axis, 2] = (2 * (lo * n + span * (0.5 + (n - 1) / 2) - 0.5)) / (n - 1) - 1
    maps = targets.reshape(batch * views, h, w, channels).permute(0, 3, 1, 2).float()
    sample_at = F.affine_grid(theta, [batch * views, channels, h, w], align_corners=True)
    out = F.grid_sample(maps, sample_at, mode="bilinear", padding_mode="border", align_corners=True)
    return out.permute(0, 2, 3, 1).reshape(batch, views, tokens, channels)
