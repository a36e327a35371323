"""Plug-in API for users' trainers: cached SF targets as a Dataset, and the SF alignment loss.

Spatial Forcing (arXiv 2510.12276) adds `alpha * L_align` to a VLA's action loss, with
L_align = 1 - mean_i cos(MLP(Norm(x_i)), target_i) per sample, averaged over the batch. This
module gives the two pieces a trainer needs: `CachedTargets` (targets read from a store,
with the pooled position embedding added) and `SpatialForcingLoss` (projector + loss).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sfcache.crop import crop_target_grid
from sfcache.errors import Field, Message, SfcacheError, StoreError
from sfcache.keys import episode_key
from sfcache.pooling import pool_grid, position_embedding
from sfcache.rows import RowIndex
from sfcache.store import open_cache
from sfcache.store.encoding import widen
from sfcache.stored import StoredBatches, StoredTargets, read_stored

__all__ = [
    "CachedTargets",
    "SpatialForcingLoss",
    "StoredBatches",
    "StoredTargets",
    "WithTargets",
    "crop_target_grid",
    "lerobot_episodes",
    "pooled_position_embedding",
]


class CachedTargets(torch.utils.data.Dataset):
    """Cached SF targets, float32 [V, h*w, C] per step, indexed by flat row or (episode key, step).

    The fast path is batched: `batches(...)` (a DataLoader of `StoredTargets`: each batch one sorted read of
    the shard files in a worker, the stored dtype through shared and pinned memory) and `decode(stored,
    device)` on the training device. Every other read (`dataset[i]`, `read_rows`, `targets_for`) is
    `decode(read_stored(rows))`, so all give the same values.

    `dtype=torch.float16` returns half the bytes (pool(E) is still added in float32, then rounded);
    `device="cuda"` (for `targets_for` in the training process, not in DataLoader workers) reads into pinned
    memory, moves the values as stored and decodes them on that device.

    The store is opened lazily and read-only in each process (so DataLoader workers each get
    their own handle and training can never modify the cache). With `add_position_embedding`
    the pooled sinusoidal embedding pool(E) is added, so values equal what online SF computes
    on the un-augmented frame: pool(f + E) = pool(f) + pool(E) because pooling is linear.

    `recipe` (e.g. "openpi") refuses a store extracted with another `sf extract --recipe`. A store
    with a token mask (`--recipe openpi`) returns `(targets, mask)` pairs, mask bool [V, h*w] per step
    (True = token holds image content), from every read; pass both to `SpatialForcingLoss(..., mask=)`.
    A pair rather than a dict keeps the default collate and `targets_for` symmetric. `return_mask`
    forces pairs on a store without a mask (all True); False on a masked store is refused, since
    ignoring the mask would align padding and blank-camera tokens.

    A compact store (`sf extract --reduce pca:...`) returns targets rebuilt from its PCA coefficients where
    they are decoded. With `coefficients=True` reads return float32 [..., V, h*w, K] coefficients instead (K/C of the
    bytes through DataLoader workers and host-to-device copies) and `reconstruct(batch, device)` turns
    them into the targets on the training device: one [K, C] matmul, plus the position embedding.
    On a store of full targets `reconstruct` only moves them and adds the embedding, so one trainer
    code path serves both.
    """

    def __init__(
        self,
        store: str | Path,
        layer: int | None = None,
        add_position_embedding: bool = True,
        recipe: str | None = None,
        return_mask: bool | None = None,
        coefficients: bool = False,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
    ):
        self.store = Path(store)
        self.add_position_embedding = add_position_embedding
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise SfcacheError(f"{self.store}: dtype must be torch.float32, float16 or bfloat16, not {dtype}")
        self.dtype, self.device = dtype, None if device is None else torch.device(device)
        self._cache, self._pid = None, None
        self._pos: torch.Tensor | None = None
        self._pos_on: torch.Tensor | None = None  # pool(E) on the device the values were last on
        cache = self.cache  # validate the store and the layer now, not in a worker
        self.layer = cache.resolve_layer(layer)
        self.recipe = cache.recipe
        if recipe is not None and recipe != cache.recipe:
            # the extractor's field, named without importing the extractor (Dask) into users' trainers
            extracted_with = Field("ExtractConfig", "recipe")
            raise SfcacheError(
                Message(
                    f"{self.store}: targets were extracted with ",
                    extracted_with,
                    f" {cache.recipe}, but recipe {recipe!r} was asked; re-extract with ",
                    extracted_with,
                    f" {recipe}",
                )
            )
        if return_mask is False and cache.has_mask:
            raise SfcacheError(
                f"{self.store}: this store carries a token mask (recipe {cache.recipe}); read it "
                "(return_mask=None or True) and pass it to SpatialForcingLoss(mask=)"
            )
        self.return_mask = cache.has_mask if return_mask is None else return_mask
        self.coefficients = coefficients
        self._basis: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # device -> (components, mean)
        self.views, self.grid, self.channels = tuple(cache.views), tuple(cache.grid), int(cache.channels)
        targets = cache.provenance.targets
        self.native_grid = targets.native_grid  # VGGT's patch grid before pooling
        self.aspect_ratio = float(targets.aspect_ratio)  # preprocessed image W / H
        self.index: RowIndex = cache.index

    @property
    def cache(self):
        """This process's read-only store handle, opened on first use (again after a fork or unpickling)."""
        if self._cache is None or self._pid != os.getpid():
            self._cache, self._pid = open_cache(self.store, mode="r"), os.getpid()
        return self._cache

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": None, "_pid": None, "_basis": {}, "_pos_on": None}  # no device tensors

    def __len__(self) -> int:
        return self.index.num_rows

    def __getitem__(self, index: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.index.num_rows:  # IndexError: the end of iteration over a Dataset
            raise IndexError(f"{self.store}: row {index} out of range [0, {self.index.num_rows})")
        return _first(self.read_rows([index]))

    def __getitems__(self, indices: list[int]) -> list:
        """DataLoader's batched fetch of decoded samples: one store read for the whole batch (for the stored
        bytes decoded on the training device instead, see `batches`)."""
        batch = self.read_rows(indices)
        return list(zip(*batch)) if self.return_mask else list(batch)

    @property
    def tokens(self) -> int:
        """Target tokens per sample (views x h*w): how many visual tokens of the policy to align."""
        return len(self.views) * self.grid[0] * self.grid[1]

    def row(self, key: str | bytes, step: int, length: int | None = None) -> int:
        """Flat row of `step` in episode `key` (a store key or an RLDS TFDS id); StoreError naming the key
        and range if absent. With `length` (the episode's length in your pipeline) a store episode of
        another length is an error, so a key that names other data cannot silently misalign."""
        name = key.decode() if isinstance(key, bytes) else str(key)
        key = name if name in self.index else self.cache.key_for(name)
        stored = self.index.record(key).length
        if length is not None and int(length) != stored:
            raise StoreError(
                f"{self.store}: episode {name!r} has {stored} steps in the cache but {int(length)} in "
                "your data pipeline; the cache was made from other data (re-extract it from this dataset)"
            )
        return self.index.row(key, step)

    def rows(
        self,
        keys: Sequence[str],
        steps: Sequence[int] | torch.Tensor,
        lengths: Sequence[int] | torch.Tensor | None = None,
    ) -> list[int]:
        """Flat rows of a batch's (episode key or TFDS id, step) pairs, each checked as `row` does."""
        steps = steps.tolist() if isinstance(steps, torch.Tensor) else steps
        lengths = lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths
        lengths = [None] * len(keys) if lengths is None else lengths
        return [self.row(k, int(s), n) for k, s, n in zip(keys, steps, lengths, strict=True)]

    def check_episodes(
        self, episodes: Mapping[str, tuple[int | None, int]], *, by_index: bool = False, selected_only: bool = False
    ) -> list[str]:
        """The keys of a dataset's `episodes` ({key or TFDS id: (first global index or None, length)}) that this
        store serves, each checked to be in the store with the same length (joined `by_index`: at the same first
        row) and fully extracted; one StoreError naming the first few that are not. With `selected_only`, a
        store made with `sf extract --episodes` serves its selection: episodes outside it are left out."""
        cache = self.cache
        skip_absent = selected_only and cache.provenance.selection is not None
        served, bad = [], []
        for key, (first, length) in episodes.items():
            try:
                record = cache.episode(key)
            except StoreError:
                if not skip_absent:
                    bad.append(f"{key} is not in the store")
                continue
            if record.length != length:
                bad.append(f"{key} has {record.length} steps in the store, {length} in the dataset")
            elif by_index and first is not None and record.start != first:
                bad.append(
                    f"{key} starts at row {record.start} in the store, at index {first} in the dataset "
                    "(the store holds other episodes: join by key and step)"
                )
            else:
                served.append(key)
        if bad:
            raise StoreError(
                f"{self.store}: does not match the dataset's episodes ({len(bad)} differ): " + "; ".join(bad[:3])
            )
        unfinished = sorted(set(cache.missing_episodes()) & {cache.key_for(key) for key in served})
        if unfinished:
            raise StoreError(
                f"{self.store}: {len(unfinished)} episodes are not fully extracted (e.g. {unfinished[:3]}); "
                "run `sf extract` again with the same options to finish the store"
            )
        return served

    def get(self, key: str, step: int, length: int | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Targets of one step: float32 [V, h*w, C] (with the mask: a pair, see the class)."""
        return _first(self.read_rows([self.row(key, step, length)]))

    def targets_for(
        self,
        keys: Sequence[str],
        steps: Sequence[int] | torch.Tensor,
        lengths: Sequence[int] | torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Targets of a batch joined by (episode key or TFDS id, step): float32 [B, V, h*w, C] (or a pair).

        `lengths`: each episode's length in your pipeline, checked against the store (see `row`).
        `boxes`: the crop each sample's views were augmented with, [B, 4] or [B, V, 4] (y0, x0, y1, x1
        in image fractions): the grid is resampled over the box before the position embedding is added.
        """
        self._check_boxes(boxes)
        return self.decode(self.read_stored(self.rows(keys, steps, lengths)), boxes=boxes)

    def read_rows(self, rows: Sequence[int]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Targets of flat rows: float32 [B, V, h*w, C], and with the mask bool [B, V, h*w] (one batched read)."""
        return self.decode(self.read_stored(rows))

    def read_stored(self, rows: Sequence[int], memory: str | None = None) -> StoredTargets:
        """Flat rows as stored, in one sorted read of the shard files (`sfcache.stored`). `decode` makes targets.
        `memory` (`sfcache.stored.read_stored`'s): default pinned where this dataset's `device` is a GPU (outside
        DataLoader workers), else plain; "shared" only for a batch a DataLoader worker hands to the training
        process as it is (a batch decoded in the worker needs no shared memory: fresh pages cost more than the read)."""
        if memory is None:
            gpu = self.device is not None and self.device.type == "cuda" and torch.cuda.is_available()
            memory = "pinned" if gpu and torch.utils.data.get_worker_info() is None else "plain"
        return read_stored(self.cache, [int(row) for row in rows], self.layer, self.return_mask, memory)

    def decode(
        self,
        stored: StoredTargets,
        device: str | torch.device | None = None,
        boxes: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Targets of a stored batch, computed on `device` (default: this dataset's `device`, else where the
        batch is): the stored bytes are moved, then widened (int8: times its scales), rebuilt from PCA
        coefficients (unless `coefficients`), resampled over crop `boxes` ([B, 4] or [B, V, 4], see
        `targets_for`), pool(E) added and cast to `dtype`: float32 [B, V, h*w, C], or a (targets, mask) pair.
        Each row's values do not depend on the other rows of the batch: `dataset[i]` gives the same."""
        self._check_boxes(boxes)
        device = torch.device(device) if device is not None else self.device or stored.values.device
        stored = stored.to(device, non_blocking=True)
        values = widen(stored.values, stored.scales)
        if self.cache.reduced and not self.coefficients:
            values = self._rebuild(values)
        if boxes is not None:
            values = crop_target_grid(values, self.grid, self.native_grid, boxes)
        if self.add_position_embedding and not self.coefficients:
            values = values + self._position_embedding_on(device)
        values = values.to(self.dtype)
        return values if stored.mask is None else (values, stored.mask.bool())

    def batches(
        self,
        batch_sampler: Iterable[Sequence[int]] | None = None,
        *,
        batch_size: int = 32,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        **loader: Any,
    ) -> StoredBatches:
        """An iterable of `StoredTargets` like a DataLoader (`sfcache.stored.StoredBatches`), one per batch of rows
        (`batch_sampler`: a list of batches, or a sampler with `batch_size`; a frozen list given to your own
        DataLoader too keeps the two in step; else shuffled batches of `batch_size` rows, seeded): each batch one
        read in a worker into shared memory it reuses, pinned when `pin_memory` (by default when `device` is a
        GPU); `decode(stored, device)` on the training device makes the targets. `loader`: num_workers (2),
        prefetch_factor, multiprocessing_context and other DataLoader options."""
        if batch_sampler is None:
            sampler = (
                torch.utils.data.RandomSampler(self, generator=torch.Generator().manual_seed(seed))
                if shuffle
                else torch.utils.data.SequentialSampler(self)
            )
            batch_sampler = torch.utils.data.BatchSampler(sampler, batch_size, drop_last)
        loader.setdefault("pin_memory", self.device is not None and self.device.type == "cuda")
        return StoredBatches(self, batch_sampler, **loader)

    def _check_boxes(self, boxes: torch.Tensor | None) -> None:
        if boxes is None:
            return
        if self.coefficients:
            raise SfcacheError(
                f"{self.store}: crop boxes need whole targets; join with boxes on a CachedTargets(coefficients=False)"
            )
        if self.cache.has_mask:
            raise SfcacheError(
                f"{self.store}: crop boxes were given, but this store carries a token mask (recipe "
                f"{self.recipe}), whose trainer feeds VGGT the un-augmented image; join without boxes"
            )

    def reconstruct(self, coefficients: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """float32 targets [..., V, h*w, C] on `device` from a `coefficients=True` read [..., V, h*w, K]
        (with the position embedding when asked); a store of full targets is only moved."""
        if not self.coefficients:
            raise SfcacheError(
                f"{self.store}: reads already return whole targets; reconstruct() is for "
                "CachedTargets(coefficients=True)"
            )
        device = torch.device(device) if device is not None else coefficients.device
        values = coefficients.to(device, non_blocking=True).float()
        if self.cache.reduced:
            values = self._rebuild(values)
        return values + self._position_embedding_on(device) if self.add_position_embedding else values

    def _rebuild(self, coefficients: torch.Tensor) -> torch.Tensor:
        """float32 targets [..., C] from PCA coefficients [..., K] on their device: coefficients @ basis + mean."""
        device = coefficients.device
        if str(device) not in self._basis:
            reduction = self.cache.reduction
            self._basis[str(device)] = tuple(
                torch.from_numpy(np.ascontiguousarray(array)).to(device)
                for array in (reduction.components[self.layer], reduction.means[self.layer])
            )
        components, mean = self._basis[str(device)]
        return torch.matmul(coefficients, components) + mean

    def _position_embedding_on(self, device: torch.device) -> torch.Tensor:
        """pool(E) on `device`, moved there once."""
        if self._pos_on is None or self._pos_on.device != device:
            self._pos_on = self.position_embedding().to(device)
        return self._pos_on

    def position_embedding(self) -> torch.Tensor:
        """pool(E): SF's position embedding pooled from VGGT's native grid to the cache grid, [h*w, C].

        Add it after any crop of the target grid: E marks positions in the VGGT input, not content.
        """
        if self._pos is None:
            self._pos = pooled_position_embedding(self.native_grid, self.grid, self.channels, self.aspect_ratio)
        return self._pos


def _first(batch):
    """Row 0 of a read: a tensor, or a (targets, mask) pair."""
    return tuple(part[0] for part in batch) if isinstance(batch, tuple) else batch[0]


def pooled_position_embedding(
    native: tuple[int, int], grid: tuple[int, int], channels: int, aspect_ratio: float
) -> torch.Tensor:
    """SF's E on VGGT's native patch grid, pooled to the target grid like the features: [h*w, C]."""
    return pool_grid(position_embedding(native[0], native[1], channels, aspect_ratio), native, grid)


class WithTargets(torch.utils.data.Dataset):
    """Wraps any dataset of dict samples and adds `sf_targets` (and `sf_mask` from a masked store).

    Joined by episode key and step (`key=`, `step=`: field names or functions of the sample), or by
    LeRobot's global frame `index` (`index="index"`): the flat row, equal to the store's row when the
    store holds the dataset's episodes in order. The index field survives LeRobot's and openpi's
    transforms, which drop unknown keys such as `sf_targets`: build with `out=None` and call
    `targets_for(batch)` after them. Every join is checked against the dataset's episode lengths
    (`lengths=`, or read from a LeRobotDataset's metadata): a store made from other episodes fails here
    instead of silently pairing frames with another step's targets. With `index=`, `lengths=` lists every
    episode of the dataset in its order, so their running sums are the first global indices checked.
    """

    def __init__(
        self,
        dataset: Any,
        targets: CachedTargets,
        key: str | Callable[[dict], str] = "episode_key",
        step: str | Callable[[dict], int] = "step",
        *,
        index: str | None = None,
        lengths: dict[str, int] | None = None,
        out: str | None = "sf_targets",
        mask_out: str = "sf_mask",
    ):
        self.dataset, self.targets, self.out, self.mask_out = dataset, targets, out, mask_out
        self._key = key if callable(key) else itemgetter(key)  # itemgetter pickles into spawned workers
        self._step = step if callable(step) else itemgetter(step)
        self.index = index
        episodes = (
            lerobot_episodes(dataset)
            if lengths is None
            else RowIndex.packed(lengths).spans()
            if index is not None
            else {k: (None, int(n)) for k, n in lengths.items()}
        )
        if index is not None and episodes is None:
            raise SfcacheError(
                "WithTargets(index=...): pass lengths={episode key: length} or a LeRobotDataset, "
                "so the join can check that store rows equal the dataset's global index"
            )
        if episodes is not None:
            targets.check_episodes(episodes, by_index=index is not None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """DataLoader's batched fetch: the samples, and their targets in one store read (the same values as
        one sample at a time)."""
        fetch = getattr(self.dataset, "__getitems__", None)
        samples = [dict(sample) for sample in (fetch(indices) if fetch else [self.dataset[i] for i in indices])]
        if self.out is not None and samples:
            read = self.targets.read_rows([self._row(sample) for sample in samples])
            targets, mask = read if isinstance(read, tuple) else (read, None)
            for i, sample in enumerate(samples):
                sample[self.out] = targets[i]
                if mask is not None:
                    sample[self.mask_out] = mask[i]
        return samples

    def targets_for(self, batch: dict) -> Any:
        """Targets of a collated batch (after any preprocessor that kept the join fields): float32
        [B, V, h*w, C], or a (targets, mask) pair from a masked store."""
        if self.index is not None:
            return self.targets.read_rows(torch.as_tensor(batch[self.index]).reshape(-1).tolist())
        keys, steps = self._key(batch), self._step(batch)
        steps = steps.reshape(-1).tolist() if isinstance(steps, torch.Tensor) else steps
        return self.targets.targets_for([str(k) for k in keys], [int(s) for s in steps])

    def _row(self, sample: dict) -> int:
        if self.index is None:
            return self.targets.row(str(self._key(sample)), int(self._step(sample)))
        row = int(sample[self.index])
        if not 0 <= row < len(self.targets):
            raise StoreError(f"{self.targets.store}: {self.index} {row} is past the store's {len(self.targets)} rows")
        if "episode_index" in sample and "frame_index" in sample:  # LeRobot samples say where they are
            key, step = episode_key(sample["episode_index"]), int(sample["frame_index"])
            if self.targets.row(key, step) != row:
                raise StoreError(
                    f"{self.targets.store}: {self.index} {row} is {key} step {step}, which is row "
                    f"{self.targets.row(key, step)} in the store (join by key and step)"
                )
        return row


def lerobot_episodes(dataset: Any) -> dict[str, tuple[int, int]] | None:
    """{sfcache key: (global first index, length)} of the episodes a LeRobotDataset holds (v3.0 metadata
    rows with `dataset_from_index`; v2.1 a dict of episodes, indices counted in episode order); None for
    any other dataset."""
    meta = getattr(getattr(dataset, "meta", None), "episodes", None)
    if meta is None:
        return None
    if isinstance(meta, dict) and all(isinstance(i, int) for i in meta):  # lerobot 0.3 (v2.1): {index: row}
        every = RowIndex.packed({int(i): int(meta[i]["length"]) for i in sorted(meta)}).spans()
    else:  # lerobot 0.4 (v3.0): columns
        every = {
            int(e): (int(f), int(n))
            for e, f, n in zip(meta["episode_index"], meta["dataset_from_index"], meta["length"])
        }
    chosen = getattr(dataset, "episodes", None)
    return {episode_key(i): every[i] for i in (sorted(every) if chosen is None else chosen)}


class SpatialForcingLoss(nn.Module):
    """SF's projector and alignment loss: 1 - mean_i cos(MLP(Norm(x_i)), target_i), batch-averaged.

    Matches OpenHelix-Team/Spatial-Forcing `AlignProjector`: optional LayerNorm on the VLA tokens,
    Linear(vla_dim, 2*vggt_dim) -> GELU -> Linear(2*vggt_dim, 2*vggt_dim), xavier-uniform weights
    and zero biases. VGGT targets concatenate frame and global halves, so their width is
    2*vggt_dim = `target_dim` (2048 for VGGT-1B) and the projection compares at full width.
    """

    def __init__(self, vla_dim: int, target_dim: int, norm: str = "layernorm", hidden: int | None = None):
        super().__init__()
        hidden = hidden or target_dim
        norms = {
            "layernorm": lambda: nn.LayerNorm(vla_dim),
            "batchnorm": lambda: nn.BatchNorm1d(vla_dim),
            "none": nn.Identity,
        }
        if norm not in norms:
            raise SfcacheError(f"SpatialForcingLoss: norm must be one of {sorted(norms)}, got {norm!r}")
        self.norm_kind = norm
        self.norm = norms[norm]()
        self.projector = nn.Sequential(nn.Linear(vla_dim, hidden), nn.GELU(), nn.Linear(hidden, target_dim))
        for layer in self.projector:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, vla_dim] -> [B, N, target_dim]."""
        if self.norm_kind == "batchnorm":  # statistics over all tokens of the batch
            tokens = self.norm(tokens.flatten(0, -2)).view_as(tokens)
        else:
            tokens = self.norm(tokens)
        return self.projector(tokens)

    def forward(
        self,
        vla_tokens: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor | None = None,
        per_sample: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """L_align for VLA tokens [B, N, D] and targets [B, N, C] or [B, V, T, C] (N = V*T).

        `mask` (bool, True = use) is [B, N], [B, V, T] (what `CachedTargets` returns) or per view [B, V];
        a sample whose tokens are all masked gets loss 0 and is left out of the batch mean (openpi-SF's
        masked mean gives NaN there). Masked targets are zeroed before use, so even a non-finite value
        under the mask reaches neither the loss nor the gradients. Returns the loss, and with
        `per_sample` also the [B] per-sample losses.
        """
        batch, tokens = vla_tokens.shape[:2]
        if targets.dim() not in (3, 4) or targets.shape[0] != batch or math.prod(targets.shape[1:-1]) != tokens:
            raise SfcacheError(
                f"SpatialForcingLoss: VLA tokens {tuple(vla_tokens.shape)} [B, N, D] do not pair with "
                f"targets {tuple(targets.shape)} [B, N, C] or [B, V, T, C] with V*T = N: slice exactly "
                "the visual tokens (OpenVLA-OFT: hidden_states[L][:, 2:2 + targets.tokens], with or "
                "without proprio)"
            )
        targets = targets.reshape(batch, tokens, -1).float()
        if mask is not None:
            mask = _token_mask(mask, batch, tokens).to(targets.device)
            targets = torch.where(mask[..., None] > 0, targets, torch.zeros((), device=targets.device))
        cos = (F.normalize(self.project(vla_tokens).float(), dim=-1) * F.normalize(targets, dim=-1)).sum(-1)
        if mask is None:
            per = 1.0 - cos.mean(dim=1)
            loss = per.mean()
        else:
            counts = mask.sum(dim=1)
            has_tokens = counts > 0
            mean_cos = (cos * mask).sum(dim=1) / counts.clamp(min=1)
            per = torch.where(has_tokens, 1.0 - mean_cos, torch.zeros_like(mean_cos))
            loss = per.sum() / has_tokens.sum().clamp(min=1)
        return (loss, per) if per_sample else loss


def _token_mask(mask: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
    """Expand a [B, V] per-view or [B, V, T] mask to float [B, N]."""
    mask = mask.reshape(batch, -1)
    if mask.shape[1] != tokens:
        if tokens % mask.shape[1]:
            raise SfcacheError(f"SpatialForcingLoss: mask of shape {tuple(mask.shape)} does not divide {tokens} tokens")
        mask = mask.repeat_interleave(tokens // mask.shape[1], dim=1)
    return mask.float()
