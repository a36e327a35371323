"""What a target store holds, whether it is whole and right, and what its features look like.

Every function returns a frozen result record (`to_json()` is what `sf inspect-cache --json` prints) or
writes one file; `sf inspect-cache` renders them.
A store costs GPU hours, so the checks read everything that can go wrong on disk (torn or
overwritten shards, NaN, an index that does not add up, done flags without data) and `verify`
recomputes sampled steps from the source with the recorded configuration.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from rich.progress import Progress

from sfcache.errors import NotAStore, StoreError, WeightsError
from sfcache.options import same_fields
from sfcache.pooling import pooled_targets
from sfcache.provenance import Fidelity, ReduceProvenance
from sfcache.recipes import get_recipe, insert_blanks, recipe_inputs
from sfcache.sources import FORMATS, Source, open_source, recorded_views
from sfcache.store import (
    DONE_ARRAY,
    LOCK_NAME,
    MASK_ARRAY,
    Cache,
    decode,
    is_locked,
    layer_array,
    open_cache,
    step_bytes,
)
from sfcache.vggt import load_vggt, random_weights_warning
from sfcache.vggt.preprocess import host_frames, letterbox_mask

__all__ = [
    "DEFAULT_THRESHOLDS",
    "CheckResult",
    "EpisodeReport",
    "PcaPicture",
    "Summary",
    "VerifyResult",
    "check",
    "episode_report",
    "open_store",
    "pca_picture",
    "pca_picture_size",
    "pca_rgb",
    "summarize",
    "verify",
]

# Worst per-token cosine `verify` accepts. Storing alone costs: float16 < 1e-7, bfloat16 ~3e-6, int8 with
# per-token, 128-channel-block scales ~3e-4 (measured worst on heavy-tailed 2048-channel features); the rest of
# the margin is for recomputation noise (autocast kernels, batch composition). Wrong targets score far lower.
DEFAULT_THRESHOLDS = {"float16": 0.999, "bfloat16": 0.999, "int8": 0.995}
# A reduced store (--reduce) is checked against the fidelity it recorded on its held-out steps: per layer the
# recomputed mean cosine may fall at most REDUCED_MEAN_MARGIN below the recorded mean (other steps, recomputation
# noise), and the default worst-token threshold is the recorded worst less REDUCED_WORST_MARGIN.
REDUCED_MEAN_MARGIN, REDUCED_WORST_MARGIN = 0.01, 0.05
LISTED = 20  # episode keys named in one failure line before "... and N more"


# ----------------------------------------------------------------------------- result records


class _Record:
    def to_json(self) -> dict:
        """This record as JSON types (what `sf inspect-cache --json` prints)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclass(frozen=True)
class RecipeSummary(_Record):
    name: str
    matches: str
    jpeg_dct: str | None  # "ifast" | "islow"; None where the format holds no JPEGs (raw pixels, PNG, video)
    slots: tuple[str, ...]
    token_mask: bool


@dataclass(frozen=True)
class ReduceSummary(_Record):
    asked: str
    min_cosine: float | None
    sample_steps: int
    held_out_steps: int
    fidelity: Mapping[int, Fidelity]
    bytes_per_step: int


@dataclass(frozen=True)
class VggtSummary(_Record):
    weights: str
    weights_id: str
    random_weights: bool
    preprocess: str
    compute_dtype: str
    config: Mapping


@dataclass(frozen=True)
class Summary(_Record):
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
class StepNorms(_Record):
    step: int
    row: int
    mean_norm: tuple[float, ...]  # per view
    min_norm: tuple[float, ...]
    max_norm: tuple[float, ...]


@dataclass(frozen=True)
class EpisodeReport(_Record):
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


@dataclass(frozen=True)
class Failure(_Record):
    where: str  # the file, array, shard or episode concerned
    what: str


@dataclass(frozen=True)
class CheckResult(_Record):
    ok: bool
    failures: tuple[Failure, ...]
    shards_checked: int
    shards: int
    notes: tuple[str, ...] = ()  # what the check could not cover (no digests recorded)


@dataclass(frozen=True)
class WorstToken(_Record):
    episode: str
    step: int
    view: str
    token: int


