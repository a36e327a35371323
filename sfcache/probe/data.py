"""What a probe reads: rows of (tokens [L, V*h*w, dim], depth [V, H, W], optionally the frame), and which
episode each row belongs to (held-out splits are by episode).

`ArrayData` takes arrays (numpy, memmap, zarr or h5py arrays: anything indexed by rows). Hidden states of a
big model over a whole dataset are many GB: `write_token_store` puts them in an sfcache store (the target
store's sharded Zarr layout, written shard by shard, resumable), `StoreData` reads them back, and
`SourceRows` gives the depth and frames of the store's rows from the LIBERO dataset they came from.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from sfcache.crop import crop_resize
from sfcache.errors import ConfigMismatch, SfcacheError
from sfcache.progress import progress_bar
from sfcache.rows import RowIndex, pack_episodes
from sfcache.sources import EpisodeInfo, Source
from sfcache.store import Cache, StoreConfig, create_store, lock_store, open_cache

Rows = Callable[[np.ndarray], np.ndarray]  # rows -> values of those rows


class ProbeData(ABC):
    """Rows a probe trains and tests on. `tokens(rows)`: float32 [B, L, V*h*w, dim] (views one after another);
    `depth(rows)`: float32 [B, V, H, W] metres; `frames(rows)`: uint8 [B, V, H, W, 3] or None (pictures only)."""

    views: tuple[str, ...]
    grid: tuple[int, int]  # tokens per view (h, w)
    layers: tuple[str, ...]  # names of the L token layers, in order
    episodes: np.ndarray  # int [N]: the episode of each row

    def __len__(self) -> int:
        return len(self.episodes)

    @abstractmethod
    def tokens(self, rows: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def depth(self, rows: np.ndarray) -> np.ndarray: ...

    def frames(self, rows: np.ndarray) -> np.ndarray | None:
        return None

    def describe(self) -> dict:
        """What decides the probe's numbers on this data (recorded in checkpoints and probe.json)."""
        tokens, depth = self.tokens(np.array([0])), self.depth(np.array([0]))
        return {
            "rows": len(self),
            "episodes": len(np.unique(self.episodes)),
            "views": list(self.views),
            "grid": list(self.grid),
            "layers": list(self.layers),
            "dim": int(tokens.shape[-1]),
            "image_size": list(depth.shape[-2:]),
        }


def take(array, rows: np.ndarray) -> np.ndarray:
    """array[rows] for numpy, h5py (sorted indices only) and zarr (orthogonal) arrays, in the order asked."""
    rows = np.asarray(rows)
    unique, inverse = np.unique(rows, return_inverse=True)
    values = array.oindex[unique] if hasattr(array, "oindex") else array[unique]
    return np.asarray(values)[inverse.reshape(-1)]


