"""The Zarr v3 target store: pooled VGGT targets keyed by flat step rows, written shard by shard.

Layout (see ARCHITECTURE.md): root attrs["sfcache"] hold the provenance and the episode index,
`targets/layer_<L>` hold [N, V, h*w, C] with one step per inner chunk and `steps_per_shard`
steps per shard file. A writer records each shard file's size and CRC32C in `digests[shard]` once the data is
written and fsynced; `done[shard]` is set when the digests are confirmed (by the extraction client, reading the
files back from its own view of the file system), so a done shard's bytes can always be checked against them
and a file moved or copied from another shard position does not match. A shard file is replaced atomically
(by sfcache.shard_file or zarr's LocalStore), so a killed writer leaves either the old shard or the new one, never
a torn one; shard files are fsynced before their digests and flag are written, so even a power loss cannot leave a
flag without its data. Resuming redoes every shard whose flag is unset (one whose files still match its recorded
digests is confirmed, not recomputed).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from sfcache.errors import ConfigMismatch, NotAStore, RunSuperseded, StoreError, differences, interrupts_deferred
from sfcache.keys import tfds_ids
from sfcache.options import same_fields
from sfcache.provenance import (
    REDUCE_IDENTITY,
    Fidelity,
    Provenance,
    ReduceProvenance,
    TargetsProvenance,
    VggtProvenance,
)
from sfcache.rows import EpisodeRecord, RowIndex, pack_episodes
from sfcache.shard_file import DamagedShard, ShardReader, direct_layout, write_shard_file
from sfcache.version import __version__

__all__ = [
    "CODECS",
    "DTYPES",
    "Cache",
    "EpisodeRecord",
    "Reduction",
    "RowIndex",
    "StoreConfig",
    "create_store",
    "current_run",
    "decode",
    "encode",
    "int8_block",
    "is_locked",
    "layer_array",
    "lock_store",
    "open_cache",
    "pack_episodes",
    "read_attrs",
    "resumable_reduction",
    "step_bytes",
    "store_run",
]

# 2: int8 scales per token and channel block, recipe and optional token mask. 1 (int8 scales per
# step/view/channel) stays readable; resuming a version-1 store asks for --overwrite.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
INT8_BLOCK = 128  # channels per int8 scale (see `encode`)
MASK_ARRAY = "targets/mask"
DONE_ARRAY = "done"
DIGESTS_ARRAY = "digests"  # [num_shards, files per shard, 2] uint64: (size, CRC32C) of each shard file; 0 = none
NO_FILE = 2**64 - 1  # the size recorded for a shard file that zarr left out (all fill value)
LAYER_PARTS = ("", "_scale", "_mean", "_basis")  # values, int8 scales, --reduce mean and basis
DTYPES = ("float16", "bfloat16", "int8")
CODECS = ("none", "zstd", "blosc-zstd")
LOCK_NAME = ".sfcache.lock"
RUN_NAME = ".sfcache.run"  # the id of the one extraction run allowed to write (see store_run)
RUN_ENDED = "ended"
ERROR_LOG = ".sfcache.errors.log"  # tracebacks of unexpected extraction failures (the error line names it)
KEPT = (LOCK_NAME, RUN_NAME, ERROR_LOG)  # what clearing a store for --overwrite keeps (lock and run: held by flock)
_STORED_DTYPE = {"float16": "float16", "bfloat16": "uint16", "int8": "int8"}


Encoded = tuple[np.ndarray, "np.ndarray | None"]  # (stored values, int8 scales or None), as `encode` returns


def layer_array(layer: int, part: str = "") -> str:
    """The array of a stored layer: its values (""), int8 "_scale", or a reduced store's "_mean" / "_basis"."""
    if part not in LAYER_PARTS:
        raise StoreError(f"unknown part {part!r} of a layer's arrays; expected one of {LAYER_PARTS}")
    return f"targets/layer_{layer}{part}"


# ----------------------------------------------------------------------------- value encoding


def int8_block(channels: int) -> int:
    """Channels sharing one int8 scale: INT8_BLOCK, or the largest divisor of `channels` below it."""
    return math.gcd(channels, INT8_BLOCK)


