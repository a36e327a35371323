"""What a store holds, in figures: the summary a user reads before training, one episode's per-step token norms."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from sfcache.inspection.record import Record
from sfcache.inspection.store_access import lock_state, shown_layer
from sfcache.options import same_fields
from sfcache.provenance import Fidelity, ReduceProvenance
from sfcache.recipes import get_recipe
from sfcache.sources import FORMATS
from sfcache.store import LOCK_NAME, Cache, step_bytes
from sfcache.vggt import random_weights_warning


@dataclass(frozen=True)
class RecipeSummary(Record):
    name: str
    matches: str
    jpeg_dct: str | None  # "ifast" | "islow"; None where the format holds no JPEGs (raw pixels, PNG, video)
    slots: tuple[str, ...]
    token_mask: bool


@dataclass(frozen=True)
class ReduceSummary(Record):
    asked: str
    min_cosine: float | None
    sample_steps: int
    held_out_steps: int
    fidelity: Mapping[int, Fidelity]
    bytes_per_step: int


@dataclass(frozen=True)
class VggtSummary(Record):
    weights: str
    weights_id: str
    random_weights: bool
    preprocess: str
    compute_dtype: str
    config: Mapping


@dataclass(frozen=True)
class Summary(Record):
    """What a store holds, its size and completeness, and how it was made."""

    store: str
    source: Mapping  # Source.describe()
    episodes: int
    steps: int
    views: tuple[str, ...]
    recipe: RecipeSummary
    layers: tuple[int, ...]
    grid: tuple[int, int]
    tokens_per_view: int
    channels: int
    dtype: str
    reduce: ReduceSummary | None
    codec: str
    checksum: str
    steps_per_shard: int
    bytes_on_disk: int
    raw_bytes_per_step: int
    bytes_per_step: float | None  # on disk, over the extracted steps
    compression_ratio: float | None
    shards_done: int
    shards: int
    steps_done: int
    complete: bool
    missing_episodes: tuple[str, ...]
    vggt: VggtSummary
    created: str
    sfcache_version: str
    format_version: int
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class StepNorms(Record):
    step: int
    row: int
    mean_norm: tuple[float, ...]  # per view
    min_norm: tuple[float, ...]
    max_norm: tuple[float, ...]


@dataclass(frozen=True)
class EpisodeReport(Record):
    """Per-step token L2 norms of one episode; the norms are None while it is not fully extracted."""

    key: str
    instruction: str
    start: int
    length: int
    layer: int
    views: tuple[str, ...]
    extracted: bool
    steps: tuple[StepNorms, ...]
    mean_norm: tuple[float, ...] | None
    min_norm: tuple[float, ...] | None
    max_norm: tuple[float, ...] | None


def _jpeg_frames(source: Mapping) -> bool:
    """Whether the recorded source's frames are JPEGs, decoded on read (RLDS, RoboTwin): where the DCT counts."""
    kind = FORMATS.get(source.get("format"))
    return bool(kind and kind.jpeg_frames)


