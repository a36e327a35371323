"""Reading a target store (`Cache`): one read of zarr.json at open, then rows by episode or flat row index.

Layout (see ARCHITECTURE.md): root attrs["sfcache"] hold the provenance and the episode index,
`targets/layer_<L>` hold [N, V, h*w, C] with one step per inner chunk and `steps_per_shard`
steps per shard file. A shard is read only once its `done` flag is set (`sfcache.store.writer` sets it when the
shard's files match the digests recorded as they were written), so a done shard's bytes can always be checked
against them (`digest_problem`, `open_cache(verify=True)`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import zarr

from sfcache.errors import Field, Message, NotAStore, StoreError, extraction_field
from sfcache.keys import tfds_ids
from sfcache.provenance import Provenance
from sfcache.rows import EpisodeRecord, RowIndex
from sfcache.shard_file import DamagedShard, ShardReader, direct_layout
from sfcache.store.config import Reduction
from sfcache.store.encoding import decode
from sfcache.store.integrity import Integrity
from sfcache.store.layout import (
    DIGESTS_ARRAY,
    DONE_ARRAY,
    MASK_ARRAY,
    READABLE_VERSIONS,
    layer_array,
    per_shard_arrays,
)

__all__ = ["Cache", "read_attrs"]

REPAIR = Message("run `sf extract` again with the same options and ", extraction_field("repair"))


def existing_attrs(path: Path) -> dict | None:
    meta = path / "zarr.json"
    if not meta.exists():
        return None
    try:
        attributes = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError) as err:
        raise StoreError(  # text, not fields: `sf inspect-cache --check` reports it as it reads
            f"{meta}: unreadable Zarr metadata ({err}); the store is damaged and cannot be told "
            f"from other data, so --overwrite will not replace it: delete {path} and run again"
        ) from None
    if not isinstance(attributes, dict):
        raise StoreError(
            f"{meta}: attributes is a {type(attributes).__name__}, expected an object; delete {path} and run again"
        )
    return attributes


def read_attrs(path: str | Path) -> dict:
    """attrs["sfcache"] straight from STORE/zarr.json, not yet validated (for a store that may not open)."""
    path = Path(path)
    if not path.is_dir():
        what = "is a file; a store is a directory" if path.exists() else "does not exist"
        raise NotAStore(f"not an sfcache store: {path}: {what}")
    try:
        attrs = existing_attrs(path)
    except StoreError as error:
        raise NotAStore(f"not an sfcache store: {error}") from None
    if attrs is None:
        raise NotAStore(f"not an sfcache store: {path}: no zarr.json here; run `sf extract` first")
    if "sfcache" not in attrs:
        what = (
            "its creation was interrupted (no provenance in zarr.json); run `sf extract` again to recreate it"
            if "sfcache_creating" in attrs
            else "zarr.json holds no sfcache provenance (a Zarr group of other data?)"
        )
        raise NotAStore(f"not an sfcache store: {path}: {what}")
    if not isinstance(attrs["sfcache"], dict):
        raise StoreError(
            f"{path / 'zarr.json'}: attributes.sfcache is a {type(attrs['sfcache']).__name__}, "
            "expected an object; the store is damaged: delete it and run `sf extract` again"
        )
    return attrs["sfcache"]


class Cache(Integrity):
    """A target store: one read of zarr.json at open, arrays opened on first use, picklable when read-only."""

    direct_reads = True  # False: every read through zarr (the tests and the bench compare both paths)
    verify = False  # True: a shard's files are checked against their recorded digests before its first read

    def __init__(self, path: str | Path, mode: str = "r", complete: bool = False):
        self.path, self.mode = Path(path), mode
        self.attrs: dict = read_attrs(self.path)
        if self.attrs.get("format_version") not in READABLE_VERSIONS:
            raise StoreError(
                f"{self.path}: store format_version {self.attrs.get('format_version')} "
                f"is not supported (this sfcache reads {', '.join(map(str, READABLE_VERSIONS))})"
            )
        Provenance.validate(self.attrs, self.path / "zarr.json", complete)
        self.provenance = provenance = Provenance.from_attrs(self.attrs)
        targets = provenance.targets
        self.layers, self.views, self.grid = targets.layers, targets.views, targets.grid
        self.channels, self.dtype, self.has_mask = targets.channels, targets.dtype, targets.has_mask
        self.recipe = provenance.recipe
        self.num_steps, self.steps_per_shard = provenance.num_steps, provenance.steps_per_shard
        self.num_shards = provenance.num_shards
        self.episodes = [e.key for e in provenance.episodes]
        self._reduction: Reduction | None = None
        self._reset_handles()

    def _reset_handles(self) -> None:
        self._zstore = None
        self._arrays: dict[str, zarr.Array] = {}
        self._readers: dict[str, ShardReader | None] = {}
        self._shard_files: dict[tuple[str, int], Path] = {}
        self._index: RowIndex | None = None
        self._tfds_ids: dict[str, str] | None = None
        self._known_done: set[int] = set()
        self._index_ok = False

    def __getstate__(self):
        if self.mode != "r":
            raise StoreError(f"{self.path}: only a read-only Cache can be sent to another process")
        return {
            k: v
            for k, v in self.__dict__.items()
            if k
            not in (
                "_zstore",
                "_arrays",
                "_readers",
                "_shard_files",
                "_index",
                "_tfds_ids",
                "_known_done",
                "_reduction",
                "_index_ok",
            )
        }

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reduction = None
        self._reset_handles()

    def __repr__(self) -> str:
        return (
            f"Cache({str(self.path)!r}, mode={self.mode!r}, steps={self.num_steps}, layers={self.layers}, "
            f"views={self.views}, grid={self.grid}, dtype={self.dtype!r})"
        )

    # -- reduced stores

    @property
    def reduced(self) -> bool:
        """True for a `--reduce pca:...` store: coefficients on disk, targets rebuilt by `read_rows`."""
        return self.provenance.targets.reduce is not None

    @property
    def reduction(self) -> Reduction | None:
        """The stored bases (read once), or None for a store of full targets."""
        recorded = self.provenance.targets.reduce
        if recorded is None:
            return None
        if self._reduction is None:
            self._reduction = Reduction(
                request=recorded.request,
                means={layer: self._array(layer_array(layer, "_mean"))[...] for layer in self.layers},
                components={layer: self._array(layer_array(layer, "_basis"))[...] for layer in self.layers},
                fidelity=recorded.to_attrs().get("fidelity"),
            )
            for layer, components in self._reduction.components.items():
                if not np.isfinite(components).all() or not np.abs(components).sum(axis=1).all():
                    self._reduction = None  # an orthonormal row is never zero: its chunk is lost (reads as zeros)
                    raise StoreError(
                        f"{self.path}: {layer_array(layer, '_basis')} is damaged (zero or non-finite "
                        "rows); no target can be rebuilt (see `sf inspect-cache --check`)"
                    )
        return self._reduction

    def stored_channels(self, layer: int) -> int:
        """Channels of a layer's stored array: `channels`, or its K coefficients on a reduced store."""
        return int(self.provenance.targets.reduce.k[layer]) if self.reduced else self.channels

    def resolve_layer(self, layer: int | None, name: Field | str = "layer=") -> int:
        """The stored layer to read: None is the only stored one; a negative index counts back from VGGT's depth.
        StoreError naming the stored layers when there is no such (or, for None, no single) layer, and `name`, what
        chooses it (a reader's argument by default; a config field where a config chose it)."""
        if layer is None and len(self.layers) == 1:
            return self.layers[0]
        absolute = None if layer is None else layer + self.provenance.vggt.depth if layer < 0 else layer
        if absolute not in self.layers:
            asked = (
                f"{len(self.layers)} layers are stored, so one must be chosen"
                if layer is None
                else f"layer {layer} is not stored"
            )
            stored = f"stored layers: {list(self.layers)}"
            raise StoreError(Message(f"{self.path}: {asked}; {stored} (choose with ", name, ")"))
        return absolute

    # -- index

    @property
    def index(self) -> RowIndex:
        """The episode index: rows <-> (episode key, step) (checked to tile the rows before first use)."""
        self._check_index()
        if self._index is None:
            self._index = RowIndex(self.provenance.episodes, where=str(self.path))
        return self._index

    def episode(self, key: str) -> EpisodeRecord:
        """The rows of episode `key` (a store key, or an RLDS episode's TFDS id: see `key_for`)."""
        return self.index.record(self.key_for(key))

    def key_for(self, name: str) -> str:
        """The store key of `name`: a key is itself; a TFDS id (`<shard file>__<index>`, what TFDS's
        `ReadConfig(add_tfds_id=True)` yields) maps through the source's recorded shard list."""
        if self._tfds_ids is None:  # only RLDS stores record shards
            self._tfds_ids = tfds_ids(self.provenance.source.get("tfds_shards", []))
        return self._tfds_ids.get(name, name)

    def _check_index(self) -> None:
        if not self._index_ok:
            self.provenance.check_index(self.path / "zarr.json")
            self._index_ok = True

    def shard_rows(self, shard: int) -> slice:
        """Rows [start, stop) of a shard."""
        start = shard * self.steps_per_shard
        return slice(start, min(start + self.steps_per_shard, self.num_steps))

    def done_shards(self, shards: Sequence[int] | None = None) -> np.ndarray:
        """bool per shard (all shards, or the given ones): True where the shard is written and verified."""
        done = self._array(DONE_ARRAY)
        if shards is None:
            return done[: self.num_shards].astype(bool)
        wanted = np.asarray(shards, dtype=np.int64)
        return done.get_orthogonal_selection((wanted,)).astype(bool) if wanted.size else np.zeros(0, bool)

    def missing_episodes(self) -> list[str]:
        """Keys of episodes with at least one row in a shard that is not done."""
        self._check_index()
        done = self.done_shards()
        missing = []
        for key, _, start, length in self.index.records:
            shards = np.arange(start // self.steps_per_shard, -(-(start + length) // self.steps_per_shard))
            if length and not done[shards].all():
                missing.append(key)
        return missing

    # -- reads

    def read(
        self,
        key: str,
        steps: int | slice | Sequence[int] | np.ndarray | None = None,
        layer: int | None = None,
        mask: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """float32 [T, V, h*w, C] for steps of episode `key` (None = all, int = one step, slice, int array);
        with `mask`, also the token mask (see `read_rows`)."""
        record = self.episode(key)
        if steps is None:
            local = np.arange(record.length)
        elif isinstance(steps, slice):
            local = np.arange(record.length)[steps]
        else:
            local = np.atleast_1d(np.asarray(steps))
            if local.dtype.kind not in "iu":
                raise StoreError(f"{self.path}: steps of episode {key!r} must be integers, got {local.dtype}")
            local = np.where(local < 0, local + record.length, local)
            bad = local[(local < 0) | (local >= record.length)]
            if bad.size:
                raise StoreError(
                    f"{self.path}: episode {key!r} has {record.length} steps; step {int(bad[0])} is out of range"
                )
        return self.read_rows(record.start + local, layer=layer, mask=mask)

    def read_rows(
        self,
        rows: Sequence[int] | np.ndarray | slice,
        layer: int | None = None,
        mask: bool = False,
        reconstruct: bool = True,
        decoded: bool = True,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """float32 [T, V, h*w, C] by global row index, in the order asked (repeats allowed).

        With `mask`: (values, bool [T, V, h*w]), True where a token holds image content; all True for
        a store without a mask (every token valid). A reduced store's coefficients are rebuilt into
        targets here, or with `reconstruct=False` returned as float32 [T, V, h*w, K] for
        `reduction.reconstruct` elsewhere (e.g. on the training device). `decoded=False` (float16 stores
        without --reduce): the float16 values as stored, for a loader that converts them where they are
        used (`CachedTargets(device=)`).

        An uncompressed store is read straight from its shard files (`sfcache.shard_file.ShardReader`:
        one preadv per run of rows back to back in a shard, into the result in request order), at many
        times zarr's speed. A compressed one goes through zarr as contiguous runs, each one slice read:
        zarr then fetches only the inner chunks of those rows, where an orthogonal selection is ~10x slower.
        """
        if not decoded and (self.dtype != "float16" or self.reduced):
            raise StoreError(
                Message(
                    f"{self.path}: only float16 stores without ",
                    extraction_field("reduce"),
                    f" are read undecoded; this one is {self.dtype}{' and reduced' if self.reduced else ''}",
                )
            )
        stored, scale, token_mask = self.read_encoded(rows, layer=layer, mask=mask)
        values = decode(stored, self.dtype, scale) if decoded else stored
        if self.reduced and reconstruct:
            values = self.reduction.reconstruct(self.resolve_layer(layer), values)
        return (values, token_mask.astype(bool)) if mask else values

    def read_encoded(
        self,
        rows: Sequence[int] | np.ndarray | slice,
        layer: int | None = None,
        mask: bool = False,
        empty: Callable[[tuple[int, ...], np.dtype], np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Rows as stored, in the order asked: (values [T, V, h*w, C or K] float16 | uint16 bfloat16 bits |
        int8, int8 scales or None, with `mask` the uint8 token mask [T, V, h*w] (all 1 without one) or None).

        The batched loaders' read (`sfcache.torch.CachedTargets.read_stored`): each result is allocated by
        `empty(shape, dtype)` (default `np.empty`), so a loader can have the shard bytes land in shared or
        pinned memory.
        """
        rows = np.arange(self.num_steps)[rows] if isinstance(rows, slice) else np.atleast_1d(np.asarray(rows))
        if rows.size and (rows.dtype.kind not in "iu" or rows.min() < 0 or rows.max() >= self.num_steps):
            raise StoreError(f"{self.path}: rows must be integers in [0, {self.num_steps}), got {rows[:8].tolist()}")
        name = layer_array(self.resolve_layer(layer))
        self._check_index()
        self._require_done(rows)
        stored = self._checked_read(name, rows, empty)
        scale = self._checked_read(f"{name}_scale", rows, empty) if self.dtype == "int8" else None
        if not mask:
            return stored, scale, None
        if not self.has_mask:
            token_mask = (empty or np.empty)(stored.shape[:3], np.dtype(np.uint8))
            token_mask[...] = 1
            return stored, scale, token_mask
        return stored, scale, self._checked_read(MASK_ARRAY, rows, empty)

    def _checked_read(self, name: str, rows: np.ndarray, empty=None) -> np.ndarray:
        """`_read`, with a damaged shard file (bad checksum, truncated, unreadable) named in one StoreError."""
        try:
            return self._read(name, rows, empty)
        except StoreError:
            raise
        except Exception as err:  # zarr and its codecs raise many types for damaged bytes
            raise self._damaged(name, np.unique(rows // self.steps_per_shard).tolist(), err) from None

    def _damaged(self, name: str, shards: list[int], err: Exception) -> StoreError:
        files = ", ".join(str(self.shard_file(name, shard)) for shard in shards)
        return StoreError(
            Message(
                f"{files}: reading {name} shard(s) {shards} failed ({type(err).__name__}: {err}); ",
                "the file is damaged: ",
                REPAIR,
            )
        )

    def _read(self, name: str, rows: np.ndarray, empty=None) -> np.ndarray:
        """Rows of array `name` as stored, in request order, in a buffer from `empty(shape, dtype)`: from the
        shard files themselves where `direct_layout` allows (uncompressed), else through zarr."""
        reader = self._reader(name) if self.direct_reads else None
        if reader is not None:
            out = (empty or np.empty)((rows.size, *reader.row_shape), reader.dtype)
            return self._read_direct(name, reader, rows, out)
        values = self._read_zarr(name, rows)
        if empty is None:
            return values
        out = empty(values.shape, values.dtype)
        out[...] = values
        return out

    def _reader(self, name: str) -> ShardReader | None:
        if name not in self._readers:
            array = self._array(name)
            checksum = direct_layout(array)
            self._readers[name] = (
                None
                if checksum is None
                else ShardReader(array.shards[0], array.shape[1:], array.dtype, checksum, array.fill_value)
            )
        return self._readers[name]

    def _read_direct(self, name: str, reader: ShardReader, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Each shard's asked chunks read into their rows of `out`; a repeated row is read once, then copied."""
        unique, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
        shards = unique // self.steps_per_shard
        for group in np.split(np.arange(unique.size), np.flatnonzero(np.diff(shards)) + 1) if unique.size else ():
            shard = int(shards[group[0]])
            file = self.shard_file(name, shard)
            try:
                reader.read(file, unique[group] - shard * self.steps_per_shard, out, first[group])
            except FileNotFoundError:
                raise self._missing_file_error(file, shard) from None
            except (DamagedShard, OSError) as err:
                raise self._damaged(name, [shard], err) from None
        inverse = inverse.reshape(-1)
        repeats = np.flatnonzero(first[inverse] != np.arange(rows.size))
        out[repeats] = out[first[inverse[repeats]]]
        return out.astype(self._array(name).dtype, copy=False)

    def _read_zarr(self, name: str, rows: np.ndarray) -> np.ndarray:
        """The slice reads of `rows`' contiguous runs, concatenated, then put back in request order."""
        array = self._array(name)
        runs, order = _contiguous_runs(rows)
        if not runs:
            return array[0:0]
        parts = [array[run] for run in runs]
        values = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return values if order is None else values[order]

    def _require_done(self, rows: np.ndarray) -> None:
        shards = set(np.unique(rows // self.steps_per_shard).tolist()) - self._known_done
        if not shards:
            return
        wanted = np.array(sorted(shards))
        done = self._array(DONE_ARRAY).get_orthogonal_selection((wanted,)).astype(bool)
        if not done.all():
            shard = int(wanted[~done][0])
            row = int(rows[rows // self.steps_per_shard == shard][0])
            key, step = self.index.locate(row)
            raise StoreError(
                f"{self.path}: episode {key!r} step {step} (row {row}) is in shard {shard}, "
                "which is not extracted yet; run `sf extract` again with the same options to finish it"
            )
        for shard in wanted.tolist():
            file = self._missing_file(shard)
            if file is not None:
                raise self._missing_file_error(file, shard)
            problem = self.digest_problem(shard) if self.verify else None
            if problem:
                raise StoreError(Message(f"{problem}; ", REPAIR))
        self._known_done.update(shards)

    @staticmethod
    def _missing_file_error(file: Path, shard: int) -> StoreError:
        return StoreError(
            f"{file}: shard {shard} is marked done but this file is missing; run `sf extract` "
            "again with the same options to redo it"
        )

    def _open(self, name: str) -> zarr.Array:
        """Array `name` as it is on disk; StoreError if it is missing or its metadata unreadable."""
        if self._zstore is None:
            self._zstore = zarr.storage.LocalStore(self.path, read_only=self.mode == "r")
        try:
            return zarr.open_array(self._zstore, path=name, mode=self.mode, zarr_format=3)
        except FileNotFoundError:
            raise StoreError(f"{self.path}: array {name!r} is missing; the store is damaged") from None
        except Exception as err:  # a damaged array zarr.json: zarr raises many types
            raise StoreError(
                f"{self.path / name / 'zarr.json'}: unreadable array metadata "
                f"({type(err).__name__}: {err}); the store is damaged"
            ) from None

    def _array(self, name: str) -> zarr.Array:
        """`_open`, once, checked to hold every row the index needs."""
        if name not in self._arrays:
            array = self._open(name)
            rows = (
                self.num_shards
                if name in (DONE_ARRAY, DIGESTS_ARRAY)
                else self.num_steps
                if name in self._target_arrays()
                else 0
            )
            if array.shape[0] < rows:  # arrays of rows (not a --reduce basis) must hold every row of the index
                raise StoreError(
                    f"{self.path / name / 'zarr.json'}: array {name!r} has {array.shape[0]} rows, but "
                    f"zarr.json's index needs {rows}; the store is damaged"
                )
            self._arrays[name] = array
        return self._arrays[name]

    def shard_file(self, name: str, shard: int) -> Path:
        """The file holding shard `shard` of array `name` (every array has steps_per_shard rows per shard;
        shard 0 of a --reduce mean or basis is its one chunk)."""
        file = self._shard_files.get((name, shard))
        if file is None:  # a loader asks for the same files batch after batch
            array = self._array(name)
            key = array.metadata.encode_chunk_key((shard,) + (0,) * (array.ndim - 1))
            file = self._shard_files[(name, shard)] = self.path / name / key
        return file

    def shard_arrays(self) -> dict[int | str, list[str]]:
        """{layer: its arrays stored shard by shard (values, int8 scales), MASK_ARRAY: [MASK_ARRAY] if stored}:
        a shard's data is whole only when each of these files is."""
        return per_shard_arrays(self.layers, self.dtype, self.has_mask)

    def _target_arrays(self) -> list[str]:
        return [name for names in self.shard_arrays().values() for name in names]


def _contiguous_runs(rows: np.ndarray) -> tuple[list[slice], np.ndarray | None]:
    """Sorted unique `rows` as ascending slices, and the gather index that restores the request
    order (None when the rows already are sorted and unique)."""
    unique, inverse = np.unique(rows, return_inverse=True)
    breaks = np.flatnonzero(np.diff(unique) != 1) + 1
    starts, stops = np.r_[0, breaks], np.r_[breaks, unique.size]
    runs = [slice(int(unique[a]), int(unique[b - 1]) + 1) for a, b in zip(starts, stops) if b > a]
    return runs, None if unique.size == rows.size and (unique == rows).all() else inverse.reshape(-1)