def encode(values: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 [T, V, n, C] -> (stored array, int8 scales [T, V, n, C // block] or None).

    bfloat16 is kept as its uint16 bit pattern (round to nearest even) because Zarr v3 has no
    bfloat16 type; int8 uses one symmetric scale (max |x| / 127) per token and block of
    `int8_block(C)` channels. Chosen by measurement (`make bench`): with 1% of tokens 50x larger,
    per-channel scales (format version 1) fell to worst cosine 0.978; per token alone to 0.997 when
    channel magnitudes also spread; per token and 128-channel block stays above 0.9997 for 3% more bytes.
    """
    values = np.asarray(values, dtype=np.float32)
    if dtype == "float16":
        return values.astype(np.float16), None
    if dtype == "bfloat16":
        bits = values.view(np.uint32)
        rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        return (rounded >> np.uint32(16)).astype(np.uint16), None
    if dtype == "int8":
        blocks = values.reshape(*values.shape[:-1], -1, int8_block(values.shape[-1]))
        scale = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
        safe = np.where(scale > 0, scale, np.float32(1))
        stored = np.clip(np.rint(blocks / safe), -127, 127).astype(np.int8).reshape(values.shape)
        return stored, scale[..., 0].astype(np.float32)
    raise StoreError(f"unknown target dtype {dtype!r}; expected one of {', '.join(DTYPES)}")


def decode(stored: np.ndarray, dtype: str, scale: np.ndarray | None = None) -> np.ndarray:
    """Inverse of `encode`: float32 [T, V, n, C]. int8 scales [T, V, n, C // block], or a version-1
    store's per-channel [T, V, C]."""
    if dtype == "float16":
        return stored.astype(np.float32)
    if dtype == "bfloat16":
        return (stored.astype(np.uint32) << np.uint32(16)).view(np.float32)
    if dtype == "int8" and scale.ndim == 3:
        return stored.astype(np.float32) * scale[:, :, None, :]
    if dtype == "int8":
        blocks = stored.reshape(*scale.shape, stored.shape[-1] // max(scale.shape[-1], 1)).astype(np.float32)
        blocks = blocks * scale[..., None]
        return blocks.reshape(stored.shape)
    raise StoreError(f"unknown target dtype {dtype!r}; expected one of {', '.join(DTYPES)}")


def _compressors(codec: str, itemsize: int, checksum: bool) -> tuple:
    """Inner-chunk bytes codecs for `--codec` (byte shuffle helps 16-bit floats a little), then an optional
    CRC32C per chunk so that any flipped byte makes the read fail instead of returning wrong targets."""
    if codec not in CODECS:
        raise StoreError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")
    compress = {
        "none": (),
        "zstd": (ZstdCodec(level=3),),
        "blosc-zstd": (BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=itemsize),),
    }[codec]
    return compress + ((Crc32cCodec(),) if checksum else ())


def step_bytes(views: int, tokens: int, channels: int, dtype: str, layers: int, token_mask: bool) -> int:
    """Uncompressed bytes of one stored step (a version-2 store): all layers, int8 scales, mask; dtype "float32":
    the targets a `--reduce` worker holds before projecting them."""
    per_layer = views * tokens * channels * {"int8": 1, "float32": 4}.get(dtype, 2)
    if dtype == "int8":
        per_layer += views * tokens * (channels // int8_block(channels)) * 4
    return per_layer * layers + (views * tokens if token_mask else 0)


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


def reduced_step_bytes(
    components: Mapping[int, np.ndarray], views: int, tokens: int, dtype: str, token_mask: bool
) -> int:
    """Uncompressed bytes of one stored step of a reduced store (K coefficients per layer, scales, mask)."""
    per_layer = sum(step_bytes(views, tokens, len(c), dtype, 1, False) for c in components.values())
    return per_layer + (views * tokens if token_mask else 0)


# ----------------------------------------------------------------------------- configuration


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


# The weights, model, inputs and stored form that decide every target value (compared on resume, required of a store)
TARGET_IDENTITY = (
    "vggt.weights_id",
    "vggt.config",
    "vggt.preprocess",
    "vggt.compute_dtype",
    "targets.layers",
    "targets.grid",
    "targets.views",
    "targets.channels",
    "targets.dtype",
    "targets.codec",
)


def _differences(stored: dict, asked: dict) -> dict[str, tuple[object, object]]:
    """Fields that change target values, compared between a store's attrs and a new run's."""
    stored = {**stored, "recipe": stored.get("recipe", "none")}  # stores made before recipes existed
    fields = [
        "format_version",
        "recipe",
        "targets.mask",
        *TARGET_IDENTITY,
        "targets.checksum",
        "steps_per_shard",
        "selection",
        *(f"targets.reduce.{name}" for name in REDUCE_IDENTITY if name != "method"),  # "asked" names the method
    ]
    fields += sorted(
        f"source.{k}"
        for k in set(stored.get("source", {})) | set(asked.get("source", {}))
        if k not in ("path", "tfds_shards")
    )  # a moved dataset is the same; the fingerprint says so
    diff = differences(stored, asked, fields)
    if stored.get("episodes") != asked.get("episodes"):
        diff["episodes"] = tuple(_episodes_summary(a.get("episodes") or []) for a in (stored, asked))
    return diff


def _episodes_summary(episodes: list) -> str:
    return f"{len(episodes)} episodes, {sum(e[3] for e in episodes)} steps"


# ----------------------------------------------------------------------------- lock


@contextmanager
def lock_store(path: str | Path) -> Iterator[Path]:
    """Hold STORE/.sfcache.lock for the duration: an flock on the open file, not a pid in it.

    The kernel drops the flock when its holder dies (kill -9 included), so a leftover, empty or garbage
    lock file never blocks a later run, and a live holder that this process cannot see (another PID
    namespace or container on the same host, another host on NFS) is never judged dead.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path}: is a file; a store is a directory (choose another --out)")
    created = not path.exists()
    lock = path / LOCK_NAME
    with ExitStack() as critical:
        critical.enter_context(interrupts_deferred())  # no signal between taking the lock and the try releasing it
        try:
            path.mkdir(parents=True, exist_ok=True)
            descriptor = _hold_lock_file(lock)
        except OSError as err:
            raise StoreError(
                f"{lock}: cannot create the store lock ({err.strerror}); --out must be a writable "
                "directory on a file system with file locks"
            ) from None
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        try:
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, json.dumps(mine).encode(), 0)
            os.fsync(descriptor)
        except OSError as err:
            _release_lock(descriptor, lock, path, created)
            raise StoreError(
                f"{lock}: cannot write the store lock ({err.strerror}); free space or make {path} writable, "
                "then run again"
            ) from None
        try:
            critical.close()  # a signal that arrived meanwhile is handled here, inside the try
            yield lock
        finally:
            _release_lock(descriptor, lock, path, created)


def _hold_lock_file(lock: Path) -> int:
    """An open descriptor of `lock` holding its exclusive flock; StoreError naming the holder if it is taken."""
    while True:
        descriptor = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise StoreError(_locked_message(lock)) from None
        except OSError:
            os.close(descriptor)
            raise
        try:
            current = os.stat(lock).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(descriptor).st_ino:
            return descriptor
        os.close(descriptor)  # the holder removed the file as we opened it: lock the new one


def _locked_message(lock: Path) -> str:
    holder = _read_lock(lock)
    if isinstance(holder.get("pid"), int) and isinstance(holder.get("started"), (int, float)):
        since = datetime.fromtimestamp(holder["started"], UTC).isoformat(timespec="seconds")
        who = f"pid {holder['pid']} on host {holder.get('host')} since {since}"
    else:
        who = "a running process (its lock file names no owner)"
    return (
        f"{lock}: store is locked by {who}; another extractor is writing it (the lock is held open by a "
        "live process and is released when it ends). Wait for it, or stop it, then run again"
    )


def _release_lock(descriptor: int, lock: Path, path: Path, created: bool) -> None:
    try:
        lock.unlink(missing_ok=True)  # while still holding it, so no one locks a file about to vanish
        if created and not any(path.iterdir()):  # nothing was written: leave no empty store behind
            path.rmdir()
    except OSError:  # the store turned read-only: the file stays, but unlocked it blocks no later run
        pass
    finally:
        os.close(descriptor)


def _read_lock(lock: Path) -> dict:
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def is_locked(path: str | Path) -> bool:
    """True while an extractor holds the store lock (a leftover lock file of a dead one does not count)."""
    try:
        descriptor = os.open(Path(path) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:  # no file locks on this file system: nothing can be said to hold it
        return False
    finally:
        os.close(descriptor)


# ----------------------------------------------------------------------------- run fence


@contextmanager
def store_run(path: str | Path, wait: float = 60.0) -> Iterator[str]:
    """Make this extraction run the only one allowed to write the store; yields its run id.

    The id goes into STORE/.sfcache.run under an exclusive flock; every shard write holds a shared
    flock on that file and writes only while the file holds its task's run id (`Cache.write_shard(run=)`).
    So once a new run has started, or this one has ended, no task of an older client (killed, or cut off
    from a cluster that lives on) can write a shard or set a done flag any more. Call inside `lock_store`.
    """
    path = Path(path)
    run = uuid.uuid4().hex
    _fence(path, run, wait)
    try:
        yield run
    finally:
        try:
            _fence(path, RUN_ENDED, wait, remove=True)
        except (OSError, StoreError):  # a read-only store, or a hung old worker: the next run fences again
            pass


def _fence(path: Path, token: str, wait: float, remove: bool = False) -> None:
    """Wait for writes in progress (shared flocks) to end, then publish `token` as the store's run."""
    marker = path / RUN_NAME
    try:
        descriptor = os.open(marker, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as err:
        raise StoreError(f"{marker}: cannot create the run marker ({err.strerror}); --out must be writable") from None
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"{marker}: a Dask worker of an earlier run is still writing a shard after "
                        f"{wait:.0f} s; stop the old workers (or wait), then run again"
                    ) from None
                time.sleep(0.05)
        try:
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, token.encode(), 0)
            os.fsync(descriptor)
            if remove:
                marker.unlink(missing_ok=True)
        except OSError as err:
            raise StoreError(
                f"{marker}: cannot write the run marker ({err.strerror}); free space or make "
                f"{path} writable, then run again"
            ) from None
    finally:
        os.close(descriptor)


def current_run(path: str | Path) -> str:
    """The run id allowed to write the store now ("" when none: never started, or ended)."""
    try:
        token = (Path(path) / RUN_NAME).read_text()
    except OSError:
        return ""
    return "" if token == RUN_ENDED else token


@contextmanager
def _run_fence(path: Path, run: str, what: str) -> Iterator[None]:
    """Hold a shared flock on the run marker while writing `what`; StoreError when `run` is no longer current."""
    if not run:
        raise StoreError(f"{path}: {what} not written: a fenced write needs the extraction run's id")
    try:
        descriptor = os.open(path / RUN_NAME, os.O_RDONLY)
    except FileNotFoundError:
        descriptor = None
    except OSError as err:
        raise StoreError(f"{path / RUN_NAME}: cannot open the run marker for {what} ({err.strerror})") from None
    try:
        current = ""
        if descriptor is not None:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_SH)
                token = os.pread(descriptor, 64, 0).decode(errors="replace")
            except OSError as err:
                raise StoreError(
                    f"{path / RUN_NAME}: cannot lock or read the run marker for {what} "
                    f"({err.strerror}); the store needs a file system with file locks"
                ) from None
            current = "" if token == RUN_ENDED else token
        if current != run:
            now = f"run {current[:12]}" if current else "no run (it ended)"
            raise RunSuperseded(
                f"{path}: {what} not written: this task belongs to extraction run {run[:12]}, "
                f"but the store now belongs to {now}; the task of a dead, interrupted or finished "
                "client is fenced out"
            )
        yield
    finally:
        if descriptor is not None:
            os.close(descriptor)


# ----------------------------------------------------------------------------- create / open


def create_store(path: str | Path, config: StoreConfig, overwrite: bool = False) -> Cache:
    """Create an empty store for `config`, or reopen an existing one with the same configuration to resume.

    The caller must hold `lock_store(path)`. The provenance is written last, so a store whose
    creation was interrupted is recognised as ours and recreated. A different configuration
    raises ConfigMismatch listing each differing field, unless `overwrite` clears the store first;
    a file system error (read-only, full) raises StoreError.
    """
    try:
        return _create_or_resume(Path(path), config, overwrite)
    except OSError as err:
        raise StoreError(
            f"{path}: creating the store failed ({err}); make --out writable and run again "
            "(a half-created store is recreated)"
        ) from None


def _create_or_resume(path: Path, config: StoreConfig, overwrite: bool) -> Cache:
    asked = config.attrs()
    existing = _existing_attrs(path)
    if existing is not None and "sfcache" in existing and not overwrite:
        diff = _differences(existing["sfcache"], asked)
        if diff:
            raise ConfigMismatch(path, diff)
        _remove_partial_writes(path)
        cache = open_cache(path, mode="r+")
        if not cache.has_digests:  # a store written before digests were recorded: its new shards get them
            root = zarr.open_group(str(path), mode="r+", zarr_format=3)
            _create_digests(root, cache.num_shards, cache.shard_arrays())
        return cache
    if existing is not None or _has_foreign_files(path):
        if existing is None or not ({"sfcache", "sfcache_creating"} & set(existing)):
            raise StoreError(
                f"{path}: exists and is not an sfcache store; refusing to replace it "
                "(choose another --out or delete it yourself)"
            )
        _clear(path)
    root = zarr.create_group(store=str(path), zarr_format=3, attributes={"sfcache_creating": True})
    root.create_group("targets")
    n, views, tokens = config.num_steps, len(config.views), config.grid[0] * config.grid[1]
    if config.reduce and not config.reduce.fitted:
        raise StoreError(
            f"{path}: --reduce {config.reduce.request.get('asked')} needs its fitted basis to create the store"
        )
    for layer in config.layers:
        width = config.stored_channels(layer)
        if config.reduce:
            _write_basis(root, layer, config.reduce)
        root.create_array(
            layer_array(layer),
            shape=(n, views, tokens, width),
            dtype=_STORED_DTYPE[config.dtype],
            chunks=(1, views, tokens, width),
            shards=(config.steps_per_shard, views, tokens, width),
            compressors=_compressors(config.codec, np.dtype(_STORED_DTYPE[config.dtype]).itemsize, config.checksum),
            fill_value=0,
            attributes={
                "layer": layer,
                "encoding": config.dtype,
                **({"bits_of": "bfloat16"} if config.dtype == "bfloat16" else {}),
            },
        )
        if config.dtype == "int8":
            blocks = width // int8_block(width)
            root.create_array(
                layer_array(layer, "_scale"),
                shape=(n, views, tokens, blocks),
                dtype="float32",
                chunks=(1, views, tokens, blocks),
                shards=(config.steps_per_shard, views, tokens, blocks),
                compressors=_compressors("none", 4, config.checksum),
                fill_value=0,
                attributes={
                    "layer": layer,
                    "scale_of": layer_array(layer).removeprefix("targets/"),
                    "block": int8_block(width),
                },
            )
    if config.token_mask:
        root.create_array(
            MASK_ARRAY,
            shape=(n, views, tokens),
            dtype="uint8",
            chunks=(1, views, tokens),
            shards=(config.steps_per_shard, views, tokens),
            compressors=_compressors(config.codec, 1, config.checksum),
            fill_value=0,
            attributes={"mask_of": "every layer", "meaning": "1 = token holds image content"},
        )
    root.create_array(
        DONE_ARRAY, shape=(max(config.num_shards, 1),), chunks=(1,), dtype="uint8", fill_value=0, compressors=None
    )
    _create_digests(root, config.num_shards, _per_shard_arrays(config.layers, config.dtype, config.token_mask))
    root.attrs.put({"sfcache": asked})
    return open_cache(path, mode="r+")


def _create_digests(root: zarr.Group, num_shards: int, arrays: Mapping[int | str, list[str]]) -> None:
    """The digests array: per shard and shard file (in `Cache.shard_arrays` order) its [size, CRC32C]; one chunk
    per shard like `done`, so that recording one shard rewrites no other shard's."""
    files = [name for names in arrays.values() for name in names]
    root.create_array(
        DIGESTS_ARRAY,
        shape=(max(num_shards, 1), len(files), 2),
        chunks=(1, len(files), 2),
        dtype="uint64",
        fill_value=0,
        compressors=None,
        attributes={
            "files": files,
            "meaning": "[size in bytes, CRC32C] of each shard file as written (0, 0: not recorded; "
            f"size {NO_FILE}: no file, all fill value)",
        },
    )


def _per_shard_arrays(layers: Sequence[int], dtype: str, has_mask: bool) -> dict[int | str, list[str]]:
    """{layer: its arrays stored shard by shard (values, int8 scales), MASK_ARRAY: [MASK_ARRAY] if stored}."""
    arrays: dict[int | str, list[str]] = {
        layer: [layer_array(layer)] + ([layer_array(layer, "_scale")] if dtype == "int8" else []) for layer in layers
    }
    return {**arrays, MASK_ARRAY: [MASK_ARRAY]} if has_mask else arrays


def _write_basis(root: zarr.Group, layer: int, reduce: Reduction) -> None:
    """A layer's PCA mean [C] and components [K, C] as float32 arrays of one chunk each."""
    for name, values in (
        (layer_array(layer, "_mean"), reduce.means[layer]),
        (layer_array(layer, "_basis"), reduce.components[layer]),
    ):
        array = root.create_array(
            name,
            shape=values.shape,
            dtype="float32",
            chunks=values.shape,
            fill_value=0,
            compressors=None,
            attributes={"layer": layer, "basis_of": layer_array(layer).removeprefix("targets/")},
        )
        array[...] = values


def resumable_reduction(path: str | Path, config: StoreConfig, overwrite: bool = False) -> Reduction | None:
    """The fitted basis of the store at `path` if a run of `config` resumes it, so it is reused, never refitted;
    None when there is no such store (or `overwrite`). A store made differently raises ConfigMismatch now,
    before any fit is computed."""
    path = Path(path)
    existing = _existing_attrs(path) if path.is_dir() else None
    if overwrite or existing is None or "sfcache" not in existing:
        return None
    diff = _differences(existing["sfcache"], config.attrs())
    if diff:
        raise ConfigMismatch(path, diff)
    return open_cache(path).reduction


def _existing_attrs(path: Path) -> dict | None:
    meta = path / "zarr.json"
    if not meta.exists():
        return None
    try:
        attributes = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError) as err:
        raise StoreError(
            f"{meta}: unreadable Zarr metadata ({err}); the store is damaged and cannot be told "
            f"from other data, so --overwrite will not replace it: delete {path} and run again"
        ) from None
    if not isinstance(attributes, dict):
        raise StoreError(
            f"{meta}: attributes is a {type(attributes).__name__}, expected an object; delete {path} and run again"
        )
    return attributes


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


_MISSING = object()  # a field zarr.json lacks (told apart from a JSON null)

# Fields every complete `sf extract` records: `inspect-cache` reports them, so it opens stores with complete=True.
REQUIRED_PROVENANCE = (
    "format_version",
    "sfcache_version",
    "created",
    "num_steps",
    "steps_per_shard",
    "num_shards",
    "episodes",
    "vggt.weights",
    *TARGET_IDENTITY,
    "source.format",
    "source.path",
    "source.views",
    "source.rotate",
)


def _damaged(meta: Path, key: str, expected: str, value) -> None:
    """One line for a hand-damaged zarr.json: the attribute, what it holds and what was expected."""
    held = "missing" if value is _MISSING else json.dumps(value)[:80]
    raise StoreError(
        f"{meta}: attributes.sfcache.{key} is {held}, expected {expected}; "
        "the store is damaged: delete it and run `sf extract` again"
    )


def _dotted(attrs: dict, dotted: str):
    """attrs["a"]["b"] for "a.b", or _MISSING where any level is absent or not an object."""
    node = attrs
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_grid(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_int(x, 1) for x in value)


def _validate_attrs(meta: Path, attrs: dict, complete: bool = False) -> None:
    """Check every provenance field `Provenance.from_attrs` and the readers rely on, so a hand-damaged zarr.json
    is one StoreError naming the key and what was expected, not a ValueError or IndexError deep inside a read.
    `complete` also requires REQUIRED_PROVENANCE (stores written by tests and benchmarks may omit `source`)."""
    fail = partial(_damaged, meta)

    targets = attrs.get("targets")
    if not isinstance(targets, dict):
        fail("targets", "an object", targets)
    for key, expected, ok in [
        ("layers", "a non-empty list of layer indices", lambda v: isinstance(v, list) and v and all(map(_is_int, v))),
        (
            "views",
            "a non-empty list of view names",
            lambda v: isinstance(v, list) and v and all(isinstance(x, str) for x in v),
        ),
        ("grid", "[height, width] of positive integers", _is_grid),
        ("channels", "a positive integer", lambda v: _is_int(v, 1)),
        ("dtype", f"one of {', '.join(DTYPES)}", lambda v: v in DTYPES),
    ]:
        if not ok(targets.get(key)):
            fail(f"targets.{key}", expected, targets.get(key))
    for key, low in (("num_steps", 0), ("steps_per_shard", 1), ("num_shards", 0)):
        if not _is_int(attrs.get(key), low):
            fail(key, f"an integer >= {low}", attrs.get(key))
    episodes = attrs.get("episodes")
    if not isinstance(episodes, list):
        fail("episodes", "a list of [key, instruction, start, length]", episodes)
    for index, episode in enumerate(episodes):
        if not (
            isinstance(episode, list)
            and len(episode) == 4
            and isinstance(episode[0], str)
            and isinstance(episode[1], str)
            and _is_int(episode[2])
            and _is_int(episode[3])
        ):
            fail(f"episodes[{index}]", "[key, instruction, start, length]", episode)
    if targets.get("native_grid") is not None and not _is_grid(targets["native_grid"]):
        fail("targets.native_grid", "null or [height, width] of positive integers", targets["native_grid"])
    if targets.get("reduce") is not None:
        _validate_reduce(fail, targets["reduce"])
    vggt = attrs.get("vggt", {})
    if not isinstance(vggt, dict):
        fail("vggt", "an object (weights, weights_id, config, preprocess, compute_dtype)", vggt)
    if not isinstance(vggt.get("config") or {}, dict):
        fail("vggt.config", "an object of VGGTConfig fields", vggt["config"])
    for key in ("weights", "weights_id", "preprocess", "compute_dtype"):
        if not isinstance(vggt.get(key), (str, type(None))):
            fail(f"vggt.{key}", "a string or null", vggt[key])
    if not isinstance(attrs.get("source", {}), dict):
        fail("source", "an object (the source's describe())", attrs["source"])
    for dotted in REQUIRED_PROVENANCE if complete else ():
        if _dotted(attrs, dotted) is _MISSING:
            fail(dotted, "present (every complete `sf extract` records it)", _MISSING)


def _validate_reduce(fail, reduce) -> None:
    """targets.reduce: the request and, once fitted, {layer: K} and {layer: fidelity figures}."""
    if not isinstance(reduce, dict):
        fail("targets.reduce", "null or an object (method, asked, min_cosine, sample_steps, held_out_steps)", reduce)
    for key, expected, ok in [
        ("method", "a string", lambda v: isinstance(v, str)),
        ("asked", "a string", lambda v: isinstance(v, str)),
        (
            "min_cosine",
            "null or a number",
            lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)),
        ),
        ("sample_steps", "an integer >= 0", _is_int),
        ("held_out_steps", "an integer >= 0", _is_int),
        (
            "k",
            "null or {layer: K}",
            lambda v: (
                v is None
                or (isinstance(v, dict) and all(k.lstrip("-").isdigit() and _is_int(n, 1) for k, n in v.items()))
            ),
        ),
        (
            "fidelity",
            "null or {layer: {k, mean, p1, worst}}",
            lambda v: (
                v is None
                or (
                    isinstance(v, dict)
                    and all(
                        k.lstrip("-").isdigit() and isinstance(f, dict) and set(f) == {"k", "mean", "p1", "worst"}
                        for k, f in v.items()
                    )
                )
            ),
        ),
    ]:
        if not ok(reduce.get(key)):
            fail(f"targets.reduce.{key}", expected, reduce.get(key, _MISSING))


