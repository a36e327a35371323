"""A batch of target rows as stored, and how its bytes get to the training device.

A loader that decodes in its DataLoader workers moves float32 (twice a float16 store's bytes, 8x a PCA store's)
through shared memory, pays the widening on the workers' CPUs and collates sample by sample. Here a batch is
read once (`Cache.read_encoded`: sorted, each run of rows back to back in a shard one preadv) straight into the
memory it leaves the process in: shared memory in a DataLoader worker (handed to the training process without
a copy), pinned memory in a training process that feeds a GPU, and kept in the stored dtype; the widening,
int8 scales and PCA reconstruction run where the batch is used (`sfcache.store.encoding.widen`, called by
`CachedTargets.decode`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from sfcache.errors import SfcacheError
from sfcache.store import Cache, layer_array

__all__ = ["StoredBatches", "StoredTargets", "read_stored"]

MEMORY = ("plain", "shared", "pinned")
ALIGN = 64  # bytes: where each part of a batch starts in a ring slot
_use_count = getattr(torch._C, "_storage_Use_Count", None)  # references to a storage's memory (tensors, views, numpy)


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
        made[_address(array)] = tensor
        return array

    def tensor(array: np.ndarray | None) -> torch.Tensor | None:
        """The tensor the reader's buffer came from (keeping its shared or pinned memory)."""
        if array is None:
            return None
        made_as = made.get(_address(array))
        return made_as if made_as is not None and made_as.shape == array.shape else torch.from_numpy(array)

    values, scales, token_mask = cache.read_encoded(np.asarray(rows, np.int64), layer=layer, mask=mask, empty=empty)
    return _stored(cache, rows, tensor(values), tensor(scales), tensor(token_mask))


def _stored(cache: Cache, rows: Sequence[int], values, scales, token_mask) -> StoredTargets:
    if cache.dtype == "bfloat16":  # kept as its uint16 bit pattern on disk (Zarr v3 has no bfloat16)
        values = values.view(torch.bfloat16)
    return StoredTargets(torch.as_tensor(np.asarray(rows, np.int64)), values, scales, token_mask)


class StoredBatches:
    """Batches of rows as stored (`StoredTargets`, one per batch of `batch_sampler`), read by DataLoader workers
    into a ring of shared-memory slots; iterate it like a DataLoader (`CachedTargets.batches` makes one).

    Fresh memory for every batch costs more than reading it: the kernel zeroes and maps each page in the worker,
    then maps it again in the training process (at real shape 4-5x a read into memory used before, `make bench`).
    So each worker fills `prefetch_factor + 2` slots made once per pass, both processes map them once, and the
    training process hands a slot back once nothing refers to its memory any more (no tensor, view or numpy array
    of the batch). A worker with no free slot, or a batch larger than a slot, reads into fresh shared memory
    instead: slower, never wrong. With `pin_memory` each batch is copied into pinned memory (torch's caching host
    allocator) and its slot freed at once. `loader`: further DataLoader options (multiprocessing_context, ...).

    `batch_sampler` is a sized sequence of batches (a list: the slots are sized by its largest batch) or a
    sampler with `batch_size` (BatchSampler); anything else is refused, as sizing the slots would take an extra
    pass over it (a generator would be used up, a random sampler's generator advanced).
    """

    def __init__(
        self,
        targets: Any,
        batch_sampler: Iterable[Sequence[int]],
        *,
        num_workers: int = 2,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        **loader: Any,
    ):
        self.max_rows = getattr(batch_sampler, "batch_size", None)
        if not isinstance(self.max_rows, int):
            if not isinstance(batch_sampler, Sequence):
                raise SfcacheError(
                    f"batch_sampler: a {type(batch_sampler).__name__} is neither a sequence of batches nor a sampler "
                    "with batch_size; freeze it with list(...)"
                )
            self.max_rows = max(map(len, batch_sampler), default=1)
        self.targets, self.batch_sampler, self.num_workers = targets, batch_sampler, num_workers
        self.pin_memory, self.prefetch_factor, self.loader = pin_memory, prefetch_factor, loader

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[StoredTargets]:
        if self.num_workers == 0:
            for rows in self.batch_sampler:
                stored = self.targets.read_stored(rows)
                yield stored.pin_memory() if self.pin_memory else stored
            return
        ring = _Ring(self.targets, self.max_rows, self.num_workers, self.prefetch_factor + 2 if _use_count else 0)
        loader = torch.utils.data.DataLoader(
            _RingReads(self.targets, ring),
            sampler=self.batch_sampler,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor,
            **self.loader,
        )
        for item in loader:
            if isinstance(item, SfcacheError):
                raise item
            stored = item if isinstance(item, StoredTargets) else ring.batch(*item)
            if self.pin_memory:
                stored = stored.pin_memory()
            yield stored
            del stored, item  # so that `recycle` sees only the references the caller kept
            ring.recycle()


