"""Training samples: source frames, actions, proprio and instruction, joined with cached targets by key and step.

Before anything trains, the cache is checked against what the run asks for (views, token grid,
the dataset it was extracted from, and on resume the checkpoint's target width, layer and VGGT
weights); every difference is listed in one ConfigMismatch. Episodes the cache lacks or has not
finished are a StoreError naming them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from sfcache.errors import ConfigMismatch, Field, ResumeMismatch, SfcacheError, differences
from sfcache.provenance import DATASET, dataset_differences
from sfcache.recipes import get_recipe
from sfcache.rows import RowIndex
from sfcache.sources import Source, open_source, recorded_views
from sfcache.store import open_cache
from sfcache.torch import CachedTargets
from sfcache.train.model import encode_instructions


@dataclass(frozen=True)
class EpisodeRows:
    """One episode of the run: its key, instruction and steps in the source."""

    key: str
    instruction: str
    length: int


class StepDataset(Dataset):
    """One sample per (episode, step): uint8 frames [V, H, W, 3], text, proprio, an action chunk, and with a
    cache the step's flat row in it ("row").

    Actions past the episode's end repeat the last action (OpenVLA-OFT's chunking). Targets join the batch
    as a user's loop joins them: `collate` reads the batch's rows as stored (`CachedTargets.read_stored`, in
    the DataLoader worker), and the trainer decodes them on its device with the batch's crop boxes
    (`CachedTargets.decode`, position embedding included).
    """

    def __init__(
        self, source: Source, episodes: list[EpisodeRows], chunk: int, text_len: int, targets: CachedTargets | None
    ):
        self.source, self.episodes, self.chunk, self.targets = source, episodes, chunk, targets
        self.text = encode_instructions([e.instruction for e in episodes], text_len)
        self.rows = RowIndex.packed(
            {e.key: e.length for e in episodes}, where="training samples", holder="the training episodes"
        )

    def __len__(self) -> int:
        return self.rows.num_rows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        position, step = self.rows.position(index)
        episode = self.episodes[position]
        current = self.source.read(episode.key, step, step + 1)  # the only frames a sample needs
        chunk = self.source.read(episode.key, step, min(step + self.chunk, episode.length), frames=False)
        actions = chunk.actions[np.minimum(np.arange(self.chunk), len(chunk.actions) - 1)]
        sample = {
            "frames": torch.from_numpy(np.ascontiguousarray(current.frames[0])),
            "text": self.text[position],
            "proprio": torch.from_numpy(current.proprio[0].astype(np.float32)),
            "actions": torch.from_numpy(actions.astype(np.float32)),
        }
        if self.targets is not None:
            sample["row"] = self.targets.row(episode.key, step)
        return sample

    def collate(self, samples: list[dict]) -> dict:
        """The DataLoader's batch: samples stacked, and with a cache "targets", the rows' `StoredTargets`."""
        batch = default_collate(samples)
        if self.targets is not None:
            in_worker = torch.utils.data.get_worker_info() is not None  # the batch leaves the worker as stored
            batch["targets"] = self.targets.read_stored(batch["row"].tolist(), memory="shared" if in_worker else None)
        return batch


@dataclass
class TrainingData:
    """What the trainer needs to know about its data, and the two splits."""

    train: StepDataset
    val: StepDataset
    views: tuple[str, ...]
    action_dim: int
    proprio_mean: torch.Tensor  # over a sample of training steps, to standardise the policy's input
    proprio_std: torch.Tensor
    action_bounds: tuple[torch.Tensor, torch.Tensor]  # per-dimension 1st / 99th percentile of training actions
    targets: CachedTargets | None
    identity: dict  # recorded in checkpoints; a resume must see the same


def open_training_data(
    source_path: Path,
    cache_path: Path | None,
    views: tuple[str, ...] | None,
    grid: tuple[int, int],
    chunk: int,
    text_len: int,
    val_episodes: int,
    cache_layer: int | None = None,
) -> TrainingData:
    """Open source and cache, check they belong together, and split episodes into train / validation."""
    targets = None
    if cache_path:  # the layer named as the option that chose it, not as the loader's argument
        layer = open_cache(cache_path).resolve_layer(cache_layer, Field("TrainConfig", "cache_layer"))
        targets = CachedTargets(cache_path, layer=layer)
    if targets is not None and targets.recipe not in TRAINER_RECIPES:
        raise SfcacheError(
            f"{cache_path}: extracted with --recipe {targets.recipe}, but sf train trains an "
            f"OpenVLA-OFT-style policy (square 224 px views, crop augmentation, no token mask); "
            f"use a store made with --recipe {' or '.join(TRAINER_RECIPES)}"
        )
    recorded = recorded_views(targets.cache.provenance.source) if targets else None  # with any name=column mapping
    source = open_source(source_path, views=views or recorded)
    identity = {"views": list(source.views), "grid": list(grid), "source": _source_identity(source.describe())}
    if targets is not None and get_recipe(targets.recipe).jpeg_fast_dct:  # the policy sees the frames VGGT saw
        source.jpeg_fast_dct = identity["jpeg_fast_dct"] = True
    if targets is not None:
        check_cache_matches(targets, source, grid)
        identity.update(
            channels=targets.channels, layer=targets.layer, weights_id=targets.cache.provenance.vggt.weights_id
        )
    episodes = _episode_rows(source, targets)
    if val_episodes >= len(episodes):
        raise SfcacheError(
            f"{source_path}: {len(episodes)} episodes, cannot hold out {val_episodes} for validation; "
            f"use --val-episodes {max(len(episodes) - 1, 0)} or fewer (0: no validation)"
        )
    held_out = set(np.linspace(0, len(episodes) - 1, val_episodes).round().astype(int).tolist())  # spread out
    train = [e for i, e in enumerate(episodes) if i not in held_out]
    statistics = vector_statistics(source, train)
    return TrainingData(
        train=StepDataset(source, train, chunk, text_len, targets),
        val=StepDataset(source, [e for i, e in enumerate(episodes) if i in held_out], chunk, text_len, targets),
        views=tuple(source.views),
        proprio_mean=statistics.proprio_mean,
        proprio_std=statistics.proprio_std,
        action_bounds=(statistics.action_low, statistics.action_high),
        action_dim=source.read(train[0].key, 0, 1).actions.shape[1],
        targets=targets,
        identity=identity,
    )


@dataclass(frozen=True)
class VectorStatistics:
    """Training-set statistics the policy keeps with its weights: proprio standardisation and action bounds."""

    proprio_mean: torch.Tensor
    proprio_std: torch.Tensor
    action_low: torch.Tensor  # per-dimension 1st percentile (OpenVLA-OFT's q01)
    action_high: torch.Tensor  # 99th percentile


def vector_statistics(source: Source, episodes: list[EpisodeRows], max_episodes: int = 256) -> VectorStatistics:
    """Statistics over every step of up to `max_episodes` evenly spaced training episodes, read in one pass
    without frames (on RLDS each record is parsed once). A proprio dimension that hardly varies gets std 1e-3 or
    more; an action dimension that hardly varies keeps the scale of raw actions."""
    chosen = [episodes[int(i)] for i in np.unique(np.linspace(0, len(episodes) - 1, max_episodes).round())]
    steps = [source.read(e.key, 0, e.length, frames=False) for e in chosen]
    proprio = np.concatenate([s.proprio for s in steps]).astype(np.float64)
    actions = np.concatenate([s.actions for s in steps]).astype(np.float64)
    std = proprio.std(0, ddof=1).clip(min=1e-3) if len(proprio) > 1 else np.ones(proprio.shape[1])
    low, high = np.quantile(actions, [0.01, 0.99], axis=0)
    flat = high - low < 1e-3
    middle = (low + high) / 2
    low, high = np.where(flat, middle - 1, low), np.where(flat, middle + 1, high)
    return VectorStatistics(*(torch.from_numpy(a.astype(np.float32)) for a in (proprio.mean(0), std, low, high)))


TRAINER_RECIPES = ("none", "openvla-oft")  # what this trainer's inputs and augmentation match


def _source_identity(describe: dict) -> dict:
    return {k: describe.get(k) for k in (*DATASET, "path")}


def check_cache_matches(targets: CachedTargets, source: Source, grid: tuple[int, int]) -> None:
    """ConfigMismatch listing every way the cache differs from the asked views, grid and dataset.

    The dataset path counts only when the fingerprint differs too: a moved copy is the same data.
    """
    recorded = {"views": list(targets.views), "grid": list(targets.grid), "source": targets.cache.provenance.source}
    asked = {"views": list(source.views), "grid": list(grid), "source": source.describe()}
    diff = {
        **differences(recorded, asked, ["views", "grid"]),
        **dataset_differences(recorded["source"], asked["source"]),
    }
    if diff:
        raise ConfigMismatch(
            targets.store,
            diff,
            fix="give the store's --views and --grid and the dataset it was extracted from as --source, "
            "or extract a store for these with sf extract",
        )


# the flag that sets each part of a run's data identity, as a resume refusal names it
IDENTITY_FLAGS = {
    "views": "--views",
    "grid": "--grid",
    "channels": "--cache (target channels)",
    "layer": "--cache-layer",
    "weights_id": "--cache (VGGT weights)",
    "jpeg_fast_dct": "--cache (recipe's JPEG decode)",
    "online_vggt": "--online-vggt",
}


def check_resume(saved: dict, current: dict, run: Path) -> None:
    """ResumeMismatch naming by its flag each way the checkpoint in `run` was trained on other data (views, grid,
    targets, dataset) than this run's."""
    fields = [k for k in sorted(set(saved) | set(current)) if k != "source"]
    diff = {
        **differences(saved, current, fields),
        **dataset_differences(saved.get("source") or {}, current.get("source") or {}),
    }
    named = {
        IDENTITY_FLAGS.get(k, f"--source ({k.removeprefix('source.')})" if k.startswith("source.") else k): pair
        for k, pair in diff.items()
    }
    if named:
        raise ResumeMismatch(run, named)


def _episode_rows(source: Source, targets: CachedTargets | None) -> list[EpisodeRows]:
    """Source episodes of the run: all, or with a cache those it serves (`CachedTargets.check_episodes`: a
    store made with --episodes serves its selection; lacking, shortened or unfinished episodes are refused)."""
    infos = source.episodes()
    if targets is not None:
        served = set(targets.check_episodes({e.key: (None, e.num_steps) for e in infos}, selected_only=True))
        infos = [e for e in infos if e.key in served]
    return [EpisodeRows(e.key, e.instruction, e.num_steps) for e in infos]