def _validate_index(meta: Path, attrs: dict) -> None:
    """The episode index must tile rows [0, num_steps) back to back, in num_shards shards (checked before
    the first read, so `inspect.check` can still list every inconsistency of an index it opened)."""
    fail = partial(_damaged, meta)

    if attrs["num_shards"] != -(-attrs["num_steps"] // attrs["steps_per_shard"]):
        fail(
            "num_shards",
            f"ceil(num_steps / steps_per_shard) = {-(-attrs['num_steps'] // attrs['steps_per_shard'])}",
            attrs["num_shards"],
        )
    row = 0
    episodes = attrs["episodes"]
    for index, episode in enumerate(episodes):
        if episode[2] != row:
            fail(f"episodes[{index}]", f"to start at row {row} (episodes are packed back to back)", episode)
        row += episode[3]
    if row != attrs["num_steps"]:
        fail("episodes", f"lengths summing to num_steps = {attrs['num_steps']}, not {row}", f"{len(episodes)} episodes")


def open_cache(path: str | Path, mode: str = "r", complete: bool = False, verify: bool = False) -> Cache:
    """Open a store; "r" is read-only at the Zarr level, "r+" lets an extractor write shards.
    `complete` also requires every field a full `sf extract` records (REQUIRED_PROVENANCE); `verify` checks each
    shard's files against their recorded digests before its first read (one more read of the shard)."""
    if mode not in ("r", "r+"):
        raise StoreError(f"{path}: mode must be 'r' or 'r+', got {mode!r}")
    cache = Cache(path, mode, complete)
    cache.verify = verify
    return cache


def read_attrs(path: str | Path) -> dict:
    """attrs["sfcache"] straight from STORE/zarr.json, not yet validated (for a store that may not open)."""
    path = Path(path)
    if not path.is_dir():
        what = "is a file; a store is a directory" if path.exists() else "does not exist"
        raise NotAStore(f"not an sfcache store: {path}: {what}")
    try:
        attrs = _existing_attrs(path)
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


class Cache:
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
        _validate_attrs(self.path / "zarr.json", self.attrs, complete)
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

    def resolve_layer(self, layer: int | None) -> int:
        """The stored layer to read: None is the only stored one; a negative index counts back from VGGT's depth.
        StoreError naming the stored layers when there is no such (or, for None, no single) layer."""
        if layer is None and len(self.layers) == 1:
            return self.layers[0]
        absolute = None if layer is None else layer + self.provenance.vggt.depth if layer < 0 else layer
        if absolute not in self.layers:
            asked = (
                f"{len(self.layers)} layers are stored, so one must be chosen"
                if layer is None
                else f"layer {layer} is not stored"
            )
            raise StoreError(
                f"{self.path}: {asked}; stored layers: {list(self.layers)} (pass layer=, or --layer / "
                "--cache-layer on the command line)"
            )
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
            _validate_index(self.path / "zarr.json", self.attrs)
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
                f"{self.path}: only float16 stores without --reduce are read undecoded; this one is "
                f"{self.dtype}{' and reduced' if self.reduced else ''}"
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
            f"{files}: reading {name} shard(s) {shards} failed ({type(err).__name__}: {err}); "
            "the file is damaged: run `sf extract` again with the same options and --repair"
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
                raise StoreError(f"{problem}; run `sf extract` again with the same options and --repair")
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

    # -- integrity (sfcache.inspect.check)

    def expected_arrays(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Every array the provenance promises besides `done`, with its shape and stored dtype: per layer its
        values (int8: and scales; a reduced store: and mean [C], basis [K, C]), then the token mask."""
        views, tokens, rows = len(self.views), self.grid[0] * self.grid[1], self.num_steps
        arrays = {}
        for layer in self.layers:
            width = self.stored_channels(layer)
            arrays[layer_array(layer)] = ((rows, views, tokens, width), np.dtype(_STORED_DTYPE[self.dtype]))
            if self.dtype == "int8":  # version 1: one scale per step, view and channel
                scale = (
                    (views, width)
                    if self.provenance.format_version == 1
                    else (views, tokens, width // int8_block(width))
                )
                arrays[layer_array(layer, "_scale")] = ((rows, *scale), np.dtype(np.float32))
            if self.reduced:
                arrays[layer_array(layer, "_mean")] = ((self.channels,), np.dtype(np.float32))
                arrays[layer_array(layer, "_basis")] = ((width, self.channels), np.dtype(np.float32))
        if self.has_mask:
            arrays[MASK_ARRAY] = ((rows, views, tokens), np.dtype(np.uint8))
        return arrays

    def array_problem(self, name: str) -> str | None:
        """What is wrong with array `name` of `expected_arrays()` (missing, unreadable, another shape, dtype or
        shard size, a basis chunk gone), or None when it is as promised."""
        shape, dtype = self.expected_arrays()[name]
        basis = name.endswith(("_mean", "_basis"))
        kind = "PCA basis" if basis else "token mask" if name == MASK_ARRAY else "array"
        try:
            array = self._open(name)
        except StoreError as error:
            return f"{kind} missing or unreadable ({error})"
        if array.shape != shape or array.dtype != dtype:
            return f"shape {array.shape} {array.dtype}, expected {shape} {dtype} from the provenance"
        if basis and not (self.path / name / array.metadata.encode_chunk_key((0,) * array.ndim)).is_file():
            return f"{kind} missing or unreadable (its chunk file is gone: it would read as zeros)"
        if not basis and name != MASK_ARRAY and (array.shards is None or array.shards[0] != self.steps_per_shard):
            return f"shards {array.shards}, expected {self.steps_per_shard} steps per shard"
        return None

    def read_stored(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """Rows of array `name` exactly as stored (not decoded, no done flag asked): zarr's own error on damage."""
        return self._open(name)[rows] if name == DONE_ARRAY else self._array(name)[rows]

    def shard_digests(
        self, shard: int, known: Mapping[str, list[int] | None] | None = None
    ) -> dict[str, list[int] | None]:
        """[size, CRC32C] of each target array's file of a shard (None where missing), as seen from here.

        The writer records these (`write_shard`) and reports them; the extraction client compares them with its
        own view of the file system before it counts the shard done (a worker writing to a private /tmp is
        caught), and `digest_problem` compares them with the record. CRC32C (hardware, ~17 GB/s here) rather
        than a cryptographic hash: it guards against rot and misplaced files, not against an attacker.
        """
        digests: dict[str, list[int] | None] = {}
        for name in self._target_arrays():
            file = self.shard_file(name, shard)
            if (known or {}).get(name) is not None:  # computed as it was written (`known`: {array: digest})
                digests[str(file.relative_to(self.path))] = known[name]
                continue
            try:
                data = file.read_bytes()
            except FileNotFoundError:
                digests[str(file.relative_to(self.path))] = None
                continue
            except OSError as err:
                raise StoreError(f"{file}: shard {shard} is unreadable ({err.strerror})") from None
            digests[str(file.relative_to(self.path))] = [len(data), google_crc32c.value(data)]
        return digests

    @property
    def has_digests(self) -> bool:
        """False for a store written before shard digests were recorded (its shards cannot be checked by them)."""
        return (self.path / DIGESTS_ARRAY / "zarr.json").is_file()

    def recorded_digests(self, shard: int) -> dict[str, list[int] | None] | None:
        """The digests recorded when `shard` was written, shaped as `shard_digests`; None if none were recorded."""
        if not self.has_digests:
            return None
        row = self._array(DIGESTS_ARRAY)[shard]
        files = [str(self.shard_file(name, shard).relative_to(self.path)) for name in self._target_arrays()]
        if row.shape != (len(files), 2):
            raise StoreError(
                f"{self.path / DIGESTS_ARRAY / 'zarr.json'}: holds {row.shape} per shard, expected "
                f"({len(files)}, 2) (size and CRC32C of each of {len(files)} shard files); the store is damaged"
            )
        if not row[:, 0].any():
            return None
        return {
            file: None if size == NO_FILE else [int(size), int(crc)]
            for file, (size, crc) in zip(files, row.tolist(), strict=True)
        }

    def digest_problem(self, shard: int) -> str | None:
        """How shard `shard`'s files differ from the digests recorded when it was written (the first differing
        file named), or None when they match or none were recorded (`recorded_digests`)."""
        recorded = self.recorded_digests(shard)
        if recorded is None:
            return None
        found = self.shard_digests(shard)
        for file, want in recorded.items():
            got = found.get(file)
            if got != want:
                return (
                    f"{self.path / file}: shard {shard} does not match the digest recorded when it was written "
                    f"({_digest_text(got)}, recorded {_digest_text(want)}): its bytes changed on disk, or "
                    "another shard's file was moved or copied here"
                )
        return None

    def mark_done(self, shards: Sequence[int]) -> None:
        """Set the done flags of `shards`, whose files the caller has just checked against their digests."""
        if self.mode == "r":
            raise StoreError(f"{self.path}: opened read-only; cannot change done flags")
        done = self._array(DONE_ARRAY)
        try:
            for shard in shards:
                done[int(shard)] = 1
        except OSError as err:
            raise StoreError(
                f"{self.path}: cannot mark shards {list(shards)} done ({err}); --out must be writable"
            ) from None

    def _record_digests(self, shard: int, digests: Mapping[str, list[int] | None]) -> None:
        """Write `shard_digests(shard)` into the digests array (a store without one, written before, gets none)."""
        if not self.has_digests:
            return
        self._array(DIGESTS_ARRAY)[shard] = np.array(
            [[NO_FILE, 0] if digest is None else digest for digest in digests.values()], dtype=np.uint64
        )

    def missing_shard_files(self, shards: Sequence[int] | None = None) -> dict[int, Path]:
        """Done shards (all, or the given ones) with a target file missing: {shard: first missing file}.

        Real targets are never all zero, so a done shard always has a file per target array.
        """
        done = self.done_shards() if shards is None else np.zeros(self.num_shards, bool)
        if shards is not None:
            done[np.asarray(list(shards), dtype=np.int64)] = self.done_shards(list(shards))
        missing = {shard: self._missing_file(shard) for shard in np.flatnonzero(done).tolist()}
        return {shard: file for shard, file in missing.items() if file is not None}

    def _missing_file(self, shard: int) -> Path | None:
        return next(
            (file for file in (self.shard_file(name, shard) for name in self._target_arrays()) if not file.is_file()),
            None,
        )

    def mark_not_done(self, shards: Sequence[int]) -> None:
        """Clear the done flags of `shards`, then delete their target files (damaged ones cannot even be
        overwritten: zarr reads a shard's index before replacing it), so `sf extract` redoes them afresh."""
        if self.mode == "r":
            raise StoreError(f"{self.path}: opened read-only; cannot change done flags")
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
                f"{self.path}: cannot reset shards {list(shards)} for redoing ({err}); --out must be writable"
            ) from None
        self._known_done.difference_update(int(s) for s in shards)

    def shard_arrays(self) -> dict[int | str, list[str]]:
        """{layer: its arrays stored shard by shard (values, int8 scales), MASK_ARRAY: [MASK_ARRAY] if stored}:
        a shard's data is whole only when each of these files is."""
        return _per_shard_arrays(self.layers, self.dtype, self.has_mask)

    def _target_arrays(self) -> list[str]:
        return [name for names in self.shard_arrays().values() for name in names]

    # -- writes (extractor only)

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
        with _run_fence(self.path, run, f"shard {shard}") if run is not None else nullcontext():
            return self._write_shard(shard, targets, mask, done)

    def _write_shard(
        self, shard: int, targets: Mapping[int, np.ndarray | Encoded], mask: np.ndarray | None, done: bool
    ) -> dict[str, list[int] | None]:
        if self.mode == "r":
            raise StoreError(f"{self.path}: opened read-only; cannot write shard {shard}")
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
                    if stored.dtype != np.dtype(_STORED_DTYPE[self.dtype]):
                        raise StoreError(
                            f"{self.path}: shard {shard} layer {layer} is stored as {stored.dtype}, "
                            f"expected {_STORED_DTYPE[self.dtype]} (a {self.dtype} store)"
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


def _digest_text(digest: list[int] | None) -> str:
    return "no file" if digest is None else f"{digest[0]} bytes, CRC32C {digest[1]:08x}"


def _contiguous_runs(rows: np.ndarray) -> tuple[list[slice], np.ndarray | None]:
    """Sorted unique `rows` as ascending slices, and the gather index that restores the request
    order (None when the rows already are sorted and unique)."""
    unique, inverse = np.unique(rows, return_inverse=True)
    breaks = np.flatnonzero(np.diff(unique) != 1) + 1
    starts, stops = np.r_[0, breaks], np.r_[breaks, unique.size]
    runs = [slice(int(unique[a]), int(unique[b - 1]) + 1) for a, b in zip(starts, stops) if b > a]
    return runs, None if unique.size == rows.size and (unique == rows).all() else inverse.reshape(-1)