class _Ring:
    """`slots` shared-memory buffers per worker, each for `rows` rows of the targets' stored parts, and a shared
    flag per slot: 1 = the worker may fill it. The worker clears it when it fills the slot; the training process
    sets it again when the batch it got from that slot is no longer referenced."""

    def __init__(self, targets: Any, rows: int, workers: int, slots: int):
        arrays = targets.cache.expected_arrays()
        names = [layer_array(targets.layer), layer_array(targets.layer, "_scale")]
        row_bytes = [math.prod(arrays[name][0][1:]) * arrays[name][1].itemsize for name in names if name in arrays]
        if targets.return_mask:
            row_bytes.append(math.prod(arrays[layer_array(targets.layer)][0][1:3]))
        self.rows, self.cache = rows, targets.cache
        self.slot_bytes = sum(_aligned(rows * size) for size in row_bytes)
        self.storages = [
            [torch.UntypedStorage._new_shared(self.slot_bytes) for _ in range(slots)] for _ in range(workers)
        ]
        self.free = torch.ones((workers, slots), dtype=torch.uint8).share_memory_()
        self.held: set[tuple[int, int]] = set()

    def claim(self, worker: int, rows: int) -> int | None:
        """A free slot of `worker` for `rows` rows, now taken (in the worker); None if there is none."""
        flags = self.free[worker].numpy().copy()  # a snapshot: the training process sets flags meanwhile
        free = np.flatnonzero(flags).tolist() if rows <= self.rows else []
        if not free:
            return None
        self.free[worker, free[0]] = 0
        return free[0]

    def batch(self, worker: int, slot: int, rows: list[int], parts: list) -> StoredTargets:
        """The batch a worker read into `slot` (in the training process): tensors over the slot's memory."""
        self.held.add((worker, slot))
        storage = self.storages[worker][slot]
        tensors = [
            None if part is None else torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize, shape)
            for part in parts
            for offset, shape, dtype in [part or (0, (), None)]
        ]
        return _stored(self.cache, rows, *tensors)

    def recycle(self) -> None:
        """Hand back every held slot that nothing refers to any more (only the ring's own storage)."""
        for worker, slot in list(self.held):
            if _use_count(self.storages[worker][slot]._cdata) == 1:
                self.held.discard((worker, slot))
                self.free[worker, slot] = 1


def _aligned(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


class _RingReads(torch.utils.data.Dataset):
    """Item = a batch of rows; a worker reads it into one of its ring slots and returns where the parts lie
    (worker, slot, rows, [(offset, shape, dtype) of values, scales, mask]), or a `StoredTargets` in fresh
    shared memory when it has no free slot, or the SfcacheError (a missing or unfinished row) it met."""

    def __init__(self, targets: Any, ring: _Ring):
        self.targets, self.ring = targets, ring

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, rows: Sequence[int]) -> tuple | StoredTargets | SfcacheError:
        try:
            return self._get(rows)
        except SfcacheError as error:  # reaches the training process as itself, not wrapped in a worker traceback
            return error

    def _get(self, rows: Sequence[int]) -> tuple | StoredTargets:
        rows = [int(row) for row in rows]
        info = torch.utils.data.get_worker_info()
        slot = None if info is None or not self.ring.storages else self.ring.claim(info.id, len(rows))
        if slot is None:
            return self.targets.read_stored(rows, memory="shared")
        try:
            parts = self._read(self.ring.storages[info.id][slot], rows)
        except BaseException:
            self.ring.free[info.id, slot] = 1
            raise
        if parts is None:  # a part did not land in the slot
            self.ring.free[info.id, slot] = 1
            return self.targets.read_stored(rows, memory="shared")
        return (info.id, slot, rows, parts)

    def _read(self, storage: torch.UntypedStorage, rows: list[int]) -> list | None:
        """Read `rows` into `storage`, each part at the next aligned offset: the parts' (offset, shape, dtype),
        or None if `Cache.read_encoded` returned a part elsewhere."""
        carved: list[tuple[np.ndarray, tuple]] = []

        def empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
            kind = torch.from_numpy(np.empty(0, np.dtype(dtype).newbyteorder("="))).dtype
            end = carved[-1][1][0] + math.prod(carved[-1][1][1]) * carved[-1][1][2].itemsize if carved else 0
            offset = _aligned(end)
            tensor = torch.empty(0, dtype=kind).set_(storage, offset // kind.itemsize, shape)
            carved.append((tensor.numpy(), (offset, tuple(shape), kind)))
            return carved[-1][0]

        cache = self.targets.cache
        parts = cache.read_encoded(rows, layer=self.targets.layer, mask=self.targets.return_mask, empty=empty)
        places = {_address(array): place for array, place in carved}
        if any(part is not None and places.get(_address(part), (0, ()))[1] != part.shape for part in parts):
            return None
        return [None if part is None else places[_address(part)] for part in parts]


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]
