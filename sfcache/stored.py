"""A batch of target rows as stored, and how its bytes get to the training device.

A loader that decodes in its DataLoader workers moves float32 (twice a float16 store's bytes, 8x a PCA store's)
through shared memory, pays the widening on the workers' CPUs and collates sample by sample. Here a batch is
read once (`Cache.read_encoded`: sorted, each run of rows back to back in a shard one preadv) straight into the
memory it leaves the process in: shared memory in a DataLoader worker (handed to the training process without
a copy), pinned memory in a training process that feeds a GPU, and kept in the stored dtype; the widening,
int8 scales and PCA reconstruction run where the batch is used (`widen`, called by `CachedTargets.decode`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from sfcache.store import Cache

__all__ = ["StoredTargets", "read_stored", "widen"]

MEMORY = ("plain", "shared", "pinned")


@dataclass
class StoredTargets:
    """Rows of a store as stored: `values` [B, V, h*w, C] (K on a --reduce store) float16 | bfloat16 | int8,
    int8's float32 `scales` [B, V, h*w, C / block] (a version-1 store's [B, V, C]) or None, the uint8 token `mask`
    [B, V, h*w] or None, and the flat `rows` [B] (int64). `CachedTargets.decode` turns it into targets.

    DataLoader's `pin_memory=True` pins it (`pin_memory`), and it pickles through shared memory like tensors."""

    rows: torch.Tensor
    values: torch.Tensor
    scales: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored parts (values, scales, mask): what crosses to the device."""
        return sum(part.nbytes for part in (self.values, self.scales, self.mask) if part is not None)

    def _map(self, change: Callable[[torch.Tensor], torch.Tensor]) -> StoredTargets:
        return StoredTargets(
            **{f.name: None if getattr(self, f.name) is None else change(getattr(self, f.name)) for f in fields(self)}
        )

    def pin_memory(self, device: str | None = None) -> StoredTargets:
        """A copy in pinned host memory (what DataLoader's pinning thread calls); already pinned parts are kept."""
        return self._map(lambda part: part if part.is_pinned() else part.pin_memory())

    def to(self, device: str | torch.device, non_blocking: bool = False) -> StoredTargets:
        """The same batch on `device` (non_blocking from pinned memory)."""
        return self._map(lambda part: part.to(device, non_blocking=non_blocking))

    def select(self, index: int | slice | Sequence[int]) -> StoredTargets:
        """Some of the rows (views where `index` is an int or slice)."""
        return self._map(lambda part: part[index])


def read_stored(cache: Cache, rows: Sequence[int], layer: int, mask: bool, memory: str = "plain") -> StoredTargets:
    """`rows` of `layer` as stored, read in one `Cache.read_encoded` into `memory`: "plain", "shared" (POSIX shared
    memory: a DataLoader worker's result crosses to the training process without a copy) or "pinned" (page-locked,
    for asynchronous copies to a GPU)."""
    if memory not in MEMORY:
        raise ValueError(f"memory must be one of {MEMORY}, got {memory!r}")
    made: dict[int, torch.Tensor] = {}

    def empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        kind = torch.from_numpy(np.empty(0, np.dtype(dtype).newbyteorder("="))).dtype
        if memory == "shared":
            storage = torch.UntypedStorage._new_shared(math.prod(shape) * np.dtype(dtype).itemsize)
            tensor = torch.empty(0, dtype=kind).set_(storage, 0, shape)
        else:
            tensor = torch.empty(shape, dtype=kind, pin_memory=memory == "pinned")
        array = tensor.numpy()
        made[array.__array_interface__["data"][0]] = tensor
        return array

    def tensor(array: np.ndarray | None) -> torch.Tensor | None:
        """The tensor the reader's buffer came from (keeping its shared or pinned memory)."""
        if array is None:
            return None
        made_as = made.get(array.__array_interface__["data"][0])
        return made_as if made_as is not None and made_as.shape == array.shape else torch.from_numpy(array)

    values, scales, token_mask = cache.read_encoded(np.asarray(rows, np.int64), layer=layer, mask=mask, empty=empty)
    values = tensor(values)
    if cache.dtype == "bfloat16":  # kept as its uint16 bit pattern on disk (Zarr v3 has no bfloat16)
        values = values.view(torch.bfloat16)
    return StoredTargets(torch.as_tensor(np.asarray(rows, np.int64)), values, tensor(scales), tensor(token_mask))


def widen(values: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """float32 values of a stored batch on its device, bit for bit `sfcache.store.decode`: float16 and bfloat16
    widened, int8 times its scale per token and channel block (or a version-1 store's per channel)."""
    if values.dtype != torch.int8:
        return values.float()
    if scales.dim() == 3:  # format version 1: [B, V, C]
        return values.float() * scales[:, :, None, :]
    blocks = values.reshape(*scales.shape, values.shape[-1] // max(scales.shape[-1], 1)).float()
    return (blocks * scales[..., None]).reshape(values.shape)
