"""`sf probe`: how much metric depth an `sf train` policy's visual tokens carry (Spatial Forcing's Fig. 3 protocol).

The policy is frozen. Its visual tokens at the probe layers (default: the SF-aligned block and the 3 before
it) and at the patch-embedding input (block 0, the control) are computed for every step of a LIBERO HDF5
dataset with depth, from the frames as validation prepares them (centre 90% crop, resized to the policy's
input), and stored in a token store (OUT/tokens, resumable). `sfcache.probe` then trains one DPT head on the
policy's layers and one on the patch embedding (same initialisation, same split, same steps), and reports
both next to the mean-depth-image baseline, on held-out episodes and on --test-data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from sfcache.device import DEVICE_CHOICES
from sfcache.errors import ConfigMismatch, Message, SfcacheError, field_of, raise_problems
from sfcache.options import comma_text, int_list, option, same_fields
from sfcache.probe import FitSettings, SourceRows, StoreData, probe, write_token_store
from sfcache.probe.head import SCALES
from sfcache.sources import Source, open_source
from sfcache.train.augment import center_boxes, crop_images
from sfcache.train.libero_policy import CheckpointPolicy
from sfcache.train.model import encode_instructions
from sfcache.vggt import random_weights_warning

POLICY, PATCH_EMBEDDING = "policy", "patch_embedding"  # the two heads' names in probe.json
# the FitSettings fields `sf probe` offers under the same names
SETTINGS = ("steps", "batch_size", "lr", "width", "seed", "test_fraction", "max_depth", "device", "save_every")


@dataclass
class ProbeConfig:
    """What `sf probe` was asked to do (each option field's help is its `sf probe` option's)."""

    checkpoint: Path = option(help="An `sf train` run folder or its checkpoint.pt (kept frozen).", argument=True)
    data: Path = option(help="LIBERO HDF5 dataset with depth (`sf collect-libero --depth`, `sf render-depth`).")
    out: Path = option(help="Probe folder: probe.json, metrics.jsonl, pictures, heads/, token stores.")
    layers: tuple[int, ...] | None = option(
        None,
        "4 comma-separated policy blocks the head reads, shallow to deep (0 = patch-embedding input; "
        "default: the SF-aligned block and the 3 before it).",
        parse=int_list,
        show=comma_text,
    )
    test_data: Path | None = option(None, "A second LIBERO HDF5 dataset with depth (e.g. another suite), tested whole.")
    steps: int = option(2000, "Training steps of each head.")
    batch_size: int = option(8, "Frames per step.")
    lr: float = option(1e-3, "Peak AdamW learning rate (cosine decay).")
    width: int = option(64, "DPT head channels.")
    test_fraction: float = option(0.2, "Share of --data's episodes held out whole for the test split.")
    max_depth: float = option(10.0, "Ground truth at or beyond this many metres is not a valid pixel.")
    seed: int = option(0, "Seed of the split, the heads' initialisation and the batches.")
    device: str = option("auto", f"{DEVICE_CHOICES}.")
    every: int = option(1, "Probe every N-th step of each episode (the token stores shrink N-fold).")
    save_every: int = option(200, "Checkpoint each head every N steps.")
    resume: bool = option(True, "Continue from OUT (token stores, heads) if present.")

    def __post_init__(self):
        self.checkpoint, self.data, self.out = Path(self.checkpoint), Path(self.data), Path(self.out)
        self.test_data = Path(self.test_data) if self.test_data else None
        named = partial(field_of, ProbeConfig)
        problems = []
        if self.layers is not None and len(self.layers) != len(SCALES):
            problems.append(
                Message(named("layers"), f" needs {len(SCALES)} blocks (a DPT pyramid), got {comma_text(self.layers)}")
            )
        if self.every < 1:
            problems.append(Message(named("every"), f" must be >= 1, got {self.every}"))
        try:
            self.settings()  # FitSettings' own checks, naming this config's fields
        except SfcacheError as problem:
            problems.append(problem.message.renamed({field_of(FitSettings, name): named(name) for name in SETTINGS}))
        raise_problems(problems)

    def settings(self) -> FitSettings:
        """The head's training settings: the fields this config hands on under the same names."""
        return FitSettings(**same_fields(self, SETTINGS))


def default_layers(align_layer: int) -> tuple[int, ...]:
    """The SF-aligned block and the 3 before it (SF's protocol), repeating block 1 in policies shallower than that."""
    return tuple(max(1, align_layer - 3 + i) for i in range(len(SCALES)))