@dataclass(frozen=True)
class LayerCosines(_Record):
    """Recomputed vs stored per-token cosine of one layer; a reduced store adds its recorded held-out fidelity and
    the mean over tokens with image content (what that fidelity was measured on)."""

    mean_cos: float
    min_cos: float
    p1_cos: float
    worst: WorstToken
    recorded: Fidelity | None = None
    valid_mean_cos: float | None = None

    def to_json(self) -> dict:
        figures = super().to_json()
        return {k: v for k, v in figures.items() if k not in ("recorded", "valid_mean_cos") or v is not None}


@dataclass(frozen=True)
class VerifyResult(_Record):
    ok: bool
    below_recorded: tuple[str, ...]  # layers whose recomputed mean fell below the recorded one
    threshold: float
    mask_errors: int
    mean_cos: float
    min_cos: float
    layers: Mapping[str, LayerCosines]  # by str(layer), as in JSON
    steps: tuple[tuple[str, int], ...]  # (episode, step) recomputed
    weights_id: str
    device: str
    source_changed: bool

    def to_json(self) -> dict:
        return {**super().to_json(), "layers": {layer: figures.to_json() for layer, figures in self.layers.items()}}


@dataclass(frozen=True)
class PcaPicture(_Record):
    path: str
    width: int
    height: int
    layer: int
    views: tuple[str, ...]
    steps: tuple[tuple[str, int], ...]


# ----------------------------------------------------------------------------- provenance


def open_store(path: str | Path) -> Cache:
    """open_cache, requiring the complete provenance `sf extract` records (so no half-store gives a KeyError)."""
    return open_cache(path, complete=True)


# ----------------------------------------------------------------------------- summary


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
        warnings.append(_lock_state(cache.path))
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


# ----------------------------------------------------------------------------- one episode


def _shown_layer(cache: Cache, layer: int | None) -> int:
    """The stored layer a report shows: the asked one (StoreError naming the stored layers), else the last."""
    return cache.resolve_layer(cache.layers[-1] if layer is None else layer)


def episode_report(cache: Cache, key: str, layer: int | None = None) -> EpisodeReport:
    """Per-step token L2 norms of one episode (mean/min/max per view): flat or exploding targets show here."""
    record = cache.episode(key)
    layer = _shown_layer(cache, layer)
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


# ----------------------------------------------------------------------------- integrity


def check(path: str | Path, progress: Progress | None = None) -> CheckResult:
    """Read every done shard, compare its files with the digests recorded when they were written (any changed
    byte, or another shard's file in its place), and cross-check index, arrays and done flags; never raises on a
    bad store (NotAStore for a path that is no store at all). Each failure names the file, array, shard or
    episode concerned."""
    path = Path(path)
    failures: list[Failure] = []

    def fail(where: str, what: str) -> None:
        failures.append(Failure(where, what))

    try:
        cache = open_store(path)
    except NotAStore:
        raise
    except StoreError as error:
        fail(str(path / "zarr.json"), str(error))
        return _check_result(failures, 0, 0)

    _check_index(cache, fail)
    arrays = _check_arrays(cache, fail)
    done = _check_done(cache, fail)
    if done is None or arrays is None:
        return _check_result(failures, 0, cache.num_shards)

    task = progress.add_task("check", total=int(done.sum())) if progress else None
    checked, unrecorded = 0, []
    for shard in np.flatnonzero(done).tolist():
        before = len(failures)
        _check_shard(cache, shard, arrays, fail)
        if not _check_digests(cache, shard, fail if len(failures) == before else lambda where, what: None):
            unrecorded.append(shard)  # (a shard already failing above is not reported twice)
        checked += 1
        if progress:
            progress.advance(task)
    notes = []
    if not cache.has_digests:
        notes.append(
            "no digests recorded: this store was written before sfcache recorded shard digests, so a flipped "
            "byte that still decodes, or a shard file moved to another position, cannot be seen (`sf extract "
            "--checksum` stores see flipped bytes; `--verify` recomputes steps)"
        )
    elif unrecorded:
        notes.append(
            f"no digests recorded for done shard(s) {_ranges(np.array(unrecorded))} (written before sfcache "
            "recorded them): their bytes are decoded and checked for NaN/Inf only"
        )
    if not done.all():
        keys = cache.missing_episodes()
        more = f" ... and {len(keys) - LISTED} more" if len(keys) > LISTED else ""
        fail(
            "done",
            f"shards {_ranges(np.flatnonzero(~done))} not done: {len(keys)} episode(s) incomplete "
            f"({', '.join(keys[:LISTED])}{more}); run `sf extract` again to finish",
        )
    if (path / LOCK_NAME).exists():
        fail(str(path / LOCK_NAME), _lock_state(path))
    return _check_result(failures, checked, cache.num_shards, notes)


