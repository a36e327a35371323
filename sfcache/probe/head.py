"""The DPT depth head of the probe (Ranftl et al. 2021), trained from scratch on a frozen model's tokens.

Four token layers (shallow to deep) are each brought to the head's width by a 2-layer MLP, laid out on
the patch grid, reassembled at 4 scales (x4, x2, x1, x0.5 of the grid), fused coarse to fine by
RefineNet-style residual units, and upsampled to the image. The output is log depth (exp of it is
metric depth, always positive), so a scale-aware loss on log depth trains it directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SCALES = (4.0, 2.0, 1.0, 0.5)  # per input layer, shallow to deep


class ResidualConvUnit(nn.Module):
    """x + conv(relu(conv(relu(x)))): RefineNet's residual unit."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """Add the level's reassembled map (through a residual unit) to the coarser path, refine, upsample."""

    def __init__(self, width: int, has_skip: bool = True):
        super().__init__()
        self.skip = ResidualConvUnit(width) if has_skip else None  # the coarsest level starts the path
        self.refine, self.out = ResidualConvUnit(width), nn.Conv2d(width, width, 1)

    def forward(self, path: torch.Tensor, skip: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        if skip is not None:
            path = path + self.skip(skip)
        path = F.interpolate(self.refine(path), size=size, mode="bilinear", align_corners=True)
        return self.out(path)


def _resample(width: int, scale: float) -> nn.Module:
    """Reassemble's resize: transposed convolution up, strided convolution down."""
    if scale > 1:
        return nn.ConvTranspose2d(width, width, kernel_size=int(scale), stride=int(scale))
    if scale < 1:
        return nn.Conv2d(width, width, kernel_size=3, stride=int(1 / scale), padding=1)
    return nn.Identity()


class DPTHead(nn.Module):
    """tokens [B, 4, V*h*w, dim] (views one after another, each h x w row-major) -> log depth [B, V, H, W].

    `depth(tokens)` is metric depth (exp of it). The head sees one view at a time; which view it is
    the tokens tell (a policy's position embedding).
    """

    def __init__(self, dim: int, grid: tuple[int, int], image_size: tuple[int, int], views: int, width: int = 64):
        super().__init__()
        self.grid, self.image_size, self.views = tuple(grid), tuple(image_size), views
        self.project = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.Linear(width, width)) for _ in SCALES
        )
        self.reassemble = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 1), _resample(width, scale)) for scale in SCALES
        )
        self.fuse = nn.ModuleList(FusionBlock(width, has_skip=level < len(SCALES) - 1) for level in range(len(SCALES)))
        self.conv = nn.Conv2d(width, width // 2, 3, padding=1)
        self.out = nn.Sequential(nn.Conv2d(width // 2, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 1, 1))

    def set_log_depth_bias(self, value: float) -> None:
        """Start the output at a typical log depth (the training mean): the probe then learns the structure."""
        with torch.no_grad():
            self.out[-1].bias.fill_(value)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, layers, length, dim = tokens.shape
        h, w = self.grid
        if layers != len(SCALES) or length != self.views * h * w:
            raise ValueError(
                f"tokens {tuple(tokens.shape)}: expected [B, {len(SCALES)}, {self.views}*{h}*{w}, dim] "
                f"({len(SCALES)} layers of {self.views} views on a {h}x{w} grid)"
            )
        per_view = tokens.reshape(batch, layers, self.views, h * w, dim).transpose(1, 2).flatten(0, 1)
        maps = []
        for level in range(layers):
            x = self.project[level](per_view[:, level].float())  # [B*V, h*w, width]
            x = x.transpose(1, 2).reshape(batch * self.views, -1, h, w)
            maps.append(self.reassemble[level](x))
        path = None
        for level in reversed(range(layers)):  # coarse (deep) to fine (shallow)
            finer = maps[level - 1].shape[-2:] if level else tuple(2 * s for s in maps[0].shape[-2:])
            path = self.fuse[level](maps[level] if path is None else path, None if path is None else maps[level], finer)
        x = F.interpolate(self.conv(path), size=self.image_size, mode="bilinear", align_corners=True)
        return self.out(x).reshape(batch, self.views, *self.image_size)

    def depth(self, tokens: torch.Tensor) -> torch.Tensor:
        """Metric depth [B, V, H, W], positive."""
        return self(tokens).exp()
