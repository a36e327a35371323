"""Writing a target store (`StoreWriter`): created or resumed for a configuration, then written shard by shard.

A writer records each shard file's size and CRC32C in `digests[shard]` once the data is written and fsynced;
`done[shard]` is set when the digests are confirmed (by the extraction client, reading the files back from its own
view of the file system), so a done shard's bytes can always be checked against them and a file moved or copied
from another shard position does not match. A shard file is replaced atomically (by sfcache.shard_file or zarr's
LocalStore), so a killed writer leaves either the old shard or the new one, never a torn one; shard files are
fsynced before their digests and flag are written, so even a power loss cannot leave a flag without its data.
Resuming redoes every shard whose flag is unset (one whose files still match its recorded digests is confirmed,
not recomputed).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import zarr

from sfcache.errors import ConfigMismatch, Message, StoreError, extraction_field
from sfcache.provenance import Provenance, differences
from sfcache.shard_file import direct_layout, write_shard_file
from sfcache.store.cache import Cache, existing_attrs
from sfcache.store.config import Reduction, StoreConfig
from sfcache.store.encoding import STORED_DTYPE, Encoded, encode
from sfcache.store.layout import (
    DIGESTS_ARRAY,
    DONE_ARRAY,
    ERROR_LOG,
    MASK_ARRAY,
    NO_FILE,
    create_arrays,
    create_digests,
    layer_array,
)
from sfcache.store.run_control import LOCK_NAME, OUT, RUN_NAME, run_fence

__all__ = ["StoreWriter", "create", "create_store", "resumable_reduction", "resume"]

OVERWRITE = extraction_field("overwrite")
KEPT = (LOCK_NAME, RUN_NAME, ERROR_LOG)  # what clearing a store to overwrite it keeps (lock and run: held by flock)


def create_store(path: str | Path, config: StoreConfig, overwrite: bool = False) -> StoreWriter:
    """`resume` the store at `path` if there is one (and not `overwrite`), else `create` it."""
    existing = _existing(Path(path))
    if existing is not None and "sfcache" in existing and not overwrite:
        return resume(path, config)
    return create(path, config, overwrite)


def create(path: str | Path, config: StoreConfig, overwrite: bool = False) -> StoreWriter:
    """Create an empty store for `config`; an existing store is cleared first only with `overwrite` (one whose
    creation was interrupted always: the provenance is written last, so it is recognised as ours).

    The caller must hold `lock_store(path)`. A folder of other data raises StoreError and is left alone, as is an
    existing store without `overwrite`; a file system error (read-only, full) raises StoreError.
    """
    path = Path(path)
    with _writable(path):
        existing = _existing(path)
        if existing is not None and "sfcache" in existing and not overwrite:
            raise StoreError(Message(f"{path}: already holds a store; resume it, or create it again with ", OVERWRITE))
        if existing is not None or _has_foreign_files(path):
            if existing is None or not ({"sfcache", "sfcache_creating"} & set(existing)):
                raise StoreError(
                    Message(
                        f"{path}: exists and is not an sfcache store; refusing to replace it (choose another ",
                        OUT,
                        " or delete it yourself)",
                    )
                )
            _clear(path)
        if config.reduce and not config.reduce.fitted:
            raise StoreError(
                Message(
                    f"{path}: ",
                    extraction_field("reduce"),
                    f" {config.reduce.request.get('asked')} needs its fitted basis to create the store",
                )
            )
        root = zarr.create_group(store=str(path), zarr_format=3, attributes={"sfcache_creating": True})
        create_arrays(root, config)
        root.attrs.put({"sfcache": config.attrs()})
        return StoreWriter(path)


def resume(path: str | Path, config: StoreConfig) -> StoreWriter:
    """Reopen the store at `path`, made with the same configuration, to write its remaining shards.

    The caller must hold `lock_store(path)`. A store made differently raises ConfigMismatch listing each differing
    field (`provenance.differences`); no store there, or a file system error, raises StoreError.
    """
    path = Path(path)
    with _writable(path):
        _check_resumes(path, config)
        _remove_partial_writes(path)
        writer = StoreWriter(path)
        if not writer.has_digests:  # a store written before digests were recorded: its new shards get them
            root = zarr.open_group(str(path), mode="r+", zarr_format=3)
            create_digests(root, writer.num_shards, writer.shard_arrays())
        return writer


def resumable_reduction(path: str | Path, config: StoreConfig, overwrite: bool = False) -> Reduction | None:
    """The fitted basis of the store at `path` if a run of `config` resumes it, so it is reused, never refitted;
    None when there is no such store (or `overwrite`). A store made differently raises ConfigMismatch now,
    before any fit is computed."""
    path = Path(path)
    existing = _existing(path) if path.is_dir() else None
    if overwrite or existing is None or "sfcache" not in existing:
        return None
    _check_resumes(path, config)
    return Cache(path).reduction


def _check_resumes(path: Path, config: StoreConfig) -> None:
    """ConfigMismatch unless the store at `path` was made as `config` asks (version-1 fields as their defaults)."""
    stored = (_existing(path) or {}).get("sfcache")
    if stored is None:
        raise StoreError(f"{path}: holds no store to resume; create it")
    Provenance.validate(stored, path / "zarr.json")
    diff = differences(Provenance.from_attrs(stored).to_attrs(), config.attrs())
    if diff:
        raise ConfigMismatch(path, diff)


@contextmanager
def _writable(path: Path) -> Iterator[None]:
    """An OSError while creating or reopening a store, as one StoreError."""
    try:
        yield
    except OSError as err:
        raise StoreError(
            Message(
                f"{path}: creating the store failed ({err}); make ",
                OUT,
                " writable and run again (a half-created store is recreated)",
            )
        ) from None


def _existing(path: Path) -> dict | None:
    return existing_attrs(path) if path.is_dir() else None


def _has_foreign_files(path: Path) -> bool:
    return path.exists() and any(p.name not in KEPT for p in path.iterdir())


def _clear(path: Path) -> None:
    """Delete a store's contents, keeping the lock and run marker (their flocks live on their inodes)."""
    for entry in path.iterdir():
        if entry.name in KEPT:
            continue
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def _remove_partial_writes(path: Path) -> None:
    """Drop temporary files of writers that were killed mid-write (zarr writes `*.partial`, then renames)."""
    for leftover in path.rglob("*.partial"):
        leftover.unlink(missing_ok=True)


