"""A store's provenance, attrs["sfcache"] (ARCHITECTURE.md "Store layout"), as typed records that own its schema.

Read once from zarr.json by `Cache` (`cache.provenance`) and written by `StoreConfig`; dicts exist only at the
JSON edge (`from_attrs`, `to_attrs`). Each field declares once what it is (`declared`): identity (a resume must
match it: `differences`), required (every complete `sf extract` records it) or informational, and what a valid
value looks like, so that each record validates itself (`validate`: one StoreError naming the bad field). Fields
a version-1 store lacks read as their documented defaults (recipe "none", mask "none", checksum "none").
`source` stays `Source.describe()`'s dict: it is format-specific.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from sfcache import errors
from sfcache.errors import StoreError
from sfcache.options import IDENTITY
from sfcache.rows import EpisodeRecord

__all__ = [
    "DATASET",
    "DTYPES",
    "Fidelity",
    "Provenance",
    "ReduceProvenance",
    "TargetsProvenance",
    "VggtProvenance",
    "dataset_differences",
    "differences",
    "identity_fields",
    "declared",
]

DTYPES = ("float16", "bfloat16", "int8")  # what `targets.dtype` may be (sfcache.store.encoding encodes each)
DATASET = ("format", "variant", "rotate", "fingerprint")  # Source.describe() keys that say which data it is
SOURCE_LOCATION = ("path", "tfds_shards")  # where the data is, not what: a moved dataset is the same
ABSENT = object()  # a field zarr.json lacks (told apart from a JSON null)

# field metadata keys (besides options.IDENTITY)
REQUIRED, CHECK, RECORD, EXCEPT_KEYS, REQUIRED_KEYS, SHOWN_AS = (
    f"sfcache.{name}" for name in ("required", "check", "record", "except_keys", "required_keys", "shown_as")
)


def declared(
    default=MISSING,
    *,
    identity: bool = False,
    required: bool = False,
    valid: Callable[[object], bool] | None = None,
    expected: str = "",
    record: type | None = None,
    default_factory=MISSING,
    **more,
):
    """A provenance field and what it is: `identity` (a resume must match it; `differences`), `required` (every
    complete `sf extract` records it), otherwise informational; `valid(value from zarr.json, ABSENT if none)`
    with the `expected` text a StoreError names; `record`: the nested record type. `more`: EXCEPT_KEYS (a
    mapping compared key by key but these), REQUIRED_KEYS, SHOWN_AS (how `differences` shows a long value)."""
    metadata = {IDENTITY: identity, REQUIRED: required, CHECK: (valid, expected) if valid else None, RECORD: record}
    return field(default=default, default_factory=default_factory, metadata={**metadata, **more})


def _is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_grid(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_int(x, 1) for x in value)


def _text_or_null(value) -> bool:
    return value is ABSENT or isinstance(value, (str, type(None)))


def _layer_keys(value, item: Callable[[object], bool]) -> bool:
    return value in (None, ABSENT) or (
        isinstance(value, dict) and all(k.lstrip("-").isdigit() and item(v) for k, v in value.items())
    )


def _damaged(where: Path, key: str, expected: str, value) -> StoreError:
    """One line for a hand-damaged zarr.json: the attribute, what it holds and what was expected."""
    held = "missing" if value is ABSENT else json.dumps(value)[:80]
    return StoreError(
        f"{where}: attributes.sfcache.{key} is {held}, expected {expected}; "
        "the store is damaged: delete it and run `sf extract` again"
    )


class _Record:
    """What every provenance record does with its declared fields."""

    @classmethod
    def validate(cls, attrs: Mapping, where: Path, complete: bool = False, prefix: str = "") -> None:
        """StoreError naming the first field of `attrs` (this record's part of zarr.json, read from `where`) that
        is not as declared, so that `from_attrs` and the readers never meet a wrong type; `complete` also
        requires every required field (stores written by tests and benchmarks may omit `source`)."""
        for spec in fields(cls):
            key, value = prefix + spec.name, attrs.get(spec.name, ABSENT)
            valid, expected = spec.metadata.get(CHECK) or (None, "")
            if valid is not None and not valid(value):
                raise _damaged(where, key, expected, value)
            nested = spec.metadata.get(RECORD)
            lacking = complete and value is ABSENT and spec.default is not None  # an optional record may be absent
            if nested is not None and (isinstance(value, Mapping) or lacking):
                nested.validate(value if isinstance(value, Mapping) else {}, where, complete, key + ".")
            if not complete:
                continue
            if spec.metadata.get(REQUIRED) and value is ABSENT:
                raise _damaged(where, key, "present (every complete `sf extract` records it)", ABSENT)
            for name in spec.metadata.get(REQUIRED_KEYS, ()):
                if name not in (value if isinstance(value, Mapping) else {}):
                    raise _damaged(where, f"{key}.{name}", "present (every complete `sf extract` records it)", ABSENT)


def identity_fields(record: type, prefix: str = "") -> list[str]:
    """The dotted names of the fields of `record` (a provenance record or a config) declared identity, in
    declaration order, nested records walked."""
    names = []
    for spec in fields(record):
        nested = spec.metadata.get(RECORD)
        if nested is not None:
            names += identity_fields(nested, f"{prefix}{spec.name}.")
        elif spec.metadata.get(IDENTITY):
            names.append(prefix + spec.name)
    return names


def differences(recorded: Mapping, asked: Mapping, record: type | None = None) -> dict[str, tuple[object, object]]:
    """{field: (recorded, asked)} for each identity field of `record` whose values differ: what a resume must
    match, for `ConfigMismatch` or `ResumeMismatch`. With the default `Provenance`, two attrs["sfcache"] whose
    version-1 fields hold their defaults (`Provenance.from_attrs(attrs).to_attrs()`)."""
    record = record or Provenance
    diff: dict[str, tuple[object, object]] = {}
    for name in identity_fields(record):
        spec = _field(record, name)
        if EXCEPT_KEYS in spec.metadata:  # a mapping, compared key by key
            keys = set(_at(recorded, name) or {}) | set(_at(asked, name) or {})
            shown = sorted(f"{name}.{k}" for k in keys if k not in spec.metadata[EXCEPT_KEYS])
            diff.update(errors.differences(recorded, asked, shown))
        elif SHOWN_AS in spec.metadata:
            old, new = _at(recorded, name), _at(asked, name)
            if old != new:
                diff[name] = (spec.metadata[SHOWN_AS](old or []), spec.metadata[SHOWN_AS](new or []))
        else:
            diff.update(errors.differences(recorded, asked, [name]))
    return diff


def dataset_differences(recorded: Mapping, asked: Mapping) -> dict[str, tuple[object, object]]:
    """{"source.<key>": (recorded, asked)} for each DATASET key of two `Source.describe()` dicts that differs: "same
    dataset?". The path counts only when the fingerprint differs too: a moved copy is the same data."""
    wrapped = {"source": recorded}, {"source": asked}
    diff = errors.differences(*wrapped, [f"source.{key}" for key in DATASET])
    if "source.fingerprint" in diff:
        diff.update(errors.differences(*wrapped, ["source.path"]))
    return diff


def _field(record: type, dotted: str):
    *parents, last = dotted.split(".")
    for part in parents:
        record = next(spec for spec in fields(record) if spec.name == part).metadata[RECORD]
    return next(spec for spec in fields(record) if spec.name == last)


def _at(node, dotted: str):
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def _episodes_summary(episodes: Iterable) -> str:
    episodes = list(episodes)
    return f"{len(episodes)} episodes, {sum(e[3] for e in episodes)} steps"


_TEXT = {"valid": _text_or_null, "expected": "a string or null"}


@dataclass(frozen=True)
class VggtProvenance(_Record):
    """The model that made the targets: weights as asked, their id (sha256 or random preset+seed), architecture,
    preprocessing mode and compute dtype."""

    weights: str | None = declared(None, required=True, **_TEXT)  # as asked: a moved checkpoint is the same model
    weights_id: str | None = declared(None, identity=True, required=True, **_TEXT)
    config: Mapping = declared(  # VGGTConfig fields
        identity=True,
        required=True,
        default_factory=dict,
        valid=lambda v: v is ABSENT or isinstance(v or {}, dict),
        expected="an object of VGGTConfig fields",
    )
    compute_dtype: str | None = declared(None, identity=True, required=True, **_TEXT)
    preprocess: str | None = declared(None, identity=True, required=True, **_TEXT)

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
class Fidelity(_Record):
    """Held-out per-token cosine of a reduced layer through the stored dtype, with its K."""

    k: int
    mean: float
    p1: float
    worst: float

    def to_attrs(self) -> dict:
        return {"k": self.k, "mean": self.mean, "p1": self.p1, "worst": self.worst}


_COUNT = {"valid": _is_int, "expected": "an integer >= 0"}
_STRING = {"valid": lambda v: isinstance(v, str), "expected": "a string"}


@dataclass(frozen=True)
class ReduceProvenance(_Record):
    """`--reduce pca:...`: the request (the store's identity) and, once fitted, K, fidelity and size per layer."""

    method: str = declared(**_STRING)  # part of the request, but not compared: "asked" names the method
    asked: str = declared(identity=True, **_STRING)
    min_cosine: float | None = declared(
        identity=True,
        valid=lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)),
        expected="null or a number",
    )
    sample_steps: int = declared(identity=True, **_COUNT)
    held_out_steps: int = declared(identity=True, **_COUNT)
    k: Mapping[int, int] | None = declared(
        None, valid=lambda v: _layer_keys(v, lambda n: _is_int(n, 1)), expected="null or {layer: K}"
    )
    fidelity: Mapping[int, Fidelity] | None = declared(
        None,
        valid=lambda v: _layer_keys(v, lambda f: isinstance(f, dict) and set(f) == {"k", "mean", "p1", "worst"}),
        expected="null or {layer: {k, mean, p1, worst}}",
    )
    bytes_per_step: int | None = None
    basis: str | None = None  # where the bases are stored (a note for readers of zarr.json)

    @property
    def request(self) -> dict:
        """What was asked (the method, then the identity fields), as `store.Reduction.request` holds it."""
        return {"method": self.method, **{name: getattr(self, name) for name in identity_fields(ReduceProvenance)}}

    @classmethod
    def from_attrs(cls, attrs: Mapping | None) -> ReduceProvenance | None:
        if attrs is None:
            return None
        fidelity = attrs.get("fidelity")
        return cls(
            *(attrs.get(name) for name in ("method", "asked", "min_cosine", "sample_steps", "held_out_steps")),
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
class TargetsProvenance(_Record):
    """What the stored targets are: layers (absolute indices), grid, views (VGGT order), width and encoding."""

    layers: tuple[int, ...] = declared(
        identity=True,
        required=True,
        valid=lambda v: isinstance(v, list) and bool(v) and all(map(_is_int, v)),
        expected="a non-empty list of layer indices",
    )
    grid: tuple[int, int] = declared(
        identity=True, required=True, valid=_is_grid, expected="[height, width] of positive integers"
    )
    views: tuple[str, ...] = declared(
        identity=True,
        required=True,
        valid=lambda v: isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v),
        expected="a non-empty list of view names",
    )
    channels: int = declared(identity=True, required=True, valid=lambda v: _is_int(v, 1), expected="a positive integer")
    dtype: str = declared(
        identity=True, required=True, valid=lambda v: v in DTYPES, expected=f"one of {', '.join(DTYPES)}"
    )
    codec: str = declared("none", identity=True, required=True)
    native_grid: tuple[int, int] | None = declared(  # VGGT's patch grid before pooling
        None,
        valid=lambda v: v in (None, ABSENT) or _is_grid(v),
        expected="null or [height, width] of positive integers",
    )
    aspect_ratio: float | None = None  # preprocessed image width / height
    checksum: str = declared("none", identity=True)  # "none" | "crc32c"
    position_embedding: str = "not baked in"
    mask: str = declared("none", identity=True)  # "none" | "tokens" (absent in version 1: "none")
    int8_block: int | None = None  # int8 stores: channels per scale
    reduce: ReduceProvenance | None = declared(
        None,
        record=ReduceProvenance,
        valid=lambda v: v in (None, ABSENT) or isinstance(v, dict),
        expected="null or an object (method, asked, min_cosine, sample_steps, held_out_steps)",
    )

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


