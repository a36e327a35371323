"""Transformer pieces shared by the DINOv2 embedder and the alternating-attention blocks.

Module and parameter names follow the official VGGT code so checkpoints load key for key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sfcache.vggt.config import HEAD_DIM


def rope_2d_tables(
    grid_h: int, grid_w: int, num_special: int, freq: float, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """cos/sin tables [num_special + h*w, HEAD_DIM] for VGGT's 2D RoPE of one frame.

    Patch (y, x) sits at position (y + 1, x + 1), row-major; special tokens sit at (0, 0).
    Head dims 0..31 rotate with y, 32..63 with x, each half in rotate-half form with
    theta_j = p * freq^(-2j/32).
    """
    ys = torch.arange(grid_h, device=device).repeat_interleave(grid_w) + 1
    xs = torch.arange(grid_w, device=device).repeat(grid_h) + 1
    special = torch.zeros(num_special, dtype=ys.dtype, device=device)
    half = HEAD_DIM // 2
    inv_freq = 1.0 / (freq ** (torch.arange(0, half, 2, device=device).float() / half))

    def angles(position: Tensor) -> Tensor:
        angle = position.float()[:, None] * inv_freq
        return torch.cat((angle, angle), dim=-1)

    angle = torch.cat((angles(torch.cat((special, ys))), angles(torch.cat((special, xs)))), dim=-1)
    return angle.cos(), angle.sin()


def apply_rope(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate [..., N, 64] head vectors; each 32-dim half [a, b] pairs with its rotation [-b, a]."""
    a, b, c, d = t.chunk(4, dim=-1)
    return t * cos + torch.cat((-b, a, -d, c), dim=-1) * sin


class Attention(nn.Module):
    """Multi-head self-attention with optional per-head q/k LayerNorm and RoPE, via SDPA (flash on GPU)."""

    def __init__(self, dim: int, qk_norm: bool):
        super().__init__()
        self.num_heads = dim // HEAD_DIM
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(HEAD_DIM) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(HEAD_DIM) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, HEAD_DIM).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, dim: int, mlp_hidden_dim: int, *, norm_eps: float, qk_norm: bool, layer_scale_init: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, qk_norm)
        self.ls1 = LayerScale(dim, layer_scale_init)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_hidden_dim)
        self.ls2 = LayerScale(dim, layer_scale_init)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))