def summarize(cache: Cache) -> Summary:
    """The figures a user wants before training: contents, size, completeness, provenance."""
    provenance = cache.provenance
    targets, vggt, source = provenance.targets, provenance.vggt, provenance.source
    done = cache.done_shards()
    steps_done = sum(_shard_length(cache, shard) for shard in np.flatnonzero(done))
    on_disk = sum(file.stat().st_size for file in cache.path.rglob("*") if file.is_file())
    raw_per_step = _raw_bytes_per_step(cache)
    random_weights = random_weights_warning(vggt.weights_id)
    warnings = [random_weights] if random_weights else []
    if (cache.path / LOCK_NAME).exists():
        warnings.append(lock_state(cache.path))
    recipe = get_recipe(cache.recipe)
    if recipe.jpeg_fast_dct and source.get("format") != "libero_rlds":
        warnings.append(
            f"recipe {recipe.name} from {source.get('format')}: these frames were not decoded "
            "from the RLDS release's JPEGs, so the targets match openvla-SF's RLDS recipe only when "
            "extracted from modified_libero_rlds"
        )
    return Summary(
        store=str(cache.path),
        source=dict(source),
        episodes=len(cache.episodes),
        steps=cache.num_steps,
        views=tuple(cache.views),
        recipe=RecipeSummary(
            name=recipe.name,
            matches=recipe.trainer,
            jpeg_dct=("ifast" if recipe.jpeg_fast_dct else "islow") if _jpeg_frames(source) else None,
            slots=tuple(recipe.slots),
            token_mask=cache.has_mask,
        ),
        layers=tuple(cache.layers),
        grid=tuple(cache.grid),
        tokens_per_view=cache.grid[0] * cache.grid[1],
        channels=cache.channels,
        dtype=cache.dtype,
        reduce=_reduce_summary(targets.reduce),
        codec=targets.codec,
        checksum=targets.checksum,
        steps_per_shard=cache.steps_per_shard,
        bytes_on_disk=on_disk,
        raw_bytes_per_step=raw_per_step,
        bytes_per_step=on_disk / steps_done if steps_done else None,
        compression_ratio=raw_per_step * steps_done / on_disk if steps_done else None,
        shards_done=int(done.sum()),
        shards=cache.num_shards,
        steps_done=steps_done,
        complete=bool(done.all()),
        missing_episodes=tuple(cache.missing_episodes()),
        vggt=VggtSummary(
            **same_fields(vggt, ("weights", "weights_id", "preprocess", "compute_dtype")),
            random_weights=bool(random_weights),
            config=dict(vggt.config),
        ),
        created=provenance.created,
        sfcache_version=provenance.sfcache_version,
        format_version=provenance.format_version,
        warnings=tuple(warnings),
    )


def _reduce_summary(reduce: ReduceProvenance | None) -> ReduceSummary | None:
    """A reduced store's request, K and held-out fidelity per layer (None for full targets)."""
    if reduce is None:
        return None
    return ReduceSummary(**same_fields(reduce, tuple(f.name for f in dataclasses.fields(ReduceSummary))))


def _raw_bytes_per_step(cache: Cache) -> int:
    """Bytes of one step in the stored dtype, uncompressed, all layers (int8 scales and mask included)."""
    if cache.reduced:
        return int(cache.provenance.targets.reduce.bytes_per_step)
    views, tokens = len(cache.views), cache.grid[0] * cache.grid[1]
    if cache.dtype == "int8" and cache.provenance.format_version == 1:  # per-channel scales
        return (views * tokens * cache.channels + views * cache.channels * 4) * len(cache.layers)
    return step_bytes(views, tokens, cache.channels, cache.dtype, len(cache.layers), cache.has_mask)


def _shard_length(cache: Cache, shard: int) -> int:
    rows = cache.shard_rows(int(shard))
    return rows.stop - rows.start


def episode_report(cache: Cache, key: str, layer: int | None = None) -> EpisodeReport:
    """Per-step token L2 norms of one episode (mean/min/max per view): flat or exploding targets show here."""
    record = cache.episode(key)
    layer = shown_layer(cache, layer)
    missing = key in cache.missing_episodes()
    steps = []
    if not missing:
        for first in range(0, record.length, cache.steps_per_shard):
            chunk = cache.read(key, slice(first, first + cache.steps_per_shard), layer=layer)
            norms = np.linalg.norm(chunk, axis=-1)  # [T, V, tokens]
            for offset, step_norms in enumerate(norms):
                steps.append(
                    StepNorms(
                        step=first + offset,
                        row=record.start + first + offset,
                        mean_norm=tuple(step_norms.mean(axis=-1).tolist()),
                        min_norm=tuple(step_norms.min(axis=-1).tolist()),
                        max_norm=tuple(step_norms.max(axis=-1).tolist()),
                    )
                )

    def overall(reduce, figures: str) -> tuple[float, ...] | None:
        return tuple(reduce([getattr(s, figures) for s in steps], axis=0).tolist()) if steps else None

    return EpisodeReport(
        key=key,
        instruction=record.instruction,
        start=record.start,
        length=record.length,
        layer=layer,
        views=tuple(cache.views),
        extracted=not missing,
        steps=tuple(steps),
        mean_norm=overall(np.mean, "mean_norm"),
        min_norm=overall(np.min, "min_norm"),
        max_norm=overall(np.max, "max_norm"),
    )
