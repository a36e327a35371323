"""A store's provenance, attrs["sfcache"] (ARCHITECTURE.md "Store layout"), as typed records.

Read once from zarr.json by `Cache` (`cache.provenance`) and written by `StoreConfig`; dicts exist only at the
JSON edge (`from_attrs`, `to_attrs`). Fields a version-1 store lacks read as their documented defaults
(recipe "none", mask "none", checksum "none"). `source` stays `Source.describe()`'s dict: it is format-specific.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from sfcache.rows import EpisodeRecord

__all__ = ["Fidelity", "Provenance", "ReduceProvenance", "TargetsProvenance", "VggtProvenance"]

REDUCE_IDENTITY = ("method", "asked", "min_cosine", "sample_steps", "held_out_steps")  # compared on resume


@dataclass(frozen=True)
class VggtProvenance:
    """The model that made the targets: weights as asked, their id (sha256 or random preset+seed), architecture,
    preprocessing mode and compute dtype."""

    weights: str | None = None
    weights_id: str | None = None
    config: Mapping = field(default_factory=dict)  # VGGTConfig fields
    compute_dtype: str | None = None
    preprocess: str | None = None

    @property
    def depth(self) -> int:
        """VGGT's number of blocks (0 when unrecorded): negative layer indices count back from it."""
        return int(self.config.get("depth", 0))

    @classmethod
    def from_attrs(cls, attrs: Mapping | None) -> VggtProvenance:
        attrs = attrs or {}
        return cls(
            attrs.get("weights"),
            attrs.get("weights_id"),
            dict(attrs.get("config") or {}),
            attrs.get("compute_dtype"),
            attrs.get("preprocess"),
        )

    def to_attrs(self) -> dict:
        return {
            "weights": self.weights,
            "weights_id": self.weights_id,
            "config": dict(self.config),
            "compute_dtype": self.compute_dtype,
            "preprocess": self.preprocess,
        }


@dataclass(frozen=True)
class Fidelity:
    """Held-out per-token cosine of a reduced layer through the stored dtype, with its K."""

    k: int
    mean: float
    p1: float
    worst: float

    def to_attrs(self) -> dict:
        return {"k": self.k, "mean": self.mean, "p1": self.p1, "worst": self.worst}


@dataclass(frozen=True)
class ReduceProvenance:
    """`--reduce pca:...`: the request (the store's identity) and, once fitted, K, fidelity and size per layer."""

    method: str
    asked: str
    min_cosine: float | None
    sample_steps: int
    held_out_steps: int
    k: Mapping[int, int] | None = None
    fidelity: Mapping[int, Fidelity] | None = None
    bytes_per_step: int | None = None
    basis: str | None = None  # where the bases are stored (a note for readers of zarr.json)

    @property
    def request(self) -> dict:
        """What was asked, as `store.Reduction.request` holds it."""
        return {name: getattr(self, name) for name in REDUCE_IDENTITY}

    @classmethod
    def from_attrs(cls, attrs: Mapping | None) -> ReduceProvenance | None:
        if attrs is None:
            return None
        fidelity = attrs.get("fidelity")
        return cls(
            *(attrs.get(name) for name in REDUCE_IDENTITY),
            k=None if attrs.get("k") is None else {int(layer): int(k) for layer, k in attrs["k"].items()},
            fidelity=None if fidelity is None else {int(layer): Fidelity(**f) for layer, f in fidelity.items()},
            bytes_per_step=attrs.get("bytes_per_step"),
            basis=attrs.get("basis"),
        )

    def to_attrs(self) -> dict:
        if self.k is None:
            return self.request
        return {
            **self.request,
            "k": {str(layer): k for layer, k in self.k.items()},
            "fidelity": None
            if self.fidelity is None
            else {str(layer): f.to_attrs() for layer, f in self.fidelity.items()},
            "bytes_per_step": self.bytes_per_step,
            "basis": self.basis,
        }