class ArrayData(ProbeData):
    """tokens [N, L, V*h*w, dim], depth [N, V, H, W] metres, episodes [N] (one id per episode), frames
    [N, V, H, W, 3] uint8 optional. `grid` defaults to square; `views` and `layers` to numbers."""

    def __init__(self, tokens, depth, episodes, *, frames=None, views=None, grid=None, layers=None):
        self._tokens, self._depth, self._frames = tokens, depth, frames
        self.episodes = np.asarray(episodes)
        n = len(self.episodes)
        problems = []
        if len(tokens.shape) != 4 or tokens.shape[0] != n:
            problems.append(f"tokens {tuple(tokens.shape)}: expected [N={n}, layers, V*h*w, dim]")
        if len(depth.shape) != 4 or depth.shape[0] != n:
            problems.append(f"depth {tuple(depth.shape)}: expected [N={n}, V, H, W] metres")
        if frames is not None and tuple(frames.shape) != (*depth.shape, 3):
            problems.append(f"frames {tuple(frames.shape)}: expected [{', '.join(map(str, depth.shape))}, 3]")
        if problems:
            raise SfcacheError("probe data: " + "; ".join(problems))
        count = depth.shape[1]
        per_view, remainder = divmod(tokens.shape[2], count)
        side = round(per_view**0.5)
        self.grid = tuple(grid) if grid is not None else (side, side)
        if remainder or self.grid[0] * self.grid[1] != per_view:
            raise SfcacheError(
                f"probe data: {tokens.shape[2]} tokens per row do not split into {count} views of a "
                f"{self.grid[0]}x{self.grid[1]} grid; pass grid=(h, w)"
            )
        self.views = tuple(views) if views is not None else tuple(f"view{v}" for v in range(count))
        self.layers = tuple(map(str, layers)) if layers is not None else tuple(map(str, range(tokens.shape[1])))
        if len(self.views) != count or len(self.layers) != tokens.shape[1]:
            raise SfcacheError(f"probe data: {len(self.views)} view names for {count} views, "
                               f"{len(self.layers)} layer names for {tokens.shape[1]} layers")  # fmt: skip

    def tokens(self, rows: np.ndarray) -> np.ndarray:
        return take(self._tokens, rows).astype(np.float32)

    def depth(self, rows: np.ndarray) -> np.ndarray:
        return take(self._depth, rows).astype(np.float32)

    def frames(self, rows: np.ndarray) -> np.ndarray | None:
        return None if self._frames is None else take(self._frames, rows)


class StoreData(ProbeData):
    """Tokens from an sfcache store (`write_token_store`): `layers` (stored layer indices, repeats allowed; default
    all) stacked in that order. `depth` and `frames`: arrays over the store's rows or callables rows -> values
    (e.g. `SourceRows(...).depth`)."""

    def __init__(self, store: str | Path, depth, *, frames=None, layers: Sequence[int] | None = None):
        self.cache: Cache = open_cache(store)
        self.layer_ids = tuple(self.cache.layers if layers is None else (self.cache.resolve_layer(i) for i in layers))
        self.layers = tuple(map(str, self.layer_ids))
        self.views, self.grid = tuple(self.cache.views), tuple(self.cache.grid)
        lengths = [self.cache.episode(key).length for key in self.cache.episodes]
        self.episodes = np.repeat(np.arange(len(lengths)), lengths)
        self._depth, self._frames = _rows_reader(depth), None if frames is None else _rows_reader(frames)

    def tokens(self, rows: np.ndarray) -> np.ndarray:
        read = {layer: self.cache.read_rows(rows, layer=layer) for layer in set(self.layer_ids)}  # [B, V, h*w, C]
        stacked = np.stack([read[layer] for layer in self.layer_ids], axis=1)
        return stacked.reshape(stacked.shape[0], stacked.shape[1], -1, stacked.shape[-1])

    def depth(self, rows: np.ndarray) -> np.ndarray:
        return self._depth(rows).astype(np.float32)

    def frames(self, rows: np.ndarray) -> np.ndarray | None:
        return None if self._frames is None else self._frames(rows)


def _rows_reader(values) -> Rows:
    return values if callable(values) else lambda rows: take(values, rows)


