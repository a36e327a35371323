"""What a store is asked to hold (`StoreConfig`, with its `Reduction`), recorded as its provenance."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import numpy as np

from sfcache.errors import StoreError
from sfcache.options import same_fields
from sfcache.provenance import Fidelity, Provenance, ReduceProvenance, TargetsProvenance, VggtProvenance
from sfcache.rows import EpisodeRecord
from sfcache.store.encoding import DTYPES, int8_block
from sfcache.store.layout import CODECS, FORMAT_VERSION, reduced_step_bytes
from sfcache.version import __version__

__all__ = ["Reduction", "StoreConfig"]


@dataclass(frozen=True, eq=False)
class Reduction:
    """`--reduce pca:...`: what was asked (part of the store's identity) and, once fitted (sfcache.reduce),
    per layer the mean [C] and orthonormal components [K, C] (float32) and the held-out fidelity."""

    request: dict  # method, asked, min_cosine, sample_steps, held_out_steps
    means: Mapping[int, np.ndarray] | None = None
    components: Mapping[int, np.ndarray] | None = None
    fidelity: dict | None = None  # str(layer) -> {k, mean, p1, worst}

    @property
    def fitted(self) -> bool:
        return self.components is not None

    def project(self, layer: int, values: np.ndarray) -> np.ndarray:
        """float32 [..., C] -> coefficients [..., K]."""
        return (np.asarray(values, np.float32) - self.means[layer]) @ self.components[layer].T

    def reconstruct(self, layer: int, coefficients: np.ndarray) -> np.ndarray:
        """coefficients [..., K] -> float32 [..., C]."""
        return coefficients @ self.components[layer] + self.means[layer]


@dataclass(frozen=True)
class StoreConfig:
    """Everything that decides a store's values; a run resumes a store only if these match."""

    episodes: tuple[EpisodeRecord, ...]
    layers: tuple[int, ...]
    grid: tuple[int, int]  # stored token grid per view (h, w)
    native_grid: tuple[int, int]  # VGGT's patch grid before pooling
    aspect_ratio: float  # preprocessed image width / height (for the position embedding)
    views: tuple[str, ...]
    channels: int
    vggt: dict  # weights, weights_id, config, preprocess, compute_dtype
    source: dict  # Source.describe()
    recipe: str = "none"  # sfcache.recipes name
    token_mask: bool = False  # store targets/mask [N, V, h*w] (True = token holds image content)
    dtype: str = "float16"
    codec: str = "none"
    checksum: bool = False  # CRC32C per step chunk (inspect-cache --check then sees any flipped byte)
    steps_per_shard: int = 32
    selection: str | None = None  # the --episodes pattern, None = all episodes
    reduce: Reduction | None = None  # --reduce pca:...: coefficients stored, targets rebuilt on read
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise StoreError(f"unknown target dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        if self.codec not in CODECS:
            raise StoreError(f"unknown codec {self.codec!r}; expected one of {', '.join(CODECS)}")
        if self.steps_per_shard < 1:
            raise StoreError(f"steps_per_shard must be >= 1, got {self.steps_per_shard}")

    @property
    def num_steps(self) -> int:
        return sum(e.length for e in self.episodes)

    @property
    def num_shards(self) -> int:
        return -(-self.num_steps // self.steps_per_shard)

    def provenance(self) -> Provenance:
        """The provenance a store of this configuration records."""
        return Provenance(
            format_version=FORMAT_VERSION,
            sfcache_version=__version__,
            created=self.created,
            num_steps=self.num_steps,
            steps_per_shard=self.steps_per_shard,
            num_shards=self.num_shards,
            selection=self.selection,
            recipe=self.recipe,
            episodes=tuple(self.episodes),
            vggt=VggtProvenance.from_attrs(self.vggt),
            targets=TargetsProvenance(
                **{name: tuple(getattr(self, name)) for name in ("layers", "grid", "native_grid", "views")},
                **same_fields(self, ("aspect_ratio", "channels", "dtype", "codec")),
                checksum="crc32c" if self.checksum else "none",
                mask="tokens" if self.token_mask else "none",
                int8_block=int8_block(self.channels) if self.dtype == "int8" else None,
                reduce=self._reduce_provenance() if self.reduce else None,
            ),
            source=self.source,
        )

    def attrs(self) -> dict:
        """attrs["sfcache"] as in ARCHITECTURE.md (JSON types only)."""
        return _jsonable(self.provenance().to_attrs())

    def _reduce_provenance(self) -> ReduceProvenance:
        """targets.reduce: the request, and once fitted K, fidelity and bytes per step per layer."""
        asked = ReduceProvenance.from_attrs(self.reduce.request)
        if not self.reduce.fitted:
            return asked
        fidelity = self.reduce.fidelity
        return replace(
            asked,
            k={layer: len(c) for layer, c in self.reduce.components.items()},
            fidelity=None if fidelity is None else {int(layer): Fidelity(**f) for layer, f in fidelity.items()},
            bytes_per_step=reduced_step_bytes(
                self.reduce.components, len(self.views), self.grid[0] * self.grid[1], self.dtype, self.token_mask
            ),
            basis="targets/layer_<L>_mean [C], targets/layer_<L>_basis [K, C] float32",
        )

    def stored_channels(self, layer: int) -> int:
        """Channels of a layer's stored array: C, or K coefficients on a reduced store."""
        return len(self.reduce.components[layer]) if self.reduce else self.channels


def _jsonable(value):
    return json.loads(json.dumps(value))