@dataclass(frozen=True)
class TargetsProvenance:
    """What the stored targets are: layers (absolute indices), grid, views (VGGT order), width and encoding."""

    layers: tuple[int, ...]
    grid: tuple[int, int]
    views: tuple[str, ...]
    channels: int
    dtype: str
    codec: str = "none"
    native_grid: tuple[int, int] | None = None  # VGGT's patch grid before pooling
    aspect_ratio: float | None = None  # preprocessed image width / height
    checksum: str = "none"  # "none" | "crc32c"
    position_embedding: str = "not baked in"
    mask: str = "none"  # "none" | "tokens" (absent in version 1: "none")
    int8_block: int | None = None  # int8 stores: channels per scale
    reduce: ReduceProvenance | None = None

    @property
    def has_mask(self) -> bool:
        return self.mask == "tokens"

    @classmethod
    def from_attrs(cls, attrs: Mapping) -> TargetsProvenance:
        native = attrs.get("native_grid")
        return cls(
            layers=tuple(int(x) for x in attrs["layers"]),
            grid=tuple(int(x) for x in attrs["grid"]),
            views=tuple(attrs["views"]),
            channels=int(attrs["channels"]),
            dtype=str(attrs["dtype"]),
            codec=attrs.get("codec", "none"),
            native_grid=None if native is None else tuple(int(x) for x in native),
            aspect_ratio=attrs.get("aspect_ratio"),
            checksum=attrs.get("checksum", "none"),
            position_embedding=attrs.get("position_embedding", "not baked in"),
            mask=attrs.get("mask", "none"),
            int8_block=attrs.get("int8_block"),
            reduce=ReduceProvenance.from_attrs(attrs.get("reduce")),
        )

    def to_attrs(self) -> dict:
        return {
            "layers": list(self.layers),
            "grid": list(self.grid),
            "native_grid": None if self.native_grid is None else list(self.native_grid),
            "aspect_ratio": self.aspect_ratio,
            "views": list(self.views),
            "channels": self.channels,
            "dtype": self.dtype,
            "codec": self.codec,
            "checksum": self.checksum,
            "position_embedding": self.position_embedding,
            "mask": self.mask,
            **({"int8_block": self.int8_block} if self.int8_block is not None else {}),
            **({"reduce": self.reduce.to_attrs()} if self.reduce is not None else {}),
        }


@dataclass(frozen=True)
class Provenance:
    """attrs["sfcache"]: how a store was made, its shards and its episode index."""

    format_version: int
    sfcache_version: str | None
    created: str | None
    num_steps: int
    steps_per_shard: int
    num_shards: int
    episodes: tuple[EpisodeRecord, ...]
    vggt: VggtProvenance
    targets: TargetsProvenance
    source: Mapping  # Source.describe()
    recipe: str = "none"  # absent in version 1: "none"
    selection: str | None = None  # the --episodes pattern

    @classmethod
    def from_attrs(cls, attrs: Mapping) -> Provenance:
        """From a validated attrs["sfcache"] (see `store._validate_attrs`)."""
        return cls(
            format_version=attrs.get("format_version"),
            sfcache_version=attrs.get("sfcache_version"),
            created=attrs.get("created"),
            num_steps=int(attrs["num_steps"]),
            steps_per_shard=int(attrs["steps_per_shard"]),
            num_shards=int(attrs["num_shards"]),
            episodes=tuple(EpisodeRecord(*e) for e in attrs["episodes"]),
            vggt=VggtProvenance.from_attrs(attrs.get("vggt")),
            targets=TargetsProvenance.from_attrs(attrs["targets"]),
            source=dict(attrs.get("source") or {}),
            recipe=str(attrs.get("recipe", "none")),
            selection=attrs.get("selection"),
        )

    def to_attrs(self) -> dict:
        """attrs["sfcache"] as written to zarr.json (key order as ARCHITECTURE.md's)."""
        return {
            "format_version": self.format_version,
            "sfcache_version": self.sfcache_version,
            "created": self.created,
            "num_steps": self.num_steps,
            "steps_per_shard": self.steps_per_shard,
            "num_shards": self.num_shards,
            "selection": self.selection,
            "recipe": self.recipe,
            "episodes": [list(e) for e in self.episodes],
            "vggt": self.vggt.to_attrs(),
            "targets": self.targets.to_attrs(),
            "source": dict(self.source),
        }