def _ranges(numbers: np.ndarray) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    runs = np.split(numbers, np.flatnonzero(np.diff(numbers) != 1) + 1)
    return ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else f"{run[0]}" for run in runs)


def _lock_state(path: Path) -> str:
    """What a lock file means: a live extractor holds it (flock), or one stopped mid-run and left it."""
    if is_locked(path):
        return "store is locked: an extractor is writing it now"
    return (
        "store was left locked by an extractor that stopped mid-run; run `sf extract` again to finish "
        "(the leftover file blocks nothing)"
    )


def _check_result(failures: list[Failure], checked: int, shards: int, notes: list[str] = ()) -> CheckResult:
    return CheckResult(
        ok=not failures, failures=tuple(failures), shards_checked=checked, shards=shards, notes=tuple(notes)
    )


def _check_digests(cache: Cache, shard: int, fail) -> bool:
    """A done shard's files against the digests recorded when it was written; False when none were recorded."""
    if not cache.has_digests:
        return True  # said once for the whole store
    try:
        if cache.recorded_digests(shard) is None:
            return False
        if not cache.missing_shard_files([shard]):  # a missing file is reported by _check_shard
            problem = cache.digest_problem(shard)
            if problem:
                fail(f"shard {shard}", problem)
    except StoreError as error:
        fail(f"digests shard {shard}", str(error))
    return True


def _check_index(cache: Cache, fail) -> None:
    """Episodes packed back to back from row 0, lengths adding up to num_steps, shard count matching."""
    expected_start, keys = 0, set()
    for key, _, start, length in cache.provenance.episodes:
        if key in keys:
            fail(f"episode {key}", "listed twice in the index")
        keys.add(key)
        if start != expected_start:
            fail(f"episode {key}", f"starts at row {start}, expected {expected_start} (rows must be contiguous)")
        if not (isinstance(length, int) and length > 0):
            fail(f"episode {key}", f"length {length!r}, expected a positive integer")
            return
        expected_start = start + length
    if expected_start != cache.num_steps:
        fail("zarr.json num_steps", f"episodes add up to {expected_start} rows, num_steps says {cache.num_steps}")
    shards = math.ceil(cache.num_steps / cache.steps_per_shard)
    if cache.num_shards != shards:
        fail(
            "zarr.json num_shards",
            f"{cache.num_shards}, expected {shards} ({cache.num_steps} steps / {cache.steps_per_shard} per shard)",
        )


def _check_arrays(cache: Cache, fail) -> dict[int | str, list[str]] | None:
    """Each layer's arrays (values, int8 scales, a reduced store's basis) and the token mask exist with the shape,
    shard shape and dtype the provenance promises; {layer or MASK_ARRAY: names read per shard} if all do."""
    problems = {name: cache.array_problem(name) for name in cache.expected_arrays()}
    for name, problem in problems.items():
        if problem is not None:
            fail(name, problem)
        elif name.endswith(("_mean", "_basis")) and not np.isfinite(values := cache.read_stored(name)).all():
            fail(
                name,
                f"shape {values.shape} (finite: False), expected {values.shape} finite float32 from the provenance",
            )
            problems[name] = "not finite"
    if any(problems.values()):
        return None
    return cache.shard_arrays()


def _check_done(cache: Cache, fail) -> np.ndarray | None:
    try:
        done = cache.read_stored(DONE_ARRAY)
    except (StoreError, ValueError, OSError) as error:
        fail("done", f"done-marker array missing or unreadable ({type(error).__name__}: {error})")
        return None
    if done.shape[0] < cache.num_shards or not np.isin(done, (0, 1)).all():
        fail(
            "done",
            f"{done.shape[0]} flags with values {sorted(set(done.tolist()))[:5]}, "
            f"expected {cache.num_shards} flags of 0 or 1",
        )
        return None
    return done[: cache.num_shards].astype(bool)


