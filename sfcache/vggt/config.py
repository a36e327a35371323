"""Architecture of a VGGT aggregator: enough to build the module and to check a checkpoint against it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

HEAD_DIM = 64  # every public VGGT / DINOv2 variant uses 64-dim heads; checkpoints do not store the head count


@dataclass(frozen=True)
class VGGTConfig:
    """Shapes of the feature-only VGGT (the official `Aggregator`); biases, qk-norm and LayerScale are always on."""

    img_size: int = 518  # training resolution; sets the stored DINOv2 pos-embed grid
    patch_size: int = 14
    embed_dim: int = 1024  # output channels are 2 * embed_dim (frame ++ global)
    depth: int = 24  # frame blocks = global blocks = output layers
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4  # in the aggregator and again inside the DINOv2 embedder
    patch_embed: Literal["dinov2", "conv"] = "dinov2"
    patch_embed_depth: int = 24  # DINOv2 blocks; 0 for the plain-conv embedder
    rope_freq: float = 100.0

    def __post_init__(self):
        if self.embed_dim % HEAD_DIM:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of the head dim {HEAD_DIM}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.patch_embed not in ("dinov2", "conv"):
            raise ValueError(f"patch_embed must be 'dinov2' or 'conv', not {self.patch_embed!r}")
        if (self.patch_embed == "conv") != (self.patch_embed_depth == 0):
            raise ValueError("patch_embed_depth must be 0 exactly for the conv patch embedder")

    @property
    def num_heads(self) -> int:
        return self.embed_dim // HEAD_DIM

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def out_channels(self) -> int:
        return 2 * self.embed_dim

    @property
    def special_tokens(self) -> int:
        """Camera + register tokens in front of each frame's patch tokens (`patch_start_idx`)."""
        return 1 + self.num_register_tokens

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> VGGTConfig:
        return cls(**fields)

    @classmethod
    def vggt_1b(cls) -> VGGTConfig:
        """facebook/VGGT-1B: DINOv2 ViT-L/14 with registers, 24 + 24 alternating blocks of width 1024."""
        return cls()

    @classmethod
    def tiny(cls) -> VGGTConfig:
        """Every code path of the real model at toy size, for tests, demos and CPU benchmarks."""
        return cls(img_size=224, embed_dim=128, depth=4, patch_embed_depth=2)


PRESETS: dict[str, VGGTConfig] = {"vggt-1b": VGGTConfig.vggt_1b(), "tiny": VGGTConfig.tiny()}
