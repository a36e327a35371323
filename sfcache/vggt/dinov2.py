"""Patch embedders of the VGGT aggregator: DINOv2 with registers, or a plain strided conv."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sfcache.vggt.config import VGGTConfig
from sfcache.vggt.layers import Block

DINOV2_NORM_EPS = 1e-6
DINOV2_LAYER_SCALE_INIT = 1.0


class PatchEmbed(nn.Module):
    """Non-overlapping patch_size conv; tokens come out row-major [N, h*w, C]."""

    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class DinoV2Embedder(nn.Module):
    """DINOv2 ViT with registers; returns its final-normed patch tokens (cls and registers dropped)."""

    def __init__(self, config: VGGTConfig):
        super().__init__()
        dim, grid = config.embed_dim, config.img_size // config.patch_size
        self.patch_size = config.patch_size
        self.patch_embed = PatchEmbed(config.patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # in every checkpoint; only used for masked training
        self.blocks = nn.ModuleList(
            Block(
                dim,
                config.mlp_hidden_dim,
                norm_eps=DINOV2_NORM_EPS,
                qk_norm=False,
                layer_scale_init=DINOV2_LAYER_SCALE_INIT,
            )
            for _ in range(config.patch_embed_depth)
        )
        self.norm = nn.LayerNorm(dim, eps=DINOV2_NORM_EPS)

    def position_embedding(self, grid_h: int, grid_w: int, dtype: torch.dtype) -> Tensor:
        """pos_embed [1, 1 + h*w, C]: stored grid as is, else its patch part resized bicubic with antialias.

        Matches the aggregator's DINOv2 (interpolate_offset 0, so an explicit output size; antialias on,
        which is PyTorch's PIL-style a=-0.5 cubic kernel, not the plain a=-0.75 one).
        """
        stored = int((self.pos_embed.shape[1] - 1) ** 0.5)
        if (grid_h, grid_w) == (stored, stored):
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        patch_pos = pos_embed[:, 1:].reshape(1, stored, stored, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", antialias=True)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat((pos_embed[:, :1], patch_pos), dim=1).to(dtype)

    def forward(self, images: Tensor) -> Tensor:
        grid_h, grid_w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        x = self.patch_embed(images)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.position_embedding(grid_h, grid_w, x.dtype)
        x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1 + self.register_tokens.shape[1] :]


def build_patch_embed(config: VGGTConfig) -> nn.Module:
    return DinoV2Embedder(config) if config.patch_embed == "dinov2" else PatchEmbed(config.patch_size, config.embed_dim)