def _is_episode(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 4
        and all(isinstance(x, str) for x in value[:2])
        and all(_is_int(x) for x in value[2:])
    )


def _at_least(low: int) -> dict:
    return {"valid": lambda v: _is_int(v, low), "expected": f"an integer >= {low}"}


@dataclass(frozen=True, kw_only=True)
class Provenance(_Record):
    """attrs["sfcache"]: how a store was made, its shards and its episode index."""

    format_version: int = declared(identity=True, required=True)  # checked against the readable versions by Cache
    sfcache_version: str | None = declared(required=True)
    created: str | None = declared(required=True)
    num_steps: int = declared(required=True, **_at_least(0))
    steps_per_shard: int = declared(identity=True, required=True, **_at_least(1))
    num_shards: int = declared(required=True, **_at_least(0))
    selection: str | None = declared(None, identity=True)  # the --episodes pattern
    recipe: str = declared("none", identity=True)  # absent in version 1: "none"
    episodes: tuple[EpisodeRecord, ...] = declared(
        identity=True,
        required=True,
        valid=lambda v: isinstance(v, list) and all(map(_is_episode, v)),
        expected="a list of [key, instruction, start, length]",
        **{SHOWN_AS: _episodes_summary},
    )
    vggt: VggtProvenance = declared(
        record=VggtProvenance,
        valid=lambda v: v is ABSENT or isinstance(v, dict),
        expected="an object (weights, weights_id, config, preprocess, compute_dtype)",
    )
    targets: TargetsProvenance = declared(
        record=TargetsProvenance, valid=lambda v: isinstance(v, dict), expected="an object"
    )
    source: Mapping = declared(  # Source.describe()
        identity=True,
        valid=lambda v: v is ABSENT or isinstance(v, dict),
        expected="an object (the source's describe())",
        **{EXCEPT_KEYS: SOURCE_LOCATION, REQUIRED_KEYS: ("format", "path", "views", "rotate")},
    )

    @classmethod
    def validate(cls, attrs: Mapping, where: Path, complete: bool = False, prefix: str = "") -> None:
        """`_Record.validate`, then the entry of the episode that is not [key, instruction, start, length]."""
        episodes = attrs.get("episodes")
        for index, episode in enumerate(episodes if isinstance(episodes, list) else []):
            if not _is_episode(episode):
                raise _damaged(where, f"episodes[{index}]", "[key, instruction, start, length]", episode)
        super().validate(attrs, where, complete, prefix)

    def index_problems(self) -> list[tuple[str, str]]:
        """Every way the episode index fails to tile rows [0, num_steps) back to back in num_shards shards, as
        (attribute, what is wrong): the one packing rule, raised by `check_index`, listed whole by the inspector."""
        problems, row, keys = [], 0, set()
        for index, (key, _, start, length) in enumerate(self.episodes):
            if key in keys:
                problems.append((f"episodes[{index}]", f"episode {key} is listed twice in the index"))
            keys.add(key)
            if start != row:
                problems.append(
                    (
                        f"episodes[{index}]",
                        f"episode {key} starts at row {start}, expected {row} (rows must be contiguous)",
                    )
                )
            row = start + length
        if row != self.num_steps:
            problems.append(("num_steps", f"episodes add up to {row} rows, num_steps says {self.num_steps}"))
        shards = -(-self.num_steps // self.steps_per_shard)
        if self.num_shards != shards:
            problems.append(
                (
                    "num_shards",
                    f"{self.num_shards}, expected {shards} ({self.num_steps} steps / {self.steps_per_shard} per shard)",
                )
            )
        return problems

    def check_index(self, where: Path) -> None:
        """StoreError naming the first of `index_problems` (checked before the first read)."""
        for attribute, problem in self.index_problems()[:1]:
            raise StoreError(
                f"{where}: attributes.sfcache.{attribute}: {problem}; the store is damaged: delete it and run "
                "`sf extract` again"
            )

    @classmethod
    def from_attrs(cls, attrs: Mapping) -> Provenance:
        """From a validated attrs["sfcache"] (`validate`)."""
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