class StoreWriter(Cache):
    """A store opened for writing ("r+"): its shards, their digests and done flags (extraction and repair)."""

    def __init__(self, path: str | Path):
        super().__init__(path, mode="r+")

    def write_shard(
        self,
        shard: int,
        targets: Mapping[int, np.ndarray | Encoded],
        mask: np.ndarray | None = None,
        run: str | None = None,
        done: bool = True,
    ) -> dict[str, list[int] | None]:
        """Encode and write every layer of one shard (and its token mask), fsync it, record its files' digests,
        then mark it done (with `done=False`, an extraction task's write: its client marks it done once it has
        read the files back and found the digests). Returns the digests (`shard_digests`).

        `targets[layer]` is float32 [rows in shard, V, h*w, C], or that already encoded as
        (stored, int8 scales or None) in this store's dtype (`sfcache.device.encode_on_device` casts on
        the model's device); `mask` bool [rows, V, h*w], given exactly when the store has one. An OSError
        (disk full, read-only file system) becomes a StoreError; the done flag is only set after every
        array is written and on disk. With `run` (an extraction task), nothing is written unless `run` is
        the store's current run (RunSuperseded otherwise), and no new run can start until this write has ended.
        """
        with run_fence(self.path, run, f"shard {shard}") if run is not None else nullcontext():
            return self._write_shard(shard, targets, mask, done)

    def _write_shard(
        self, shard: int, targets: Mapping[int, np.ndarray | Encoded], mask: np.ndarray | None, done: bool
    ) -> dict[str, list[int] | None]:
        rows = self.shard_rows(shard)
        expected = (rows.stop - rows.start, len(self.views), self.grid[0] * self.grid[1], self.channels)
        if set(targets) != set(self.layers):
            raise StoreError(f"{self.path}: shard {shard} got layers {sorted(targets)}, store has {list(self.layers)}")
        if (mask is not None) != self.has_mask or (mask is not None and tuple(mask.shape) != expected[:3]):
            raise StoreError(
                f"{self.path}: shard {shard} got mask {None if mask is None else tuple(mask.shape)}, "
                f"expected {expected[:3] if self.has_mask else 'none'}"
            )
        written: dict[str, list[int] | None] = {}  # array -> digest of its file, as written
        try:
            for layer, values in targets.items():
                shape = tuple((values[0] if isinstance(values, tuple) else values).shape)
                if shape != expected:
                    raise StoreError(f"{self.path}: shard {shard} layer {layer} has shape {shape}, expected {expected}")
                if isinstance(values, tuple):  # encoded on the model's device
                    stored, scale = values
                    if stored.dtype != np.dtype(STORED_DTYPE[self.dtype]):
                        raise StoreError(
                            f"{self.path}: shard {shard} layer {layer} is stored as {stored.dtype}, "
                            f"expected {STORED_DTYPE[self.dtype]} (a {self.dtype} store)"
                        )
                else:
                    stored, scale = encode(
                        self.reduction.project(layer, values) if self.reduced else values, self.dtype
                    )
                written[layer_array(layer)] = self._write_synced(layer_array(layer), rows, stored)
                if scale is not None:
                    written[layer_array(layer, "_scale")] = self._write_synced(
                        layer_array(layer, "_scale"), rows, scale
                    )
            if mask is not None:
                written[MASK_ARRAY] = self._write_synced(MASK_ARRAY, rows, mask.astype(np.uint8))
            digests = self.shard_digests(shard, written)
            self._record_digests(shard, digests)
            if done:
                self._array(DONE_ARRAY)[shard] = 1
            return digests
        except OSError as err:
            raise StoreError(
                f"{self.path}: writing shard {shard} (rows {rows.start}-{rows.stop - 1}) failed: "
                f"{err}; the shard stays not done"
            ) from err

    def _write_synced(self, name: str, rows: slice, stored: np.ndarray) -> list[int] | None:
        """Write, then flush the shard file and its directory to disk, so a done flag never outlives its data;
        returns the file's [size, CRC32C] when written directly (None: through zarr, digest it from the file).

        Nothing is read back: before or after the fsync a read is served from the page cache, so it
        would compare memory with itself, not with the disk. Bytes that rot on disk are caught by the
        recorded digests (`--check`, `--repair`, `verify=True` reads) and on every read by `--checksum`'s
        CRC32C per step (and the shard index's own CRC32C).
        """
        digest = None
        array = self._array(name)
        shard_file = self.shard_file(name, rows.start // self.steps_per_shard)
        checksum = direct_layout(array)
        if checksum is None:  # compressed: through zarr's codecs
            array[rows] = stored
        else:  # uncompressed: the shard file itself, at plain-write speed
            digest = list(write_shard_file(shard_file, stored, self.steps_per_shard, checksum))
        if shard_file.exists():  # an all-zero shard is stored as no file at all
            for target in (shard_file, shard_file.parent):  # the data, then the rename that published it
                descriptor = os.open(target, os.O_RDONLY)
                try:
                    os.fsync(descriptor)
                finally:
                    os.close(descriptor)
        return digest

    def mark_done(self, shards: Sequence[int]) -> None:
        """Set the done flags of `shards`, whose files the caller has just checked against their digests."""
        done = self._array(DONE_ARRAY)
        try:
            for shard in shards:
                done[int(shard)] = 1
        except OSError as err:
            raise StoreError(
                Message(f"{self.path}: cannot mark shards {list(shards)} done ({err}); ", OUT, " must be writable")
            ) from None

    def _record_digests(self, shard: int, digests: Mapping[str, list[int] | None]) -> None:
        """Write `shard_digests(shard)` into the digests array (a store without one, written before, gets none)."""
        if not self.has_digests:
            return
        self._array(DIGESTS_ARRAY)[shard] = np.array(
            [[NO_FILE, 0] if digest is None else digest for digest in digests.values()], dtype=np.uint64
        )

    def mark_not_done(self, shards: Sequence[int]) -> None:
        """Clear the done flags of `shards`, then delete their target files (damaged ones cannot even be
        overwritten: zarr reads a shard's index before replacing it), so `sf extract` redoes them afresh."""
        done = self._array(DONE_ARRAY)
        try:
            for shard in shards:
                done[int(shard)] = 0
                if self.has_digests:  # a stale record must not vouch for a file written later
                    self._array(DIGESTS_ARRAY)[int(shard)] = 0
            for shard in shards:
                for name in self._target_arrays():
                    self.shard_file(name, int(shard)).unlink(missing_ok=True)
        except OSError as err:
            raise StoreError(
                Message(
                    f"{self.path}: cannot reset shards {list(shards)} for redoing ({err}); ", OUT, " must be writable"
                )
            ) from None
        self._known_done.difference_update(int(s) for s in shards)
