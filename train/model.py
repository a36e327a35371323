"""A small VLA policy in one screen: patch tokens per view, instruction bytes, proprio, action queries.

Shaped like OpenVLA-OFT at toy scale: a patch-14 stem gives 16x16 visual tokens per 224 px view,
one bidirectional transformer reads [visual | instruction | action queries], the proprio embedding
is added to every query (a direct path from state to action), and the queries regress an action
chunk (L1 on actions scaled per dimension to [-1, 1] by the training set's 1st-99th percentiles, as OpenVLA-OFT
normalises them: otherwise the small rotation deltas weigh nothing in the loss, and their bias, integrated over
an episode, turns the gripper away). `forward` also returns the visual tokens after block
`align_layer`, where the Spatial Forcing loss attaches; `hidden_states` those of any blocks (for `sf probe`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

SIZES = {  # (dim, depth, heads)
    "tiny": (64, 4, 4),
    "small": (256, 8, 8),
    "base": (512, 12, 8),
}


@dataclass(frozen=True)
class PolicyConfig:
    views: int = 2
    grid: tuple[int, int] = (16, 16)  # patch tokens per view; image = grid * patch pixels
    patch: int = 14
    dim: int = 256
    depth: int = 8
    heads: int = 8
    text_len: int = 48  # instruction bytes kept
    proprio_dim: int = 8
    action_dim: int = 7
    chunk: int = 8  # actions predicted per step (OpenVLA-OFT: 8)
    align_layer: int = 6  # SF taps visual tokens after this block (1-based)

    @classmethod
    def sized(cls, size: str, align_layer: int | None = None, **fields) -> PolicyConfig:
        """A config of a named size; `align_layer` defaults to 3/4 of the depth (SF: 24 of 32)."""
        dim, depth, heads = SIZES[size]
        return cls(dim=dim, depth=depth, heads=heads, align_layer=align_layer or max(1, round(depth * 3 / 4)), **fields)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.grid[0] * self.patch, self.grid[1] * self.patch

    def to_dict(self) -> dict:
        return asdict(self)


def encode_instructions(texts: list[str], length: int) -> torch.Tensor:
    """UTF-8 bytes, shifted by one so 0 is padding: long [B, length]."""
    out = torch.zeros(len(texts), length, dtype=torch.long)
    for row, text in enumerate(texts):
        data = text.encode("utf-8")[:length]
        out[row, : len(data)] = torch.tensor(list(data), dtype=torch.long) + 1
    return out


def identity_bounds(action_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds under which the head's output is the action itself."""
    return -torch.ones(action_dim), torch.ones(action_dim)


class Block(nn.Module):
    """Pre-norm transformer block with a padding mask."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, length, dim))
        return x + self.mlp(self.norm2(x))


class Policy(nn.Module):
    """images [B, V, 3, H, W] in [0, 1], text [B, L], proprio [B, P] -> actions [B, chunk, A], visual tokens."""

    def __init__(
        self,
        config: PolicyConfig,
        proprio_mean: torch.Tensor | None = None,
        proprio_std: torch.Tensor | None = None,
        action_bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__()
        if not 1 <= config.align_layer <= config.depth:
            raise ValueError(f"align_layer must be in 1..{config.depth}, got {config.align_layer}")
        self.config = config
        c = config
        tokens = c.grid[0] * c.grid[1]
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        # proprio is standardised with training-set statistics (saved with the weights)
        self.register_buffer("proprio_mean", torch.zeros(c.proprio_dim) if proprio_mean is None else proprio_mean)
        self.register_buffer("proprio_std", torch.ones(c.proprio_dim) if proprio_std is None else proprio_std)
        # the head predicts actions in [-1, 1] per dimension; these training-set bounds map them back (saved too)
        low, high = action_bounds or identity_bounds(c.action_dim)
        self.register_buffer("action_low", low.float())
        self.register_buffer("action_high", high.float())
        self.stem = nn.Conv2d(3, c.dim, kernel_size=c.patch, stride=c.patch)
        self.visual_pos = nn.Parameter(torch.randn(c.views, tokens, c.dim) * 0.02)
        self.text_embed = nn.Embedding(257, c.dim, padding_idx=0)
        self.text_pos = nn.Parameter(torch.randn(c.text_len, c.dim) * 0.02)
        self.proprio = nn.Linear(c.proprio_dim, c.dim)
        self.queries = nn.Parameter(torch.randn(c.chunk, c.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(c.dim, c.heads) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim)
        self.action_head = nn.Linear(c.dim, c.action_dim)

    def _inputs(
        self, images: torch.Tensor, text: torch.Tensor, proprio: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The sequence [visual | instruction | queries] block 1 reads, its padding mask, and the visual length."""
        c = self.config
        batch = images.shape[0]
        pixels = (images.flatten(0, 1) - self.mean) / self.std
        visual = self.stem(pixels).flatten(2).transpose(1, 2).reshape(batch, c.views, -1, c.dim)
        visual = (visual + self.visual_pos).flatten(1, 2)
        state = self.proprio((proprio - self.proprio_mean) / self.proprio_std)[:, None]
        x = torch.cat([visual, self.text_embed(text) + self.text_pos, self.queries + state], dim=1)
        keep = torch.cat(
            [
                torch.ones(batch, visual.shape[1], dtype=torch.bool, device=x.device),
                text > 0,
                torch.ones(batch, c.chunk, dtype=torch.bool, device=x.device),
            ],
            dim=1,
        )
        return x, keep, visual.shape[1]

    def forward(
        self, images: torch.Tensor, text: torch.Tensor, proprio: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted action chunk [B, chunk, A] and visual tokens after `align_layer` [B, V*h*w, dim]."""
        c = self.config
        x, keep, visual = self._inputs(images, text, proprio)
        aligned = None
        for depth, block in enumerate(self.blocks, start=1):
            x = block(x, keep)
            if depth == c.align_layer:
                aligned = x[:, :visual]
        scaled = self.action_head(self.norm(x[:, -c.chunk :]))
        actions = self.action_low + (scaled + 1) / 2 * (self.action_high - self.action_low)
        return actions, aligned

    def action_error(self, predicted: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Per-element |error| in the head's [-1, 1] units: the training loss weighs every action dimension alike."""
        return (predicted - actions).abs() * (2 / (self.action_high - self.action_low))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Checkpoints from before action bounds were recorded regressed raw actions: identity bounds."""
        for name, value in zip(("action_low", "action_high"), identity_bounds(self.config.action_dim), strict=True):
            state_dict.setdefault(prefix + name, value)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def hidden_states(
        self, images: torch.Tensor, text: torch.Tensor, proprio: torch.Tensor, layers: Sequence[int]
    ) -> torch.Tensor:
        """Visual tokens [B, len(layers), V*h*w, dim] at each of `layers`: 0 is the patch-embedding input block 1
        reads (stem + position), k the output of block k. What a depth probe (`sf probe`) reads."""
        if not layers or not all(0 <= layer <= self.config.depth for layer in layers):
            raise ValueError(f"layers must be in 0..{self.config.depth}, got {list(layers)}")
        x, keep, visual = self._inputs(images, text, proprio)
        states = {0: x[:, :visual]}
        for depth, block in enumerate(self.blocks[: max(layers)], start=1):
            x = block(x, keep)
            states[depth] = x[:, :visual]
        return torch.stack([states[layer] for layer in layers], dim=1)