def _check_shard(cache: Cache, shard: int, arrays: dict[int | str, list[str]], fail) -> None:
    """A done shard: its files exist, decode (shard-index checksums), and hold finite values."""
    rows = cache.shard_rows(shard)
    for layer, named in arrays.items():
        read = {}
        for name in named:
            file = cache.shard_file(name, shard)
            if not file.is_file():
                fail(str(file), f"shard {shard} is marked done but its file is missing")
                continue
            try:
                read[name] = cache.read_stored(name, rows)
            except Exception as error:  # any decode failure (checksum, truncation, codec) means a bad shard file
                fail(str(file), f"shard {shard} unreadable ({type(error).__name__}: {error})")
        if len(read) != len(named):
            continue
        if layer == MASK_ARRAY:
            if not np.isin(read[MASK_ARRAY], (0, 1)).all():
                fail(f"{MASK_ARRAY} shard {shard}", "values other than 0 and 1")
            continue
        values = layer_array(layer)
        bad = ~np.isfinite(decode(read[values], cache.dtype, read.get(layer_array(layer, "_scale"))))
        if bad.any():
            row, view, token, _ = (int(i) for i in np.argwhere(bad)[0])
            key, step = cache.index.locate(rows.start + row)
            fail(
                f"{values} shard {shard}",
                f"{int(bad.sum())} non-finite value(s) (NaN/Inf); first at episode {key} step {step} "
                f"view {cache.views[view]} token {token}",
            )


# ----------------------------------------------------------------------------- verification


def verify(
    cache: Cache,
    steps: int = 8,
    seed: int = 0,
    weights: str | None = None,
    device: torch.device | str = "cpu",
    threshold: float | None = None,
    source_path: str | Path | None = None,
    batch_size: int = 4,
    progress: Progress | None = None,
) -> VerifyResult:
    """Recompute `steps` random extracted steps with the recorded configuration; per-token cosine vs stored.

    weights: override the recorded checkpoint location (its sha256 must still match the record).
    source_path: where the dataset lives now, if it moved. ok = worst cosine >= threshold
    (default DEFAULT_THRESHOLDS[dtype]; a reduced store: see REDUCED_MEAN_MARGIN, its per-layer means are also
    checked against the recorded held-out fidelity). Raises WeightsError on other weights, StoreError if nothing
    is extracted.
    """
    reduce = cache.provenance.targets.reduce
    recorded = None if reduce is None else reduce.fidelity
    if threshold is None:
        threshold = (
            DEFAULT_THRESHOLDS[cache.dtype]
            if recorded is None
            else max(0.0, min(f.worst for f in recorded.values()) - REDUCED_WORST_MARGIN)
        )
    device = torch.device(device)
    rows = _sample_rows(cache, steps, seed)
    vggt = cache.provenance.vggt
    model, weights_id = load_vggt(weights or vggt.weights, device, compute_dtype=getattr(torch, vggt.compute_dtype))
    if weights_id != vggt.weights_id:
        raise WeightsError(
            f"{weights or vggt.weights}: weights are {weights_id}, but {cache.path} was extracted "
            f"with {vggt.weights_id}; pass --vggt with the checkpoint used for extraction"
        )
    source = _open_recorded_source(cache, source_path)
    locate = cache.index.locate
    recipe = get_recipe(cache.recipe)
    task = progress.add_task("verify", total=len(rows)) if progress else None
    cosines, valid, mask_errors = [], [], 0
    for first in range(0, len(rows), batch_size):
        batch = rows[first : first + batch_size]
        frames = np.concatenate([source.read(key, step, step + 1).frames for key, step in map(locate, batch)])
        images, mask = recipe_inputs(
            frames, recipe, cache.views, vggt.preprocess, model.config.img_size, cache.grid, model.config.patch_size
        )
        tokens = (len(batch), len(cache.views), cache.grid[0] * cache.grid[1])
        valid.append(mask.astype(bool) if mask is not None else np.ones(tokens, bool))
        if mask is not None:
            mask_errors += int((mask != cache.read_rows(batch, mask=True)[1]).sum())
        targets = pooled_targets(model, images.to(device), cache.layers, cache.grid)
        cosines.append(
            np.stack(
                [
                    token_cosine(targets[layer].cpu().numpy(), cache.read_rows(batch, layer=layer))
                    for layer in cache.layers
                ]
            )
        )  # [layers, B, V, tokens]
        if progress:
            progress.advance(task, len(batch))
    cosine = np.concatenate(cosines, axis=1)
    layers = {}
    for index, layer in enumerate(cache.layers):
        worst = np.unravel_index(int(np.argmin(cosine[index])), cosine[index].shape)
        key, step = locate(rows[worst[0]])
        layers[str(layer)] = LayerCosines(
            mean_cos=float(cosine[index].mean()),
            min_cos=float(cosine[index].min()),
            p1_cos=float(np.percentile(cosine[index], 1)),
            worst=WorstToken(episode=key, step=step, view=cache.views[worst[1]], token=int(worst[2])),
            # recorded on tokens with image content: compare like with like
            recorded=None if recorded is None else recorded[layer],
            valid_mean_cos=None if recorded is None else float(cosine[index][np.concatenate(valid)].mean()),
        )
    below_recorded = tuple(
        layer
        for layer, figures in layers.items()
        if figures.recorded is not None and figures.valid_mean_cos < figures.recorded.mean - REDUCED_MEAN_MARGIN
    )
    min_cos = float(cosine.min())
    return VerifyResult(
        ok=min_cos >= threshold and mask_errors == 0 and not below_recorded,
        below_recorded=below_recorded,
        threshold=threshold,
        mask_errors=mask_errors,
        mean_cos=float(cosine.mean()),
        min_cos=min_cos,
        layers=layers,
        steps=tuple(map(locate, rows)),
        weights_id=weights_id,
        device=str(device),
        source_changed=source.fingerprint() != cache.provenance.source.get("fingerprint"),
    )


