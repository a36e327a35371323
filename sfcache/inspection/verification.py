"""Whether a store's targets are right: sampled steps recomputed from the source, compared token by token."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from sfcache.errors import StoreError, WeightsError
from sfcache.inspection.record import Record
from sfcache.inspection.store_access import extracted_rows, open_recorded_source
from sfcache.pooling import pooled_targets
from sfcache.provenance import Fidelity
from sfcache.recipes import get_recipe, recipe_inputs
from sfcache.store import Cache
from sfcache.vggt import load_vggt

# Worst per-token cosine `verify` accepts. Storing alone costs: float16 < 1e-7, bfloat16 ~3e-6, int8 with
# per-token, 128-channel-block scales ~3e-4 (measured worst on heavy-tailed 2048-channel features); the rest of
# the margin is for recomputation noise (autocast kernels, batch composition). Wrong targets score far lower.
DEFAULT_THRESHOLDS = {"float16": 0.999, "bfloat16": 0.999, "int8": 0.995}
# A reduced store (--reduce) is checked against the fidelity it recorded on its held-out steps: per layer the
# recomputed mean cosine may fall at most REDUCED_MEAN_MARGIN below the recorded mean (other steps, recomputation
# noise), and the default worst-token threshold is the recorded worst less REDUCED_WORST_MARGIN.
REDUCED_MEAN_MARGIN, REDUCED_WORST_MARGIN = 0.01, 0.05


@dataclass(frozen=True)
class WorstToken(Record):
    episode: str
    step: int
    view: str
    token: int


@dataclass(frozen=True)
class LayerCosines(Record):
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
class VerifyResult(Record):
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
    source = open_recorded_source(cache, source_path)
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
    rows = extracted_rows(cache, "verify")
    return np.sort(np.random.default_rng(seed).choice(rows, size=min(steps, rows.size), replace=False))


def token_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine over channels, [..., C] x [..., C] -> [...]; a zero token against a non-zero one scores 0."""
    dot = (a.astype(np.float64) * b).sum(-1)
    norms = np.linalg.norm(a.astype(np.float64), axis=-1) * np.linalg.norm(b.astype(np.float64), axis=-1)
    return np.where(norms > 0, dot / np.maximum(norms, 1e-300), np.where(dot == 0, 1.0, 0.0))