class SourceRows:
    """Depth and frames of flat rows (`index`, e.g. a token store's) read from a dataset with depth, cropped to
    `box` (y0, x0, y1, x1 in fractions) and resized to size x size: what the model saw. Depth is resized
    nearest (no depth blended across an object's edge), frames bilinearly as the policy's input. With `every`
    N, step s of an indexed episode is step s*N of the dataset's (a store of every N-th step)."""

    def __init__(self, source: Source, index: RowIndex, size: int, box: Sequence[float] = (0.0, 0.0, 1.0, 1.0),
                 every: int = 1):  # fmt: skip
        self.source, self.index, self.size, self.every = source, index, size, every
        self.box = torch.tensor([list(box)], dtype=torch.float32)

    def _read(self, rows: np.ndarray, depth: bool) -> torch.Tensor:
        steps = []
        for row in np.asarray(rows).tolist():
            key, step = self.index.locate(row)
            step *= self.every
            read = self.source.read(key, step, step + 1, frames=not depth, depth=depth)
            steps.append(read.depth[0][:, None] if depth else read.frames[0].transpose(0, 3, 1, 2))  # [V, C, H, W]
        maps = torch.from_numpy(np.stack(steps))  # one crop for the batch: [B, V, C, H, W]
        flat = crop_resize(maps.flatten(0, 1).float(), self.box.expand(maps.shape[0] * maps.shape[1], 4), self.size,
                           mode="nearest" if depth else "bilinear")  # fmt: skip
        return flat.view(*maps.shape[:3], self.size, self.size)

    def depth(self, rows: np.ndarray) -> np.ndarray:
        return self._read(rows, depth=True)[:, :, 0].numpy()

    def frames(self, rows: np.ndarray) -> np.ndarray:
        return self._read(rows, depth=False).permute(0, 1, 3, 4, 2).round().clamp(0, 255).to(torch.uint8).numpy()


def write_token_store(
    path: str | Path,
    episodes: Sequence[EpisodeInfo],
    hidden: Callable[[str, int, int], np.ndarray],
    *,
    layers: Sequence[int],
    views: Sequence[str],
    grid: tuple[int, int],
    channels: int,
    model: dict,
    source: dict | None = None,
    steps_per_shard: int = 32,
    dtype: str = "float16",
    overwrite: bool = False,
) -> Cache:
    """Write a model's hidden states into an sfcache store: `hidden(key, start, stop)` returns float32
    [stop - start, len(layers), V*h*w, channels] for those steps of episode `key`; `layers` are distinct layer
    numbers (stored as `targets/layer_<L>`). `model` (weights, weights_id, config, preprocess, compute_dtype) is
    recorded where a target store records its VGGT. Shard by shard: a rerun with the same arguments writes only
    the shards not done; other arguments are a ConfigMismatch naming each difference (`overwrite` starts over)."""
    config = StoreConfig(
        episodes=pack_episodes(episodes),
        layers=tuple(layers),
        grid=tuple(grid),
        native_grid=tuple(grid),
        aspect_ratio=grid[1] / grid[0],
        views=tuple(views),
        channels=channels,
        vggt=model,
        source=source or {},
        dtype=dtype,
        steps_per_shard=steps_per_shard,
    )
    if len(set(config.layers)) != len(config.layers):
        raise SfcacheError(f"{path}: token store layers must be distinct, got {list(layers)}")
    expected = (len(config.layers), len(config.views) * grid[0] * grid[1], channels)
    with lock_store(path):
        try:
            cache = create_store(path, config, overwrite=overwrite)
        except ConfigMismatch as mismatch:  # as HeadRun words its own: the way out named
            store = f"{mismatch.store} (resuming a token store made otherwise; use --no-resume to start over)"
            raise ConfigMismatch(store, mismatch.differences) from None
        todo = np.flatnonzero(~cache.done_shards())
        with progress_bar(unit="shards") as bar:
            task = bar.add_task(f"hidden states -> {Path(path).name}", total=config.num_shards)
            bar.advance(task, config.num_shards - len(todo))
            for shard in todo.tolist():
                span = cache.shard_rows(shard)
                values = np.concatenate(
                    [hidden(key, a, b) for key, a, b in cache.index.pieces(span.start, span.stop)]
                ).astype(np.float32)
                if values.shape[1:] != expected or len(values) != span.stop - span.start:
                    raise SfcacheError(
                        f"{path}: hidden() gave {tuple(values.shape)} for rows {span.start}-{span.stop - 1}, "
                        f"expected [{span.stop - span.start}, {', '.join(map(str, expected))}]"
                    )
                per_view = values.reshape(len(values), len(config.layers), len(config.views), -1, channels)
                cache.write_shard(shard, {layer: per_view[:, i] for i, layer in enumerate(config.layers)})
                bar.advance(task)
    return open_cache(path)