def depth_source(dataset: Path, views: tuple[str, ...] | None = None) -> Source:
    """The dataset in `views` (a policy's), checked to be LIBERO HDF5 with depth (one line naming what is missing);
    `sf reproduce-libero` checks --probe-dir with it before any work."""
    source = open_source(dataset, views=views)
    if source.format != "libero_hdf5":
        raise SfcacheError(f"{dataset}: a {source.format} dataset; sf probe reads LIBERO HDF5 with depth")
    source.read(source.episodes()[0].key, 0, 1, frames=False, depth=True)
    return source


def policy_tokens(
    policy: CheckpointPolicy, source: Source, store: Path, layers: Sequence[int], every: int, overwrite: bool
) -> StoreData:
    """StoreData of the frozen policy's visual tokens at `layers` for every `every`-th step of `source`, written to
    `store` (resumable), with depth and frames cropped as the policy saw them."""
    lengths = {info.key: info.num_steps for info in source.episodes()}
    kept = [replace(info, num_steps=-(-info.num_steps // every)) for info in source.episodes()]
    config, model = policy.config, policy.model
    instructions = {info.key: info.instruction for info in kept}

    @torch.no_grad()
    def hidden(key: str, start: int, stop: int) -> np.ndarray:
        steps = source.read(key, start * every, min((stop - 1) * every + 1, lengths[key]))
        frames = torch.from_numpy(steps.frames[::every]).to(policy.device).permute(0, 1, 4, 2, 3).float() / 255
        images = crop_images(frames, center_boxes(len(frames)), config.image_size[0])
        text = encode_instructions([instructions[key]] * len(frames), config.text_len).to(policy.device)
        proprio = torch.from_numpy(steps.proprio[::every]).to(policy.device)
        return model.hidden_states(images, text, proprio, layers).float().cpu().numpy()

    described = policy.describe()
    try:
        cache = write_token_store(
            store,
            kept,
            hidden,
            layers=layers,
            views=policy.views,
            grid=config.grid,
            channels=config.dim,
            model={
                "weights": described["checkpoint"],
                "weights_id": f"sha256:{described['sha256']}",
                "config": config.to_dict(),
                "preprocess": f"every {every}th step, centre 90% crop resized to the policy's input (its validation's)",
                "compute_dtype": "float32",
            },
            source=source.describe(),
            overwrite=overwrite,
        )
    except ConfigMismatch as mismatch:  # `sf probe` starts a token store over with --no-resume
        raise mismatch.with_fix("use --no-resume to start over, or another --out") from None
    rows = SourceRows(source, cache.index, config.image_size[0], center_boxes(1)[0].tolist(), every=every)
    return StoreData(store, depth=rows.depth, frames=rows.frames)


def run_probe(config: ProbeConfig) -> dict:
    """Probe the checkpoint's layers and its patch embedding, with the mean-depth baseline; probe.json's dict."""
    policy = CheckpointPolicy(config.checkpoint, device=config.device)
    depth = policy.config.depth
    layers = config.layers or default_layers(policy.config.align_layer)
    if not all(0 <= layer <= depth for layer in layers):
        raise SfcacheError(f"--layers {comma_text(layers)}: this policy has blocks 1..{depth} (0 = patch embedding)")
    stored = tuple(sorted({0, *layers}))
    sources = {"tokens": depth_source(config.data, policy.views)}  # every input checked before any work
    if config.test_data is not None:
        sources["tokens_test"] = depth_source(config.test_data, policy.views)
    try:
        config.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SfcacheError(f"--out {config.out}: cannot be a probe folder ({error.strerror or error})") from None
    data, *tests = (
        policy_tokens(policy, source, config.out / name, stored, config.every, overwrite=not config.resume)
        for name, source in sources.items()
    )
    test = {"test_data": tests[0]} if tests else {}
    weights_id = policy.identity.get("weights_id")
    about = {
        "checkpoint": policy.describe(),
        "align_layer": policy.config.align_layer,
        "layers": list(layers),
        "sf_targets": weights_id,  # None: the baseline policy trained without SF
        "warning": random_weights_warning(weights_id),
        "data": str(config.data.resolve()),
        "test_data": None if config.test_data is None else str(config.test_data.resolve()),
    }
    heads = {POLICY: tuple(stored.index(layer) for layer in layers), PATCH_EMBEDDING: (stored.index(0),) * len(SCALES)}
    return probe(data, config.out, config.settings(), heads, test, about, config.resume, control=PATCH_EMBEDDING)
