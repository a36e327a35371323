"""The stored encoding of target values (float16, bfloat16 bits, int8 with scales), numpy beside torch.

The numpy pair (`encode`, `decode`) is the store's own; the torch pair (`encode_on_device`, `widen`) runs the same
rule on any device, bit for bit (tests/test_device.py, tests/test_loader.py compare them). torch is imported by the
torch functions only, so that a numpy reader of a store does not load it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from sfcache.errors import StoreError
from sfcache.provenance import DTYPES

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPES", "STORED_DTYPE", "Encoded", "decode", "encode", "encode_on_device", "int8_block", "widen"]

INT8_BLOCK = 128  # channels per int8 scale (see `encode`)
STORED_DTYPE = {"float16": "float16", "bfloat16": "uint16", "int8": "int8"}  # Zarr v3 has no bfloat16: its bits

Encoded = tuple[np.ndarray, "np.ndarray | None"]  # (stored values, int8 scales or None), as `encode` returns


def int8_block(channels: int) -> int:
    """Channels sharing one int8 scale: INT8_BLOCK, or the largest divisor of `channels` below it."""
    return math.gcd(channels, INT8_BLOCK)


def _unknown(dtype: str) -> StoreError:
    return StoreError(f"unknown target dtype {dtype!r}; expected one of {', '.join(DTYPES)}")


def encode(values: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 [T, V, n, C] -> (stored array, int8 scales [T, V, n, C // block] or None).

    bfloat16 is kept as its uint16 bit pattern (round to nearest even) because Zarr v3 has no
    bfloat16 type; int8 uses one symmetric scale (max |x| / 127) per token and block of
    `int8_block(C)` channels. Chosen by measurement (`make bench`): with 1% of tokens 50x larger,
    per-channel scales (format version 1) fell to worst cosine 0.978; per token alone to 0.997 when
    channel magnitudes also spread; per token and 128-channel block stays above 0.9997 for 3% more bytes.
    """
    values = np.asarray(values, dtype=np.float32)
    if dtype == "float16":
        return values.astype(np.float16), None
    if dtype == "bfloat16":
        bits = values.view(np.uint32)
        rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        return (rounded >> np.uint32(16)).astype(np.uint16), None
    if dtype == "int8":
        blocks = values.reshape(*values.shape[:-1], -1, int8_block(values.shape[-1]))
        scale = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
        safe = np.where(scale > 0, scale, np.float32(1))
        stored = np.clip(np.rint(blocks / safe), -127, 127).astype(np.int8).reshape(values.shape)
        return stored, scale[..., 0].astype(np.float32)
    raise _unknown(dtype)


def encode_on_device(values: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`encode` on the values' own device, bit for bit (tested on CPU): float32 [..., C] ->
    (stored, int8 scales [..., C // block] or None). bfloat16 comes back as int16 bits (`device.HostCopy`
    views them as uint16).

    torch's float -> bfloat16 conversion rounds to nearest even like `encode`'s bit arithmetic; int8
    uses the same float32 max / 127, division and round-half-even.
    """
    import torch

    values = values.float()
    if dtype == "float32":  # not encoded: the fit sample of --reduce, or a reduced store's projection on the host
        return values, None
    if dtype == "float16":
        return values.half(), None
    if dtype == "bfloat16":
        return values.to(torch.bfloat16).view(torch.int16), None
    if dtype == "int8":
        blocks = values.reshape(*values.shape[:-1], -1, int8_block(values.shape[-1]))
        scale = blocks.abs().amax(dim=-1, keepdim=True) / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        stored = (blocks / safe).round().clamp(-127, 127).to(torch.int8).reshape(values.shape)
        return stored, scale[..., 0]
    raise ValueError(f"unknown target dtype {dtype!r}; expected one of {', '.join(DTYPES)}")


def decode(stored: np.ndarray, dtype: str, scale: np.ndarray | None = None) -> np.ndarray:
    """Inverse of `encode`: float32 [T, V, n, C]. int8 scales [T, V, n, C // block], or a version-1
    store's per-channel [T, V, C]."""
    if dtype == "float16":
        return stored.astype(np.float32)
    if dtype == "bfloat16":
        return (stored.astype(np.uint32) << np.uint32(16)).view(np.float32)
    if dtype == "int8" and scale.ndim == 3:
        return stored.astype(np.float32) * scale[:, :, None, :]
    if dtype == "int8":
        blocks = stored.reshape(*scale.shape, stored.shape[-1] // max(scale.shape[-1], 1)).astype(np.float32)
        blocks = blocks * scale[..., None]
        return blocks.reshape(stored.shape)
    raise _unknown(dtype)


def widen(values: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """`decode` of a stored batch on its own device, bit for bit: float16 and bfloat16 widened, int8 times its
    scale per token and channel block (or a version-1 store's per channel)."""
    import torch

    if values.dtype != torch.int8:
        return values.float()
    if scales.dim() == 3:  # format version 1: [B, V, C]
        return values.float() * scales[:, :, None, :]
    blocks = values.reshape(*scales.shape, values.shape[-1] // max(scales.shape[-1], 1)).float()
    return (blocks * scales[..., None]).reshape(values.shape)