def _sample_rows(cache: Cache, steps: int, seed: int) -> np.ndarray:
    """`steps` distinct extracted rows, reproducible from `seed`, ascending."""
    if steps < 1:
        raise StoreError(f"{cache.path}: asked to verify {steps} steps; give at least 1")
    rows = _extracted_rows(cache, "verify")
    return np.sort(np.random.default_rng(seed).choice(rows, size=min(steps, rows.size), replace=False))


def _extracted_rows(cache: Cache, purpose: str) -> np.ndarray:
    """All rows in done shards, ascending; StoreError if there are none."""
    shards = np.flatnonzero(cache.done_shards())
    if shards.size == 0:
        raise StoreError(f"{cache.path}: no shard is extracted yet; nothing to {purpose}")
    return np.concatenate([np.arange(cache.shard_rows(int(s)).start, cache.shard_rows(int(s)).stop) for s in shards])


def _open_recorded_source(cache: Cache, source_path: str | Path | None) -> Source:
    """The dataset exactly as extraction read it: recorded format, views (order), rotation, recipe's decode."""
    recorded = cache.provenance.source
    source = open_source(
        source_path or recorded["path"], recorded["format"], recorded_views(recorded), rotate=recorded["rotate"]
    )
    source.jpeg_fast_dct = get_recipe(cache.recipe).jpeg_fast_dct
    return source


