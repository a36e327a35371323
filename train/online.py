"""Online SF targets, the public trainer's path: VGGT runs inside every step on the augmented images.

Kept for comparison with the cache (speed, memory, and how close the cropped cached targets are).
As in SF's OpenVLA-OFT trainer, VGGT sees the policy's augmented 224 px input (as uint8, the way the
RLDS pipeline hands it to the processor), bicubic-upsampled by `preprocess(mode="sf")`.
"""

from __future__ import annotations

import torch

from sfcache.errors import Field
from sfcache.pooling import pooled_targets
from sfcache.torch import pooled_position_embedding
from sfcache.vggt import load_vggt, preprocess


class OnlineTargets:
    """images [B, V, 3, S, S] in [0, 1] -> SF targets [B, V, h*w, C] = pool(VGGT layer) + pool(E)."""

    def __init__(self, weights: str, device: torch.device, layer: int | None, grid: tuple[int, int]):
        self.model, self.weights_id = load_vggt(weights, device)
        self.device, self.grid = device, grid
        (self.layer,) = self.model.resolve_layers([-1 if layer is None else layer], Field("TrainConfig", "cache_layer"))
        self.img_size = self.model.config.img_size
        side = self.img_size // self.model.config.patch_size
        self.native = (side, side)  # "sf" mode feeds a square image
        self.channels = self.model.config.out_channels
        self.position_embedding = pooled_position_embedding(self.native, grid, self.channels, 1.0).to(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        frames = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 1, 3, 4, 2).cpu()
        vggt_input = preprocess(frames, mode="sf", img_size=self.img_size).to(self.device)
        return pooled_targets(self.model, vggt_input, (self.layer,), self.grid)[self.layer] + self.position_embedding
