"""What an extraction will do, worked out once from its config: `--dry-run` prints it, `extract` builds on it."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from sfcache.device import resolve_device
from sfcache.errors import Message, SourceError
from sfcache.extract.config import ExtractConfig, named
from sfcache.recipes import Recipe, camera_views, get_recipe, slot_layout
from sfcache.reduce import parse_reduce
from sfcache.sources import EpisodeInfo, Source, open_source
from sfcache.store import StoreConfig, pack_episodes, step_bytes
from sfcache.vggt import PRESETS, VGGTConfig, preprocess, weights_config
from sfcache.vggt.model import resolve_layers


@dataclass(frozen=True)
class Selection:
    """The source as the recipe reads it, its selected episodes and the VGGT slot layout (no model needed)."""

    source: Source
    recipe: Recipe
    layout: tuple[str, ...]  # VGGT sequence: source views and blank slots
    episodes: tuple[EpisodeInfo, ...]


@dataclass(frozen=True)
class ExtractPlan:
    """Everything a run derives from its config and the model's architecture, computed once (`make_plan`)."""

    config: ExtractConfig
    selection: Selection
    model: VGGTConfig
    device: str  # what the workers use (a --scheduler's workers resolve it themselves: then as asked)
    layers: tuple[int, ...]  # absolute layer indices
    frame_size: tuple[int, int]  # the first step's frames (H, W)
    native_grid: tuple[int, int]  # VGGT's patch grid of the preprocessed frames
    aspect_ratio: float  # preprocessed width / height
    grid: tuple[int, int]  # the stored grid per view
    steps: int
    shards: int
    bytes_per_step: int  # as stored (pca:auto: counted at full width, its K is known only after the fit)

    @property
    def source(self) -> Source:
        return self.selection.source

    def store_config(self, facts: dict) -> StoreConfig:
        """The store this plan writes; `facts` are the workers' (weights_id, config, compute_dtype)."""
        cfg, selection = self.config, self.selection
        return StoreConfig(
            episodes=pack_episodes(selection.episodes),
            layers=self.layers,
            grid=self.grid,
            native_grid=self.native_grid,
            aspect_ratio=self.aspect_ratio,
            views=selection.layout,
            channels=self.model.out_channels,
            vggt={"weights": cfg.vggt, **facts, "preprocess": cfg.preprocess},
            source=self.source.describe(),
            recipe=selection.recipe.name,
            token_mask=selection.recipe.token_mask,
            dtype=cfg.dtype,
            codec=cfg.codec,
            checksum=cfg.checksum,
            steps_per_shard=cfg.steps_per_shard,
            selection=cfg.episodes,
        )

    def facts(self) -> dict:
        """What `sf extract --dry-run` prints, in its order."""
        cfg, selection = self.config, self.selection
        return {
            "format": self.source.format,
            "source": str(cfg.source),
            "recipe": selection.recipe.name,
            "views": list(selection.layout),
            "frame_size": list(self.frame_size),
            "episodes": len(selection.episodes),
            "steps": self.steps,
            "skipped_episodes": [str(e) for e in self.source.skipped],
            "layers": list(self.layers),
            "grid": list(self.grid),
            "channels": self.model.out_channels,
            "dtype": cfg.dtype,
            "codec": cfg.codec,
            "reduce": cfg.reduce,
            "vggt": cfg.vggt,  # None: not given; the sizes are VGGT-1B's
            "device": self.device,
            "shards": self.shards,
            "bytes_per_step": self.bytes_per_step,
            "store_bytes_uncompressed": self.bytes_per_step * self.steps,
        }


def select(cfg: ExtractConfig) -> Selection:
    """Open the source as the recipe reads it (decode) and select the episodes; SourceError when none is left."""
    recipe = get_recipe(cfg.recipe)
    source = open_source(Path(cfg.source).resolve(), cfg.format, camera_views(cfg.views), skip_bad=cfg.skip_bad)
    source.jpeg_fast_dct = recipe.jpeg_fast_dct
    layout = slot_layout(recipe, cfg.views, source.views)
    infos = source.episodes()
    if cfg.episodes is not None:
        infos = [info for info in infos if fnmatch.fnmatchcase(info.key, cfg.episodes)]
    if not infos:
        what = (
            Message("no episode key matches ", named("episodes"), f" {cfg.episodes!r}")
            if cfg.episodes
            else "no episodes"
        )
        if source.skipped and not cfg.episodes:
            what = Message(
                f"every episode is bad: all {len(source.skipped)} were skipped by ",
                named("skip_bad"),
                f", the first because {source.skipped[0]}",
            )
        raise SourceError(cfg.source, Message(what, " (expected at least one)"))
    return Selection(source, recipe, layout, tuple(infos))


def make_plan(cfg: ExtractConfig, selection: Selection, model: VGGTConfig, device: str) -> ExtractPlan:
    """The plan of a run with this model: its layers checked against the model, the grid and sizes from one
    preprocessed step."""
    layers = resolve_layers(cfg.layers, model.depth, named("layers"), distinct=True)
    frames = selection.source.read(selection.episodes[0].key, 0, 1).frames
    height, width = preprocess(frames, cfg.preprocess, model.img_size).shape[-2:]
    native = (height // model.patch_size, width // model.patch_size)
    grid = cfg.grid or native
    steps = sum(info.num_steps for info in selection.episodes)
    k = parse_reduce(cfg.reduce)
    per_step = step_bytes(
        len(selection.layout),
        grid[0] * grid[1],
        k if isinstance(k, int) else model.out_channels,
        cfg.dtype,
        len(layers),
        selection.recipe.token_mask,
    )
    return ExtractPlan(
        config=cfg,
        selection=selection,
        model=model,
        device=device,
        layers=layers,
        frame_size=tuple(frames.shape[2:4]),
        native_grid=native,
        aspect_ratio=width / height,
        grid=grid,
        steps=steps,
        shards=-(-steps // cfg.steps_per_shard),
        bytes_per_step=per_step,
    )


def plan(cfg: ExtractConfig) -> ExtractPlan:
    """What `extract` would do, without Dask or a model forward (`sf extract --dry-run`): the model's architecture
    from the weights' config (none given: VGGT-1B, the model SF uses), the device resolved here as the local run
    does, so a GPU that is not there fails the dry run too (a --scheduler's workers resolve it themselves)."""
    device = cfg.device if cfg.scheduler else str(resolve_device(cfg.device, name=named("device")))
    selection = select(cfg)
    model = weights_config(cfg.vggt) if cfg.vggt else PRESETS["vggt-1b"]
    return make_plan(cfg, selection, model, device)