def token_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine over channels, [..., C] x [..., C] -> [...]; a zero token against a non-zero one scores 0."""
    dot = (a.astype(np.float64) * b).sum(-1)
    norms = np.linalg.norm(a.astype(np.float64), axis=-1) * np.linalg.norm(b.astype(np.float64), axis=-1)
    return np.where(norms > 0, dot / np.maximum(norms, 1e-300), np.where(dot == 0, 1.0, 0.0))


# ----------------------------------------------------------------------------- PCA pictures


def pca_rgb(tokens: np.ndarray) -> np.ndarray:
    """Tokens [..., C] -> uint8 colours [..., 3]: the first three principal components of all given tokens.

    Each component is clipped to its 1st-99th percentile and scaled to 0-255; its sign is fixed so that
    its largest loading is positive, so the same tokens always get the same colours.
    """
    flat = tokens.reshape(-1, tokens.shape[-1]).astype(np.float64)
    centered = flat - flat.mean(axis=0)
    _, eigenvectors = np.linalg.eigh(centered.T @ centered)
    components = eigenvectors[:, ::-1][:, :3]
    signs = np.sign(components[np.abs(components).argmax(axis=0), np.arange(components.shape[1])])
    projected = centered @ (components * np.where(signs == 0, 1.0, signs))
    if projected.shape[1] < 3:
        projected = np.pad(projected, ((0, 0), (0, 3 - projected.shape[1])))
    low, high = np.percentile(projected, 1, axis=0), np.percentile(projected, 99, axis=0)
    scaled = (projected - low) / np.where(high > low, high - low, 1.0)
    return (np.clip(scaled, 0.0, 1.0) * 255).round().astype(np.uint8).reshape(*tokens.shape[:-1], 3)


LINE = 12  # pixels per line of text (PIL's default font)
CAPTION = (
    "PCA Ln: the targets of VGGT layer n in colour: their first 3 principal components (fit over every token "
    "shown) as red, green, blue, so alike colours are alike features. Hatched: masked tokens (no image there)."
)


def _wrap(text: str, width: int) -> list[str]:
    """`text` in lines of at most `width` pixels: broken at spaces, a longer word (an episode key) anywhere."""
    font, lines = ImageFont.load_default(), [""]
    for word in text.split():
        line = f"{lines[-1]} {word}".strip()
        if not lines[-1] or font.getlength(line) <= width - 4:
            lines[-1] = line
            continue
        lines.append(word)
    wrapped = []
    for line in lines:
        while font.getlength(line) > width - 4 and len(line) > 1:
            cut = max(n for n in range(1, len(line)) if n == 1 or font.getlength(line[:n]) <= width - 4)
            wrapped.append(line[:cut])
            line = line[cut:]
        wrapped.append(line)
    return wrapped


def _legend(width: int, tasks: Sequence[str]) -> list[str]:
    """The caption and the numbered tasks the rows are labelled with, wrapped to `width` pixels."""
    return _wrap(CAPTION, width) + [
        line for n, task in enumerate(tasks, 1) for line in _wrap(f"task {n}: {task}", width)
    ]


def label_band(width: int, tasks: Sequence[str] = ()) -> int:
    """Pixels above a `width` px picture's rows: column labels, the weights, the caption saying what it shows and
    the tasks of its rows (`tasks`: each row's episode key without its last part, in order of first use)."""
    return (2 + len(_legend(width, tasks))) * LINE + 4


def pca_picture_size(frame_size: tuple[int, int], views: int, steps: int, tasks: Sequence[str] = ()) -> tuple[int, int]:
    """(width, height) of a `pca_picture`: a label band, then per step a row of [frame | PCA] per view, at the
    size of the frame shown (what VGGT saw: openpi's 224 px letterbox for a --recipe openpi store)."""
    height, width = frame_size
    return 2 * views * width, label_band(2 * views * width, tasks) + steps * height


def vggt_frames(frames: np.ndarray, preprocess: str) -> np.ndarray:
    """uint8 [T, V, H, W, 3] slot frames -> the picture VGGT was given, where it differs from the frame: openpi's
    letterbox (padding white, as in the VGGT copy); other modes only resize, so the frame itself."""
    if preprocess != "letterbox":
        return frames
    shown = host_frames(frames, "letterbox")
    shown[:, :, ~letterbox_mask(*frames.shape[2:4], shown.shape[2])] = 255
    return shown


def _hatched(size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] grey diagonal stripes: what a masked token is drawn as."""
    rows, cols = np.indices(size)
    return np.where(((rows + cols) // 4 % 2 == 0)[..., None], 70, 150).astype(np.uint8).repeat(3, -1)


def _fit(text: str, width: int) -> str:
    """`text`, its start cut (the end of an episode key is what tells it apart) to fit `width` pixels."""
    font = ImageFont.load_default()
    while len(text) > 4 and font.getlength(text) > width - 4:
        text = "..." + text[4:]
    return text


def pca_picture(
    cache: Cache,
    out: str | Path,
    steps: int = 4,
    episode: str | None = None,
    layer: int | None = None,
    source_path: str | Path | None = None,
) -> PcaPicture:
    """Write a PNG of `steps` extracted steps: each view's input to VGGT beside a PCA-to-RGB picture of its targets.

    Steps are spread evenly over `episode` (or over all extracted rows); each row is labelled with its episode key
    (task included) and step. The PCA is fit over every unmasked token shown, so colours compare across steps and
    views; token grids are upsampled nearest to the frame size; masked tokens (an openpi store's padding and blank
    slots) are hatched, a wholly masked slot labelled so. The PNG is pca_picture_size((H, W), views, steps) pixels.
    """
    layer = _shown_layer(cache, layer)
    rows = _picture_rows(cache, steps, episode)
    source = _open_recorded_source(cache, source_path)
    locate = cache.index.locate
    preprocess = cache.provenance.vggt.preprocess
    frames = vggt_frames(
        insert_blanks(
            np.concatenate([source.read(key, step, step + 1).frames for key, step in map(locate, rows)]), cache.views
        ),
        preprocess,
    )  # [n, V, H, W, 3]
    if cache.has_mask:
        values, mask = cache.read_rows(rows, layer=layer, mask=True)
    else:
        values = cache.read_rows(rows, layer=layer)
        mask = np.ones(values.shape[:-1], bool)
    colours = np.zeros((*values.shape[:-1], 3), np.uint8)
    if mask.any():
        colours[mask] = pca_rgb(values[mask])
    count, views, height, width, _ = frames.shape
    colours, mask = colours.reshape(count, views, *cache.grid, 3), mask.reshape(count, views, *cache.grid)
    shown_rows = [(key.rpartition("/")[0], key.rpartition("/")[2], step) for key, step in map(locate, rows)]
    tasks = list(dict.fromkeys(task for task, _, _ in shown_rows))  # two tasks may each have a demo_0
    canvas = Image.new("RGB", pca_picture_size((height, width), views, count, tasks))
    band = label_band(canvas.width, tasks)
    draw = ImageDraw.Draw(canvas)
    shown = "VGGT input (letterbox)" if preprocess == "letterbox" else "frame"
    for v, view in enumerate(cache.views):
        draw.text((2 * v * width + 2, 1), _fit(f"{view}: {shown}", width), fill="white")
        draw.text(((2 * v + 1) * width + 2, 1), _fit(f"{view}: PCA L{layer}", width), fill="white")
    weights_id = cache.provenance.vggt.weights_id
    random_weights = random_weights_warning(weights_id) is not None
    draw.text(
        (2, 1 + LINE),
        _fit(f"VGGT weights {weights_id}" + (": RANDOM, no geometry" if random_weights else ""), canvas.width),
        fill="red" if random_weights else "white",
    )
    for n, line in enumerate(_legend(canvas.width, tasks)):
        draw.text((2, 1 + (2 + n) * LINE), line, fill=(200, 200, 200))
    hatch = _hatched((height, width))
    for i, (task, episode_name, step) in enumerate(shown_rows):
        top = band + i * height
        for v in range(views):
            tokens = np.asarray(Image.fromarray(colours[i, v]).resize((width, height), Image.Resampling.NEAREST))
            covered = np.asarray(Image.fromarray(mask[i, v]).resize((width, height), Image.Resampling.NEAREST))
            canvas.paste(Image.fromarray(frames[i, v]), (2 * v * width, top))
            canvas.paste(Image.fromarray(np.where(covered[..., None], tokens, hatch)), ((2 * v + 1) * width, top))
            if not mask[i, v].any():
                note = (2 * v + 1) * width + 2, top + height // 2 - LINE // 2
                draw.rectangle(draw.textbbox(note, "masked (no camera)"), fill="black")
                draw.text(note, "masked (no camera)", fill="white")
        label = _fit(f"task {tasks.index(task) + 1} {episode_name} step {step}", 2 * width)
        draw.rectangle(draw.textbbox((2, top + 2), label), fill="black")
        draw.text((2, top + 2), label, fill="white")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG")
    return PcaPicture(
        path=str(out),
        width=canvas.width,
        height=canvas.height,
        layer=layer,
        views=tuple(cache.views),
        steps=tuple(map(locate, rows)),
    )


def _picture_rows(cache: Cache, steps: int, episode: str | None) -> np.ndarray:
    """Up to `steps` extracted rows spread evenly over an episode or the whole store."""
    if steps < 1:
        raise StoreError(f"{cache.path}: asked for a picture of {steps} steps; give at least 1")
    if episode is not None:
        record = cache.episode(episode)
        if episode in cache.missing_episodes():
            raise StoreError(f"{cache.path}: episode {episode!r} is not fully extracted yet; nothing to draw")
        candidates = np.arange(record.start, record.start + record.length)
    else:
        candidates = _extracted_rows(cache, "draw")
    picks = np.linspace(0, candidates.size - 1, min(steps, candidates.size)).round().astype(int)
    return candidates[np.unique(picks)]
