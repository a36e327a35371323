"""Dask-parallel extraction: VGGT once over every step of a dataset, pooled targets into a Zarr store.

The client (this process) holds the store lock, builds the episode index, creates or resumes the
store and hands out tasks; every Dask worker loads VGGT once (a WorkerPlugin) and runs tasks. A task
owns whole shards, so no two writers ever touch one shard file; inside a task a reader thread
decodes and preprocesses the next batch while the model runs, and the worker's writer thread writes
and marks the previous shard done. Two tasks are in flight per worker, one at a time on the model, so
the next task's first batches are read while this one computes and its compute hides this one's last
write. Batches start at shard boundaries, so a step's target never depends on which task or which run
computed it: a resumed store equals an uninterrupted one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fnmatch
import gc
import logging
import os
import queue
import signal
import socket
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import CancelledError, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from multiprocessing import resource_tracker
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch
from distributed import Client, Nanny, Scheduler, SpecCluster, WorkerPlugin, as_completed, get_worker, wait
from distributed.comm.addressing import get_address_host_port, parse_address
from distributed.comm.core import CommClosedError
from distributed.scheduler import KilledWorker

from sfcache.device import DEVICE_CHOICES, HostCopy, check_device, encode_on_device, pinned, resolve_device, to_device
from sfcache.errors import (
    Interrupted,
    SfcacheError,
    SourceError,
    StoreError,
    WeightsError,
    interrupts_deferred,
    raise_problems,
)
from sfcache.options import comma_list, comma_text, int_list, option, same_fields
from sfcache.pooling import pooled_targets
from sfcache.progress import progress_bar
from sfcache.recipes import Recipe, camera_views, get_recipe, recipe_inputs, resolve_preprocess, slot_layout
from sfcache.reduce import Moments, check_fidelity, fit, parse_reduce, request, sample_rows, valid_tokens
from sfcache.rows import RowIndex
from sfcache.sources import Source, open_source
from sfcache.store import (
    CODECS,
    DIGESTS_ARRAY,
    DONE_ARRAY,
    DTYPES,
    ERROR_LOG,
    RUN_NAME,
    Reduction,
    StoreConfig,
    create_store,
    current_run,
    is_locked,
    lock_store,
    open_cache,
    pack_episodes,
    resumable_reduction,
    step_bytes,
    store_run,
)
from sfcache.version import __version__
from sfcache.vggt import PRESETS, VGGTConfig, load_vggt, preprocess, weights_config
from sfcache.vggt.model import resolve_layers
from sfcache.vggt.preprocess import device_images, output_size

__all__ = ["ExtractConfig", "ExtractSummary", "extract", "plan", "torch_threads"]

STOP_NAME = ".sfcache.stop"  # created by the client to make running tasks finish their shard and return
WORKER_WAIT_S = 60  # how long a running scheduler may have no workers before we give up
STOP_WAIT_S = 600  # after a failure, how long running tasks may take to finish their shard
INTERRUPT_WAIT_S = 5  # ... after Ctrl-C / SIGTERM / SIGHUP (the run fence stops any later write)
STOP_SAY_S = 5  # waiting for running tasks longer than this is said on stderr
LEASE_CHECK_S = 2.0  # how often a worker's plugin checks that its client still holds the store
LEASE_MISSES = 2  # ... and how many checks in a row must find it gone before the plugin removes itself
MAX_SHARDS_PER_TASK = 8
TASKS_PER_WORKER = 4  # enough tasks to balance workers and move the progress bar smoothly
TASKS_IN_FLIGHT = 2  # per worker: one on the model, the next reading its first batches (VGGTWorker.run)
GPU_SHARE = {"GPU": 1 / TASKS_IN_FLIGHT}  # what a task asks of a worker advertising the resource GPU=1
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
MAX_COUNT = 1 << 20  # --batch-size, --steps-per-shard: beyond this a typo, not a plan (a shard index of 16 MiB)
MAX_GRID_SIDE = 1024  # --grid: VGGT's own patch grid is 16-74 per side; pooling only resamples it
MAX_SHARD_BYTES = 8 << 30  # a shard's targets are held in a worker's memory until written
PREPROCESS_MODES = ("sf", "crop", "pad")  # --preprocess; letterbox comes with --recipe openpi
COMPUTE_DTYPES = ("auto", "bfloat16", "float32")


def _parse_grid(text: str) -> tuple[int, int] | None:
    if text == "native":
        return None
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError("expected HxW like 16x16, or native") from None
    return height, width


def _show_grid(grid: tuple[int, int]) -> str:
    return "x".join(map(str, grid))


def _scheduler_problem(address: str) -> str | None:
    """Why `address` cannot be a Dask scheduler's (a network one needs host:port), checked before connecting."""
    try:
        if parse_address(address)[0] != "inproc":  # in-process clusters (tests) have no port
            get_address_host_port(address)
    except ValueError as error:
        return f"--scheduler {address!r}: {error}; expected an address like tcp://host:8786"
    return None


@dataclass(frozen=True)
class ExtractConfig:
    """What `sf extract` was asked to do (each field's help is its `sf extract` option's)."""

    source: Path = option(
        help="Dataset folder or file (LIBERO HDF5/RLDS, LeRobot, RoboTwin).", argument=True, metavar="PATH"
    )
    out: Path = option(help="Target store directory (created, or resumed if it exists).")
    vggt: str | None = option(
        None,
        "VGGT weights: checkpoint path, hub id (facebook/VGGT-1B) or random:<preset> (random:<preset>@<seed>) for "
        "tests; needed to extract (--dry-run without it sizes the store for VGGT-1B).",
    )
    format: str = option("auto", "Source format, or auto to detect it.")
    views: tuple[str, ...] | None = option(  # None = the format's default views and order
        None,
        "Comma list of views in VGGT order, each a name or name=column (default: the format's); "
        "with --recipe openpi, 'blank' marks an empty camera slot.",
        parse=comma_list,
        show=comma_text,
    )
    layers: tuple[int, ...] = option(
        (-1,),
        "Comma list of VGGT layers; -1 is the last (23 on VGGT-1B, the one SF uses).",
        parse=int_list,
        show=comma_text,
    )
    grid: tuple[int, int] | None = option(
        (16, 16), "Target grid per view: HxW, or native (VGGT's patch grid).", parse=_parse_grid, show=_show_grid
    )
    recipe: str = option(
        "none",
        "Feed VGGT exactly what a public SF trainer does: openvla-oft (TF JPEG decode, "
        "lanczos 224, primary+wrist) or openpi (letterbox 224, 3 camera slots, token mask); "
        "none: the source's decode and --preprocess.",
    )
    preprocess: str | None = option(
        None, "sf (OpenVLA's 224 px resize; the default), crop or pad (official VGGT); a --recipe fixes it."
    )
    compute_dtype: str = option(
        "auto",
        "VGGT autocast: auto (bfloat16 on Ampere+ GPUs, float32 on CPU), bfloat16 "
        "(as SF on GPU, also on CPU) or float32.",
    )
    dtype: str = option("float16", "Stored dtype: float16, bfloat16 or int8.")
    codec: str = option("none", "Compression: none, zstd or blosc-zstd.")
    checksum: bool = option(
        False,
        "CRC32C per stored step: inspect-cache --check then detects any flipped byte.",
        flag="--checksum/--no-checksum",
    )
    batch_size: int = option(8, "Steps per VGGT forward pass (each step is V frames).")
    steps_per_shard: int = option(32, "Steps per shard file (unit of resume).")
    workers: int | None = option(None, "Worker processes (default: one per GPU, else 1).")
    scheduler: str | None = option(None, "Address of a running Dask scheduler (tcp://...).")
    episodes: str | None = option(None, "Only episodes whose key matches this fnmatch pattern.")
    device: str = option("auto", f"{DEVICE_CHOICES}.")
    skip_bad: bool = option(False, "Leave unreadable episodes out and list them at the end.")
    overwrite: bool = option(False, "Replace a store made with another configuration.")
    reduce: str = option(
        "none",
        "Compact store: pca:K stores K PCA coefficients per token (basis fitted on a "
        "sample of steps, targets rebuilt on read); pca:auto picks the smallest K reaching "
        "--min-cosine; none stores full targets.",
    )
    min_cosine: float | None = option(
        None,
        "Held-out *mean* per-token cosine a --reduce store must reach, else extract refuses to write it (needed by "
        "pca:auto); the 1st-percentile and worst token cosines are recorded too, and warned on when far below.",
    )
    repair: bool = option(
        False,
        "Also read back every done shard and redo those that fail (what `sf inspect-cache "
        "--check` reports); missing shard files are always redone.",
    )

    def __post_init__(self):
        object.__setattr__(self, "source", Path(self.source))
        object.__setattr__(self, "out", Path(self.out))
        problems = []
        try:
            object.__setattr__(
                self, "preprocess", resolve_preprocess(get_recipe(self.recipe), self.preprocess, PREPROCESS_MODES)
            )
        except SfcacheError as error:
            problems.append(str(error))
        if self.compute_dtype not in COMPUTE_DTYPES:
            problems.append(f"--compute-dtype must be one of {', '.join(COMPUTE_DTYPES)}, not {self.compute_dtype!r}")
        if self.dtype not in DTYPES:
            problems.append(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.codec not in CODECS:
            problems.append(f"--codec must be one of {', '.join(CODECS)}, not {self.codec!r}")
        try:
            check_device(self.device)
        except SfcacheError as problem:
            problems.append(str(problem))
        for name in ("batch_size", "steps_per_shard"):
            value, flag = getattr(self, name), f"--{name.replace('_', '-')}"
            if value < 1:
                problems.append(f"{flag} must be >= 1, got {value}")
            elif value > MAX_COUNT:
                problems.append(f"{flag} must be <= {MAX_COUNT}, got {value}")
        if self.workers is not None and self.workers < 1:
            problems.append(f"--workers must be >= 1, got {self.workers}")
        if not self.layers or len(set(self.layers)) != len(self.layers):
            problems.append(f"--layers must be distinct layer indices, got {list(self.layers)}")
        if self.grid is not None and not (min(self.grid) >= 1 and max(self.grid) <= MAX_GRID_SIDE):
            problems.append(
                f"--grid {_show_grid(self.grid)}: each side must be in [1, {MAX_GRID_SIDE}] (VGGT-1B's own grid is "
                "37x37; SF pools it to 16x16)"
            )
        if self.scheduler is not None and (problem := _scheduler_problem(self.scheduler)):
            problems.append(problem)
        if self.out.is_file():
            problems.append(f"--out {self.out}: is a file; expected a store directory (new or to resume)")
        try:
            reduce = parse_reduce(self.reduce)
            if reduce == "auto" and self.min_cosine is None:
                problems.append("--reduce pca:auto needs --min-cosine C (the held-out mean cosine to reach, e.g. 0.98)")
            if reduce is None and self.min_cosine is not None:
                problems.append("--min-cosine applies only with --reduce pca:K or pca:auto")
        except SfcacheError as error:
            problems.append(str(error))
        if self.min_cosine is not None and not 0 < self.min_cosine <= 1:
            problems.append(f"--min-cosine must be in (0, 1], got {self.min_cosine}")
        raise_problems(problems)


@dataclass(frozen=True)
class ExtractSummary:
    """What `extract` did: the store's state after the run, this run's work and timing (`sf extract` prints it)."""

    store: str
    format: str
    views: list[str]
    recipe: str
    layers: list[int]
    episodes: int  # selected episodes
    steps: int  # rows of the store
    shards_done: int
    shards: int
    extracted_steps: int  # by this run (adopted ones included)
    adopted_steps: int  # written by an earlier attempt (a dead worker or client), confirmed by this run
    already_done_steps: int  # done (confirmed) before this run
    failed: list[dict]  # {"shard", "file", "what", "episode", "key", "message"}
    repaired: list[dict]  # {"shard", "why"}
    run: str  # the run id (the store's write fence)
    skipped_episodes: list[str]
    basis: str  # none | fitted | reused
    reduce: dict | None  # attrs["targets"]["reduce"] of a reduced store
    missing_episodes: list[str]
    workers: int
    device: str
    weights_id: str
    cluster_startup_s: float
    extract_s: float
    steps_per_s: float
    total_s: float


# ----------------------------------------------------------------------------- worker side


@dataclass(frozen=True)
class _Job:
    """What every worker needs for every task; travels once, inside the plugin."""

    source: Source
    weights: str
    device: str  # cpu | cuda | cuda:N as each worker sees its GPUs (resolved by the client)
    layers: tuple[int, ...]  # as asked (negative allowed); the client has checked them against the model
    grid: tuple[int, int] | None
    preprocess: str
    recipe: Recipe
    layout: tuple[str, ...]  # VGGT sequence: source views and blank slots
    compute_dtype: str  # auto | bfloat16 | float32
    batch_size: int
    skip_bad: bool
    store: Path
    workers_per_host: dict[str, int]  # to share a host's cores between its workers' torch threads
    run: str = ""  # the extraction run's id: tasks write only while it is the store's (fencing)
    tasks_in_flight: int = 1  # tasks a worker runs at once (however many threads Dask gives it)


class VGGTWorker(WorkerPlugin):
    """Holds one VGGT per worker process (loaded at setup, not per task), the lock its tasks take turns on and
    the writer thread they share, and runs extraction tasks."""

    def __init__(self, job: _Job, name: str):
        self.job, self.name = job, name
        self.model = None

    def setup(self, worker=None):
        self.expired = threading.Event()  # set when the plugin is torn down or its client is gone
        self.model_turn = threading.Lock()  # one task's batches on the model at a time
        self.slots = threading.BoundedSemaphore(self.job.tasks_in_flight)  # bounds prefetched memory
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="sfcache-write")  # shards in order, no contention
        sharing = self.job.workers_per_host.get(_host(worker.address), 1) if worker is not None else 1
        torch.set_num_threads(torch_threads(sharing))
        _keep_freed_memory()
        device = torch.device(self.job.device)
        dtype = None if self.job.compute_dtype == "auto" else getattr(torch, self.job.compute_dtype)
        self.model, self.weights_id = load_vggt(self.job.weights, device, compute_dtype=dtype)
        self.config, self.device = self.model.config, device  # the config outlives the model (reader threads)
        if worker is not None:  # the lease: a model outlives its client by LEASE_CHECK_S at most
            self.lock_visible = is_locked(self.job.store)  # the client holds it now, if this host sees flocks
            threading.Thread(target=self._lease, args=(worker,), name="sfcache-lease", daemon=True).start()

    def teardown(self, worker=None):
        self.expired.set()
        self.writer.shutdown(wait=True)
        self.model = None
        self._free_memory()

    def _free_memory(self) -> None:
        """Hand the device memory of a model no longer referenced back to the driver (and other processes)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def client_alive(self) -> bool:
        """Whether this run's client is still there: the store still belongs to its run and (where this worker
        can see flocks) its lock is held. A client killed with kill -9 fails this at once: the kernel dropped its
        lock; one that ended or was replaced moved the run marker on."""
        if current_run(self.job.store) != self.job.run:
            return False
        return is_locked(self.job.store) or not self.lock_visible

    def _lease(self, worker) -> None:
        """Every LEASE_CHECK_S while this plugin is set up: once its client is gone (LEASE_MISSES checks in a row),
        remove the plugin from the scheduler and every worker (teardown frees the model and its GPU memory), so a
        dead client leaves no model behind; its tasks still running stop at their next batch and free what they
        held of it when they end (`run`)."""
        misses = 0
        while not self.expired.wait(LEASE_CHECK_S):
            misses = 0 if self.client_alive() else misses + 1
            if misses == LEASE_MISSES:  # twice in a row: not a file system hiccup
                self.expired.set()
                worker.loop.add_callback(self._remove_everywhere, worker)
                return

    async def _remove_everywhere(self, worker) -> None:
        try:
            await worker.scheduler.unregister_worker_plugin(name=self.name)
        except Exception:  # noqa: BLE001  already removed (another worker's lease), or the scheduler is gone
            if self.name in worker.plugins:
                await worker.plugin_remove(self.name)

    def facts(self) -> dict:
        """What the client records as provenance; must agree across workers."""
        return {
            "weights_id": self.weights_id,
            "config": self.model.config.to_dict(),
            "compute_dtype": str(self.model.compute_dtype_for(self.device)).removeprefix("torch."),
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
        }

    def run(self, shards: list[int]) -> dict:
        """Extract whole shards; expected failures come back as data (no Dask retry of a bad file).

        A task holds the model from its first batch to its last. A second task on this worker meanwhile
        reads its first batches (its prefetch then blocks) and takes the model the moment this one lets
        go, while this one waits for its last write: the model does not idle between tasks. A task still
        running when the plugin was torn down held the model past teardown's freeing: it frees it on its way out."""
        try:
            with self.slots:
                return self._run(shards)
        finally:
            if self.expired.is_set():
                self._free_memory()

    def _run(self, shards: list[int]) -> dict:
        report = {
            "failed": [],
            "error": None,
            "written": {},
            "adopted": [],
            "host": socket.gethostname(),
            "store": os.path.realpath(self.job.store),
        }
        shard, cache = shards[0], None  # the shard being worked on, for the message of an unexpected error
        pending: deque = deque()  # (shard, its write on the writer thread)
        try:
            cache = open_cache(self.job.store, mode="r+")
            index = cache.index
            todo = [s for s, done in zip(shards, cache.done_shards(shards)) if not done]
            for shard in list(todo):  # written by an earlier attempt (a dead worker or client), never confirmed
                recorded = cache.recorded_digests(shard)
                if recorded is not None and cache.shard_digests(shard) == recorded:
                    report["written"][shard] = recorded  # the client confirms it: nothing to recompute
                    report["adopted"].append(shard)
                    todo.remove(shard)
            with (
                _prefetch(self._batches(cache, index, todo, self.job.store / STOP_NAME), depth=2) as batches,
                _Turn(self.model_turn) as model,
            ):
                outputs: list[tuple[HostCopy, np.ndarray | None]] = []
                for shard, inputs, last in batches:
                    if isinstance(inputs, SourceError):
                        outputs = []
                        report["failed"].append({"shard": shard, **_error_fields(inputs)})
                        if self.job.skip_bad:
                            continue
                        break
                    images, mask = inputs
                    if self.expired.is_set():  # torn down (the lease): stop before the model is used again
                        break
                    model.take()
                    outputs.append((self._targets(images, "float32" if cache.reduced else cache.dtype), mask))
                    _log_progress(self.job.run, _steps_in(images))
                    if last:
                        pending.append((shard, self.writer.submit(self._write, cache, shard, outputs, self.job.run)))
                        outputs = []
                    while pending and (pending[0][1].done() or len(pending) > 1):
                        if not self._collect(pending.popleft(), report, cache):
                            break
                    if report["error"]:
                        break
                model.give_up()
                while pending:
                    self._collect(pending.popleft(), report, cache)
        except Exception as error:  # noqa: BLE001  any other failure: one line for the client, the traceback beside
            self._fail(report, shard, error, cache)
            while pending:  # shards written before it still count
                self._collect(pending.popleft(), report, cache)
        return report

    def _collect(self, pending: tuple, report: dict, cache) -> bool:
        """Fold a finished shard write into the task report; False after a failed write (the first one is kept)."""
        shard, future = pending
        try:
            shard, digests = future.result()
        except Exception as error:  # noqa: BLE001  a store error, or anything else the write raised
            self._fail(report, shard, error, cache)
            return False
        report["written"][shard] = digests
        return True

    def _fail(self, report: dict, shard: int, error: BaseException, cache) -> None:
        """Record the task's first failure: a store error as its own line, anything else as one line naming the
        shard, its rows and the cause (out of memory: the option that lowers it), with the traceback for the log."""
        if report["error"] is not None:
            return
        report["error_shard"] = shard
        if isinstance(error, SfcacheError):
            report["error"] = str(error)
            return
        where = _shard_text(cache, shard)
        report["error"] = f"{where} failed on {report['host']}: {_cause(error, self.job.batch_size)}"
        report["traceback"] = "".join(traceback.format_exception(error))

    def _batches(self, cache, index: RowIndex, shards: list[int], stop_file: Path) -> Iterator[tuple]:
        """(shard, (images, token mask | None) | SourceError, last batch of the shard?) in row order."""
        img_size = self.config.img_size
        for shard in shards:
            if stop_file.exists() or current_run(self.job.store) != self.job.run or self.expired.is_set():
                return  # asked to stop, this run was superseded or has ended, or its client is gone
            rows = cache.shard_rows(shard)
            try:
                for start in range(rows.start, rows.stop, self.job.batch_size):
                    if self.expired.is_set():
                        return
                    stop = min(start + self.job.batch_size, rows.stop)
                    yield shard, self._images(index.pieces(start, stop), img_size), stop == rows.stop
            except SourceError as error:
                yield shard, error, True

    def _images(self, pieces: list[tuple[str, int, int]], img_size: int) -> tuple[list[tuple], np.ndarray | None]:
        """Read each episode's piece of a batch and run the host part of preprocessing: ([(uint8 frames ready
        for the device, source (H, W))] per piece (episodes may differ in frame size), token mask | None)."""
        job = self.job
        parts, masks = [], []
        for key, a, b in pieces:
            frames = job.source.read(key, a, b).frames
            staged, mask = recipe_inputs(
                frames,
                job.recipe,
                job.layout,
                job.preprocess,
                img_size,
                job.grid,
                self.config.patch_size,
                on_host=True,
            )
            parts.append((staged, pinned(staged, self.device), frames.shape[2:4]))
            masks.append(mask)
        shapes = {output_size(staged, job.preprocess, img_size) for staged, _, _ in parts}
        if len(shapes) > 1:
            raise SourceError(
                self.job.source.path,
                f"episodes {[key for key, _, _ in pieces]} preprocess to "
                f"different image sizes {sorted(shapes)} with --preprocess {self.job.preprocess}; "
                "expected one size (use --preprocess sf or pad for mixed frame sizes)",
            )
        frames = [(host, size) for _, host, size in parts]
        mask = None if masks[0] is None else np.concatenate(masks)
        if self.device.type == "cpu":  # no accelerator to hand the rest to: finish here, beside the model
            return self._device_images(frames), mask
        return frames, mask

    def _device_images(self, frames: list[tuple[torch.Tensor, tuple[int, int]]]) -> torch.Tensor:
        """The device part of preprocessing, on the model's device: float32 images [B, V, 3, H', W']."""
        img_size = self.config.img_size
        with torch.inference_mode():
            return torch.cat(
                [
                    device_images(to_device(host, self.device), self.job.preprocess, img_size, size)
                    for host, size in frames
                ]
            )

    def _targets(self, inputs: torch.Tensor | list[tuple[torch.Tensor, tuple[int, int]]], dtype: str) -> HostCopy:
        """Pooled targets [B, V, H*W, C] per (non-negative) layer for a batch of steps (images, or host frames
        preprocessed here on the model's device), cast to the store's dtype there; the copy back is queued,
        not waited for."""
        images = inputs if isinstance(inputs, torch.Tensor) else self._device_images(inputs)
        with torch.inference_mode():
            targets = pooled_targets(self.model, images, self.job.layers, self.job.grid)
            return HostCopy({layer: encode_on_device(tokens, dtype) for layer, tokens in targets.items()})

    def sample(self, episodes: list, rows: list[int]) -> tuple[dict[int, np.ndarray], np.ndarray | None]:
        """Exact targets of fit-sample rows (sfcache.reduce): float32 [len(rows), V, h*w, C] per layer and
        the token mask, one step per piece, batched as given so every run computes the same numbers."""
        index = RowIndex(episodes)
        with self.slots:
            images, mask = self._images(
                [piece for row in rows for piece in index.pieces(row, row + 1)], self.config.img_size
            )
            with self.model_turn:
                copy = self._targets(images, "float32")
            return {layer: stored for layer, (stored, _) in copy.get().items()}, mask

    @staticmethod
    def _write(cache, shard: int, outputs: list[tuple[HostCopy, np.ndarray | None]], run: str) -> tuple[int, dict]:
        """Write one shard (fenced by the run) from its batches' (encoded targets, mask), recording its digests but
        not its done flag (the client sets it once it has read the digests back); returns (shard, file digests)."""
        batches = [copy.get() for copy, _ in outputs]
        encoded = {layer: _concat([batch[layer] for batch in batches]) for layer in batches[0]}
        targets = {
            layer: stored if stored.dtype == np.float32 else (stored, scales)  # float32: the store encodes
            for layer, (stored, scales) in encoded.items()
        }
        masks = [mask for _, mask in outputs]
        mask = None if masks[0] is None else np.concatenate(masks)
        return shard, cache.write_shard(shard, targets, mask, run=run, done=False)


class _Turn:
    """A task's hold on its worker's model lock: taken at its first batch, given up after its last or on any
    way out of the task."""

    def __init__(self, lock: threading.Lock):
        self.lock, self.held = lock, False

    def take(self) -> None:
        if not self.held:
            self.lock.acquire()
            self.held = True

    def give_up(self) -> None:
        if self.held:
            self.held = False
            self.lock.release()

    def __enter__(self) -> _Turn:
        return self

    def __exit__(self, *exc) -> None:
        self.give_up()


def _concat(parts: list[tuple[np.ndarray, np.ndarray | None]]) -> tuple[np.ndarray, np.ndarray | None]:
    """One (stored, scales) pair from the batches of a shard."""
    stored = np.concatenate([part[0] for part in parts])
    return stored, None if parts[0][1] is None else np.concatenate([part[1] for part in parts])


def _steps_in(images: torch.Tensor | list[tuple[torch.Tensor, tuple[int, int]]]) -> int:
    """Steps in a batch: preprocessed images [B, ...], or each episode piece's host frames [T, ...]."""
    return len(images) if isinstance(images, torch.Tensor) else sum(len(host) for host, _ in images)


def _log_progress(run: str, steps: int) -> None:
    """Tell the client that `steps` more steps were computed (moves its progress bar per batch)."""
    try:
        get_worker().log_event(f"sfcache-progress-{run}", steps)
    except ValueError:  # not inside a Dask worker (direct calls): no one to tell
        pass


def _shard_text(cache, shard: int) -> str:
    """'shard S (rows a-b: episode K steps i-j, ...)': where a task failed, in the user's terms."""
    if cache is None:
        return f"shard {shard}"
    rows = cache.shard_rows(shard)
    pieces = cache.index.pieces(rows.start, rows.stop)
    steps = ", ".join(f"episode {key} steps {a}-{b - 1}" for key, a, b in pieces[:3])
    more = f" and {len(pieces) - 3} more episodes" if len(pieces) > 3 else ""
    return f"shard {shard} (rows {rows.start}-{rows.stop - 1}: {steps}{more})"


def _cause(error: BaseException, batch_size: int | None = None) -> str:
    """The cause of an unexpected task failure in one line; running out of memory names the options that lower it."""
    first = (str(error).strip().splitlines() or [""])[0]
    text = f"{type(error).__name__}: {first}" if first else type(error).__name__
    lowered = first.lower()
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)) or any(
        words in lowered for words in ("out of memory", "can't allocate memory", "cannot allocate memory")
    ):
        return (
            f"out of memory ({text}); lower --batch-size{'' if batch_size is None else f' (now {batch_size})'} "
            "(steps per VGGT forward pass), "
            "or --steps-per-shard (a shard's targets are held until written)"
        )
    return text


def _error_fields(error: SourceError) -> dict:
    return {"file": error.file, "what": error.what, "episode": error.episode, "key": error.key, "message": str(error)}


@contextmanager
def _prefetch(items: Iterator, depth: int):
    """Run `items` in a background thread, `depth` ahead; exceptions re-raise in the consumer."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    closing = threading.Event()
    finished = object()

    def produce():
        try:
            for item in items:
                while not closing.is_set():
                    try:
                        buffer.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if closing.is_set():
                    return
        except BaseException as error:  # handed to the consumer, raised there
            buffer.put((None, error))
            return
        buffer.put((finished, None))

    def consume():
        while True:
            item, error = buffer.get()
            if error is not None:
                raise error
            if item is finished:
                return
            yield item

    thread = threading.Thread(target=produce, name="sfcache-read", daemon=True)
    thread.start()
    try:
        yield consume()
    finally:
        closing.set()
        while thread.is_alive():
            try:
                buffer.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()


def _run_task(plugin: str, shards: list[int]) -> dict:
    return get_worker().plugins[plugin].run(shards)


def _sample_task(plugin: str, episodes: list, rows: list[int]) -> tuple[dict[int, np.ndarray], np.ndarray | None]:
    return get_worker().plugins[plugin].sample(episodes, rows)


def _worker_facts(plugin: str, dask_worker=None) -> dict:
    return dask_worker.plugins[plugin].facts()


def _host(address: str) -> str:
    return urlsplit(address).hostname or address


def _keep_freed_memory() -> None:
    """Undo the MALLOC_TRIM_THRESHOLD_=65536 that Dask's nanny gives workers (glibc only).

    Setting it pins glibc's mmap threshold at 128 KiB, so every activation tensor is mmap'ed,
    page-faulted and unmapped again on each forward pass: the tiny VGGT ran 2.2x slower on CPU.
    Large trim and mmap thresholds (32 MiB is glibc's maximum) let freed blocks be reused.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    except (OSError, AttributeError):  # not glibc: nothing to undo
        pass


def torch_threads(workers_on_host: int) -> int:
    """Intra-op threads for one worker: its share of the cores it may run on (a SLURM/cgroup allocation,
    not the whole node), less one for its reader and writer threads. Dask sets OMP_NUM_THREADS=1 in
    workers, too few for CPU inference and preprocessing; more threads than cores is far worse (OpenMP
    threads spin-waiting on preempted peers made the tiny model 10x slower on 2 shared cores)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // workers_on_host - 1)


def _workers_per_host(client: Client) -> dict[str, int]:
    return dict(Counter(_host(address) for address in client.scheduler_info(n_workers=-1)["workers"]))


# ----------------------------------------------------------------------------- client side


def extract(cfg: ExtractConfig, progress: bool = True) -> ExtractSummary:
    """Extract every selected step into `cfg.out`, resuming shards already done; returns what it did.

    Raises SourceError (bad data, unless skip_bad), StoreError (lock, write failure),
    ConfigMismatch (store made differently), WeightsError.
    """
    if cfg.vggt is None:
        raise SfcacheError(
            "--vggt is needed to extract: a checkpoint path, facebook/VGGT-1B, or random:tiny for a test "
            "(--dry-run sizes the store without it)"
        )
    started = time.perf_counter()
    source, recipe, layout = _open(cfg, Path(cfg.source).resolve())
    infos = _select(source, cfg)
    with lock_store(cfg.out), store_run(cfg.out) as run, ExitStack() as stack:
        _remove_stop_file(cfg.out)
        cluster_started = time.perf_counter()
        cluster = _connect(cfg, stack)
        job = _Job(
            source=source,
            weights=cfg.vggt,
            device=cluster.device,
            recipe=recipe,
            layout=layout,
            **same_fields(cfg, ("layers", "grid", "preprocess", "compute_dtype", "batch_size", "skip_bad")),
            store=cfg.out.resolve(),
            workers_per_host=_workers_per_host(cluster.client),
            run=run,
            tasks_in_flight=TASKS_IN_FLIGHT,
        )
        _check_shared_store(cluster, job)
        plugin, facts, devices = _load_models(cluster.client, job, cfg, stack)
        cluster_seconds = time.perf_counter() - cluster_started
        config = VGGTConfig.from_dict(facts["config"])
        layers = resolve_layers(cfg.layers, config.depth, "--layers", distinct=True)
        native, aspect = _native_grid(source, infos, cfg.preprocess, config)
        store_config = StoreConfig(
            episodes=pack_episodes(infos),
            layers=layers,
            grid=cfg.grid or native,
            native_grid=native,
            aspect_ratio=aspect,
            views=layout,
            channels=config.out_channels,
            vggt={"weights": cfg.vggt, **facts, "preprocess": cfg.preprocess},
            source=source.describe(),
            recipe=recipe.name,
            token_mask=recipe.token_mask,
            **same_fields(cfg, ("dtype", "codec", "checksum", "steps_per_shard")),
            selection=cfg.episodes,
        )
        _check_shard_size(store_config, cfg)
        fitted, k = "none", parse_reduce(cfg.reduce)
        if isinstance(k, int) and k > config.out_channels:  # before computing any sample
            raise SfcacheError(
                f"--reduce pca:{k}: this VGGT's targets have {config.out_channels} channels; "
                f"choose K <= {config.out_channels}"
            )
        if k is not None:
            store_config = replace(
                store_config, reduce=Reduction(request(cfg.reduce, cfg.min_cosine, store_config.num_steps))
            )
            reduction = resumable_reduction(cfg.out, store_config, cfg.overwrite)
            fitted = "reused" if reduction is not None else "fitted"
            reduction = reduction or _fit_basis(cluster, plugin, store_config, cfg.batch_size, progress, cfg.out)
            check_fidelity(reduction)
            store_config = replace(store_config, reduce=reduction)
        cache = create_store(cfg.out, store_config, overwrite=cfg.overwrite)
        repaired = _repair(cache, cfg.repair)
        pending = [int(s) for s in np.flatnonzero(~cache.done_shards())]
        outcome = _run_shards(cluster, cache, plugin, pending, progress, cfg.skip_bad, run)
    final = open_cache(cfg.out)
    extracted = _steps_of(final, list(outcome["written"]))
    return ExtractSummary(
        store=str(cfg.out),
        format=source.format,
        views=list(layout),
        recipe=recipe.name,
        layers=list(layers),
        episodes=len(infos),
        steps=final.num_steps,
        shards_done=int(final.done_shards().sum()),
        shards=final.num_shards,
        extracted_steps=extracted,
        adopted_steps=_steps_of(final, outcome["adopted"]),
        already_done_steps=_steps_of(final, np.flatnonzero(final.done_shards()).tolist()) - extracted,
        failed=outcome["failed"],
        repaired=repaired,
        run=run,
        skipped_episodes=[str(e) for e in source.skipped],
        basis=fitted,
        reduce=final.attrs["targets"].get("reduce"),
        missing_episodes=final.missing_episodes(),
        workers=cluster.workers,
        device=devices,
        weights_id=final.provenance.vggt.weights_id,
        cluster_startup_s=round(cluster_seconds, 3),
        extract_s=round(outcome["seconds"], 3),
        steps_per_s=round(extracted / outcome["seconds"], 3) if outcome["seconds"] else 0.0,
        total_s=round(time.perf_counter() - started, 3),
    )


def _check_shard_size(config: StoreConfig, cfg: ExtractConfig) -> None:
    """Refuse, before any task, a shard too large for a worker's memory (it holds a shard's targets until written:
    in the stored dtype, or float32 at full C with --reduce, projected only at the write)."""
    held = cfg.dtype if parse_reduce(cfg.reduce) is None else "float32"
    tokens = config.grid[0] * config.grid[1]
    per_step = step_bytes(len(config.views), tokens, config.channels, held, len(config.layers), config.token_mask)
    steps = min(cfg.steps_per_shard, config.num_steps)
    if per_step * steps > MAX_SHARD_BYTES:
        raise SfcacheError(
            f"--steps-per-shard {cfg.steps_per_shard} with --grid {_show_grid(config.grid)}: a shard would hold "
            f"{per_step * steps / 2**30:.1f} GiB of targets ({per_step / 2**20:.1f} MiB per step of {held}), kept "
            f"in a worker's memory until written; keep it under {MAX_SHARD_BYTES >> 30} GiB (lower --steps-per-shard "
            "or --grid)"
        )


def _fit_basis(
    cluster: _Cluster, plugin: str, config: StoreConfig, batch_size: int, progress: bool, store: Path
) -> Reduction:
    """Fit the PCA basis on the workers' exact targets of the sample rows (sfcache.reduce.sample_rows).

    One task per batch of `batch_size` sample rows; results are folded in submission order, so the
    float64 sums and the basis are the same whatever the number of workers or the finishing order.
    """
    fit_rows, held_rows = sample_rows(config.num_steps)
    rows = np.union1d(fit_rows, held_rows)
    episodes = [list(e) for e in config.episodes]
    futures = [
        cluster.client.submit(
            _sample_task,
            plugin,
            episodes,
            rows[i : i + batch_size].tolist(),
            key=f"sfcache-fit-{int(rows[i])}-{plugin}",
            resources=cluster.task_resources,
            retries=2,
            pure=False,
        )
        for i in range(0, rows.size, batch_size)
    ]
    moments = {layer: Moments(config.channels) for layer in config.layers}
    held: dict[int, list] = {layer: [] for layer in config.layers}
    held_masks: list = []
    bar = progress_bar("steps") if progress else None
    with bar or nullcontext(), _cancelled_on_exit(cluster.client, futures):
        task = bar.add_task("fit basis", total=int(rows.size)) if bar else None
        for start, future in zip(range(0, rows.size, batch_size), futures):
            targets, mask = _task_report(future, cluster, store)  # a lost scheduler or dying workers: one line
            batch = rows[start : start + batch_size]
            is_held = np.isin(batch, held_rows)
            for layer, values in targets.items():
                moments[layer].add(valid_tokens(values[~is_held], None if mask is None else mask[~is_held]))
                held[layer].append(values[is_held])
            held_masks.append(None if mask is None else mask[is_held])
            if bar:
                bar.advance(task, len(batch))
    masks = None if held_masks[0] is None else np.concatenate(held_masks)
    return fit(
        config.reduce.request, moments, {layer: (np.concatenate(v), masks) for layer, v in held.items()}, config.dtype
    )


@contextmanager
def _cancelled_on_exit(client: Client, futures: list):
    """Cancel what is left of `futures` when the block ends early (an error, an interrupt)."""
    try:
        yield
    finally:
        pending = [f for f in futures if not f.done()]
        if pending:
            try:
                client.cancel(pending)
            except Exception:  # noqa: BLE001  the scheduler may be gone; nothing is left to cancel then
                pass


def _steps_of(cache, shards: list[int]) -> int:
    return sum(cache.shard_rows(s).stop - cache.shard_rows(s).start for s in shards)


def _open(cfg: ExtractConfig, path: Path) -> tuple[Source, Recipe, tuple[str, ...]]:
    """The source as the recipe reads it (decode), the recipe, and the VGGT slot layout."""
    recipe = get_recipe(cfg.recipe)
    source = open_source(path, cfg.format, camera_views(cfg.views), skip_bad=cfg.skip_bad)
    source.jpeg_fast_dct = recipe.jpeg_fast_dct
    return source, recipe, slot_layout(recipe, cfg.views, source.views)


def _select(source: Source, cfg: ExtractConfig) -> list:
    infos = source.episodes()
    if cfg.episodes is not None:
        infos = [info for info in infos if fnmatch.fnmatchcase(info.key, cfg.episodes)]
    if not infos:
        what = f"no episode key matches --episodes {cfg.episodes!r}" if cfg.episodes else "no episodes"
        if source.skipped and not cfg.episodes:
            what = (
                f"every episode is bad: all {len(source.skipped)} were skipped by --skip-bad, the first "
                f"because {source.skipped[0]}"
            )
        raise SourceError(cfg.source, f"{what} (expected at least one)")
    return infos


@dataclass(frozen=True)
class _Cluster:
    client: Client
    address: str  # the scheduler's, for messages
    workers: int
    device: str  # what each worker uses: cpu | cuda | cuda:N, the same on every worker
    task_resources: dict | None  # a GPU's share (GPU_SHARE) when every worker advertises a GPU resource


def _connect(cfg: ExtractConfig, stack: ExitStack) -> _Cluster:
    """A Dask client: the given scheduler, or a local cluster of one worker per GPU or N CPU workers."""
    if cfg.scheduler:
        try:
            client = Client(cfg.scheduler, timeout="30s")
        except OSError as error:
            raise SfcacheError(f"cannot reach Dask scheduler {cfg.scheduler}: {error}") from None
        stack.callback(_close_client, client)
        _wait_for_workers(client, cfg.scheduler)
        infos = client.scheduler_info(n_workers=-1)["workers"].values()
        gpus = min(client.run(torch.cuda.device_count).values())
        if cfg.device.startswith("cuda") and not gpus:
            raise SfcacheError(f"--device {cfg.device}, but some workers of {cfg.scheduler} have no GPU")
        device = resolve_device(cfg.device, gpus)
        gpu_resources = all(info.get("resources", {}).get("GPU", 0) >= 1 for info in infos)
        return _Cluster(
            client,
            cfg.scheduler,
            len(infos),
            str(device),
            GPU_SHARE if device.type == "cuda" and gpu_resources else None,
        )
    device = resolve_device(cfg.device)
    gpus = _visible_gpus() if device.type == "cuda" else []
    if device.index is not None:  # cuda:N: that GPU alone, which its worker then sees as its only one
        gpus = [gpus[device.index]]
    workers = cfg.workers or (len(gpus) if gpus else 1)
    if gpus:
        if workers > len(gpus):
            raise SfcacheError(f"--workers {workers} asks for more GPU workers than the {len(gpus)} GPUs visible")
        specs = {f"gpu{g}": _worker_spec({"CUDA_VISIBLE_DEVICES": g}, {"GPU": 1}) for g in gpus[:workers]}
    else:
        specs = {f"cpu{i}": _worker_spec({}, {}) for i in range(workers)}
    with _interrupts_after_start():
        local = stack.enter_context(
            SpecCluster(
                scheduler={
                    "cls": Scheduler,
                    "options": {"host": "127.0.0.1", "dashboard": False, "dashboard_address": ":0"},
                },
                workers=specs,
                silence_logs=logging.CRITICAL,
                name="sfcache",
            )
        )
        client = stack.enter_context(Client(local))
    client.wait_for_workers(workers, timeout=600)
    return _Cluster(client, local.scheduler_address, workers, device.type, GPU_SHARE if gpus else None)


@contextmanager
def _interrupts_after_start() -> Iterator[None]:
    """Start local worker processes with SIGINT and SIGHUP blocked: they inherit the mask of the thread that starts
    them (Dask's loop thread, started here) and keep it, so Ctrl-C in a terminal, which reaches the whole process
    group, never reaches them; only this client acts on it (stop the tasks, release the lock) instead of every
    worker printing a KeyboardInterrupt traceback. A signal that arrives meanwhile is acted on once the cluster is
    up (`interrupts_deferred`), so that the stack holding the cluster then closes it."""
    quiet = {signal.SIGINT, signal.SIGHUP}
    with interrupts_deferred():
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, quiet)
        try:
            resource_tracker.ensure_running()  # started by Dask, it would unblock SIGINT in the thread starting workers
            signal.pthread_sigmask(signal.SIG_BLOCK, quiet)  # ... as ensure_running just did here
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # one pending here is noted now


def _close_client(client: Client) -> None:
    """Disconnect without waiting out Dask's reconnect attempts when the scheduler is gone."""
    try:
        client.close(timeout=5 if client.status == "running" else 0.5)
    except Exception:  # already closed or unreachable: nothing left to release
        pass


def _wait_for_workers(client: Client, address: str) -> None:
    """Wait up to WORKER_WAIT_S for a worker to join a running scheduler, saying so after a few seconds."""
    first = min(5, WORKER_WAIT_S)
    try:
        client.wait_for_workers(1, timeout=first)
        return
    except TimeoutError:
        pass
    logging.getLogger("sfcache").warning("waiting for a Dask worker to join %s ...", address)
    try:
        client.wait_for_workers(1, timeout=max(WORKER_WAIT_S - first, 0.01))
    except TimeoutError:
        raise SfcacheError(
            f"the Dask scheduler {address} has no workers after {WORKER_WAIT_S} s; start some with "
            f"`dask worker {address}` (on machines that see --out at the same path), then run "
            "again"
        ) from None
    except (CancelledError, CommClosedError, OSError) as error:
        raise _lost_scheduler(address, error) from None


def _worker_spec(env: dict, resources: dict) -> dict:
    """One worker process with a Dask thread per task in flight (the model saturates its device; the
    reader and writer threads live inside the plugin)."""
    return {
        "cls": Nanny,
        "options": {
            "nthreads": TASKS_IN_FLIGHT,
            "env": env,
            "resources": resources,
            "memory_limit": 0,
            "silence_logs": logging.CRITICAL,
        },
    }


def _visible_gpus() -> list[str]:
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def _load_models(client: Client, job: _Job, cfg: ExtractConfig, stack: ExitStack) -> tuple[str, dict, str]:
    """Register the plugin (each worker loads VGGT once); every worker must have loaded the same weights,
    architecture and precision. Returns (plugin name, provenance facts, the workers' devices)."""
    name = f"sfcache-vggt-{uuid.uuid4().hex[:12]}"
    try:
        client.register_plugin(VGGTWorker(job, name), name=name)
    except WeightsError:
        raise
    except Exception as error:  # a worker-side load failure that is not ours: name it, no traceback
        raise WeightsError(
            f"{cfg.vggt}: loading VGGT on the workers failed ({type(error).__name__}: {error})"
        ) from None
    stack.callback(_unregister, client, name)
    facts = list(client.run(_worker_facts, name).values())
    provenance = [{k: f[k] for k in ("weights_id", "config", "compute_dtype")} for f in facts]
    if any(p != provenance[0] for p in provenance):
        raise SfcacheError(
            f"Dask workers disagree on the model they loaded (weights, config or precision): {provenance}"
        )
    return name, provenance[0], ", ".join(sorted({f["device"] for f in facts}))


def _unregister(client: Client, name: str) -> None:
    if client.status != "running":  # the scheduler is gone (Dask is trying to reconnect): nothing to free
        return
    try:
        client.unregister_worker_plugin(name)
    except Exception:  # the cluster may already be gone; nothing to free then
        pass


def _native_grid(source: Source, infos: list, mode: str, config: VGGTConfig) -> tuple[tuple[int, int], float]:
    """VGGT's patch grid and the image aspect ratio for these frames, from one preprocessed step."""
    frames = source.read(infos[0].key, 0, 1).frames
    height, width = preprocess(frames, mode, config.img_size).shape[-2:]
    return (height // config.patch_size, width // config.patch_size), width / height


def _run_shards(
    cluster: _Cluster, cache, plugin: str, pending: list[int], progress: bool, skip_bad: bool, run: str = ""
) -> dict:
    """Submit shard-range tasks, advance the bar per batch, confirm and mark done each task's shards as its report
    comes in, stop everything cleanly on a failure.

    Returns {"failed", "written": {shard: {"host", "store", "digests"}} (confirmed and done), "adopted": [shards
    written by an earlier attempt, confirmed now], "seconds"}.
    """
    per_task = max(1, min(MAX_SHARDS_PER_TASK, -(-len(pending) // (cluster.workers * TASKS_PER_WORKER))))
    groups = _consecutive_groups(pending, per_task)
    started = time.perf_counter()
    futures = [
        cluster.client.submit(
            _run_task,
            plugin,
            group,
            key=f"sfcache-shards-{group[0]}-{group[-1]}-{plugin}",
            resources=cluster.task_resources,
            retries=2,
            pure=False,
        )
        for group in groups
    ]
    outcome: dict = {"failed": [], "written": {}, "adopted": []}
    unconfirmed: list[tuple] = []  # (shard, file, how, where) of written shards this client cannot read back
    total = _steps_of(cache, pending)
    bar = progress_bar("steps") if progress else None
    topic = f"sfcache-progress-{run}"
    interrupted = False
    try:
        with bar or nullcontext():
            task = bar.add_task("extract", total=total) if bar else None
            if bar:
                cluster.client.subscribe_topic(topic, lambda event: bar.advance(task, event[1]))
            for future in as_completed(futures):
                report = _task_report(future, cluster, cache.path)
                outcome["failed"] += report["failed"]
                written = {
                    int(shard): {"host": report["host"], "store": report["store"], "digests": digests}
                    for shard, digests in report["written"].items()
                }
                try:
                    bad = _confirm_written(cache, written)
                except StoreError:  # the store turned unwritable: the task's own write error says more
                    if not report["error"]:
                        raise
                    bad = [(shard, DONE_ARRAY, "not marked done", written[shard]) for shard in written]
                unconfirmed += bad
                outcome["written"].update({s: w for s, w in written.items() if s not in {b[0] for b in bad}})
                outcome["adopted"] += [int(shard) for shard in report.get("adopted", [])]
                if bar:  # per-batch events may count a batch twice after a worker death: settle on shards
                    bar.update(
                        task,
                        completed=min(total, max(bar.tasks[0].completed, _steps_of(cache, list(outcome["written"])))),
                    )
                if report["error"]:
                    raise _task_error(futures, report, cache.path)
                if report["failed"] and not skip_bad:
                    first = report["failed"][0]
                    raise SourceError(
                        first["file"],
                        f"{first['what']} (shard {first['shard']} left not done)",
                        episode=first["episode"],
                        key=first["key"],
                    )
    except (KeyboardInterrupt, Interrupted):
        interrupted = True
        raise
    except _LostScheduler:  # nothing to stop from here; the run fence stops what still runs out there
        raise
    except BaseException:
        _stop_tasks(cache.path, cluster.client, futures, STOP_WAIT_S)
        raise
    finally:
        if interrupted:
            _stop_tasks(cache.path, cluster.client, futures, INTERRUPT_WAIT_S)
        if bar:
            _unsubscribe(cluster.client, topic)
    if unconfirmed:
        raise _unconfirmed_error(cache, unconfirmed)
    return {**outcome, "seconds": time.perf_counter() - started}


def _task_report(future, cluster: _Cluster, store: Path) -> dict:
    """A finished task's report; a lost scheduler, a worker dying again and again, or anything else a task raised
    as one SfcacheError (the traceback of an unexpected error goes to the store's error log)."""
    try:
        return future.result()
    except KilledWorker as error:
        raise SfcacheError(
            f"a Dask worker died repeatedly running shards ({error}); finished shards "
            "are kept, run the same command again to resume"
        ) from None
    except (CancelledError, CommClosedError, OSError, TimeoutError) as error:
        if future.status == "error":  # the task's own exception (a worker's file error), not the connection
            raise SfcacheError(
                f"an extraction task failed on its worker ({type(error).__name__}: {error}); "
                "finished shards are kept, fix the cause and run the same command again"
            ) from None
        raise _lost_scheduler(cluster.address, error) from None
    except SfcacheError:  # an expected error raised on a worker: already one line
        raise
    except Exception as error:  # noqa: BLE001  anything else a task raised outside its own handling
        trace = "".join(traceback.format_exception(type(error), error, future.traceback()))
        raise SfcacheError(
            f"{_task_name(future.key)} failed on its worker ({_cause(error)}); finished "
            f"shards are kept; full traceback in {_write_error_log(store, trace)}"
        ) from None


def _task_name(key) -> str:
    """What a task key names: 'the task of shards a-b', 'the basis sample task from row r'."""
    parts = str(key).split("-")
    if str(key).startswith("sfcache-shards-"):
        return f"the task of shards {parts[2]}-{parts[3]}"
    if str(key).startswith("sfcache-fit-"):
        return f"the basis sample task from row {parts[2]}"
    return f"task {key}"


def _task_error(futures: list, report: dict, store: Path) -> SfcacheError:
    """The failure of the lowest shard among the tasks finished so far (the first to fix), as one line; an
    unexpected error's traceback is written to the store's error log, which the line names."""
    first = _first_error(futures, report)
    if not first.get("traceback"):
        return StoreError(first["error"])
    log = _write_error_log(store, first["traceback"])
    return SfcacheError(
        f"{first['error']}; finished shards are kept, fix the cause and run the same command again; full "
        f"traceback in {log}"
    )


def _write_error_log(store: Path, text: str) -> Path:
    """Append a traceback to STORE/ERROR_LOG (a temporary file when the store is not writable); its path."""
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    for log in (store / ERROR_LOG, Path(tempfile.gettempdir()) / f"sfcache-error-{os.getpid()}.log"):
        try:
            with open(log, "a") as handle:
                handle.write(f"--- {stamp} sfcache {__version__}\n{text}\n")
            return log
        except OSError:
            continue
    return Path(tempfile.gettempdir())


class _LostScheduler(SfcacheError):
    """The client lost its Dask scheduler."""


def _lost_scheduler(address: str, error: BaseException) -> SfcacheError:
    reason = (str(error).strip().splitlines() or [""])[0]
    return _LostScheduler(
        f"lost the Dask scheduler {address} ({type(error).__name__}: {reason}); finished shards "
        "are kept: start the scheduler and its workers again (or pass another --scheduler) and run "
        "the same command to resume"
    )


def _first_error(futures: list, report: dict) -> dict:
    """The report of the lowest failed shard among the tasks finished so far (the first to fix)."""
    errors = [report]
    for future in futures:
        if future.status == "finished":
            try:
                other = future.result(timeout=1)
            except Exception:  # a failed or lost task has no report to offer
                continue
            if other.get("error"):
                errors.append(other)
    return min(errors, key=lambda r: r.get("error_shard", 1 << 62))


def _unsubscribe(client: Client, topic: str) -> None:
    if client.status != "running":
        return
    try:
        client.unsubscribe_topic(topic)
    except Exception:  # the cluster may already be gone
        pass


def _stop_tasks(store: Path, client: Client, futures: list, timeout: float) -> None:
    """Make running tasks finish their current shard and queued ones return at once, then wait for them
    (at most `timeout` s, saying so after STOP_SAY_S, and not at all once no worker is left to run them),
    so that no task writes after the lock is released; the run fence stops any straggler from writing once
    this run has ended. Never raises: the error that stopped the run is the one to report."""
    try:
        (store / STOP_NAME).touch()
    except OSError:  # a read-only store: running tasks stop at their next failing write instead
        pass
    started = time.monotonic()
    said = False
    try:
        while any(not future.done() for future in futures) and time.monotonic() - started < timeout:
            if not client.scheduler_info(n_workers=-1)["workers"]:
                break  # nothing can run them: the fence covers whatever a worker that comes back would do
            if not said and time.monotonic() - started > STOP_SAY_S:
                busy = sum(not future.done() for future in futures)
                logging.getLogger("sfcache").warning(
                    "waiting up to %.0f s for %d running task(s) to finish their current shard ...", timeout, busy
                )
                said = True
            try:
                wait(futures, timeout=1)
            except TimeoutError:
                pass
    except BaseException:  # noqa: BLE001  a dead cluster or a second Ctrl-C: the fence covers the rest
        pass
    finally:
        for future in futures:
            try:
                future.cancel()
            except Exception:  # noqa: BLE001  the cluster is gone
                pass
        try:
            _remove_stop_file(store)
        except StoreError:  # left for the next run's start-up, which removes it or says why it cannot
            pass


def _remove_stop_file(store: Path) -> None:
    """Remove the stop request; checked first, since a read-only file system refuses even an absent file's unlink."""
    stop = store / STOP_NAME
    try:
        if stop.exists():
            stop.unlink()
    except FileNotFoundError:
        pass
    except OSError as err:
        raise StoreError(f"{stop}: cannot remove ({err.strerror}); --out must be writable") from None


def _check_shared_store(cluster: _Cluster, job: _Job) -> None:
    """Every worker must see the store the client locked, at the same absolute path (its run marker)."""
    try:
        views = cluster.client.run(_store_view, str(job.store), job.run)
    except (CancelledError, CommClosedError, OSError, TimeoutError) as error:
        raise _lost_scheduler(cluster.address, error) from None
    for address, (host, problem) in sorted(views.items()):
        if problem:
            raise StoreError(
                f"{job.store}: the Dask worker {address} on host {host} does not see this store "
                f"({problem}); --out must be on a file system shared by this client and every worker, "
                "at the same absolute path"
            )


def _store_view(store: str, run: str) -> tuple[str, str]:
    """(host, "" when this worker reads this run's id from the store's run marker, else what it finds)."""
    marker = Path(store) / RUN_NAME
    try:
        found = marker.read_text()
    except OSError as err:
        return socket.gethostname(), f"{marker}: {err.strerror}"
    return socket.gethostname(), "" if found == run else f"{marker} holds {found[:40]!r}, not this run's id"


def _repair(cache, full: bool) -> list[dict]:
    """Clear the done flags of done shards this client cannot read back, so that this run redoes them.

    Always: a shard file that is missing. With `full` (--repair): every done shard's files are also compared with
    the digests recorded when they were written (any changed byte, or another shard's file in its place), then
    decoded (checksums, when the store has them) and checked for NaN/Inf.
    """
    broken = {shard: f"{file} is missing" for shard, file in cache.missing_shard_files().items()}
    if full:
        for shard in np.flatnonzero(cache.done_shards()).tolist():
            problem = None if shard in broken else cache.digest_problem(shard)
            if problem:
                broken[shard] = problem
            for layer in () if shard in broken else cache.layers:
                try:
                    values = cache.read_rows(cache.shard_rows(shard), layer=layer)
                except StoreError as error:
                    broken[shard] = str(error)
                    break
                if not np.isfinite(values).all():
                    broken[shard] = f"layer {layer} holds NaN or Inf"
                    break
    if broken:
        cache.mark_not_done(sorted(broken))
    return [{"shard": shard, "why": why} for shard, why in sorted(broken.items())]


def _confirm_written(cache, written: dict[int, dict]) -> list[tuple]:
    """Mark done the shards a task wrote whose files read back, from this client's view of the file system, with
    the digests the worker reported and recorded; the others are reset (redone by the next run) and returned as
    (shard, file, how, where it was written) for `_unconfirmed_error`."""
    good, bad = [], []
    for shard in sorted(written):
        ours, theirs = cache.shard_digests(shard), written[shard]["digests"]
        if ours == theirs == cache.recorded_digests(shard):
            good.append(shard)
            continue
        file = next((f for f in theirs if ours.get(f) != theirs[f]), DIGESTS_ARRAY)
        how = "missing" if ours.get(file) is None else "different"
        if file == DIGESTS_ARRAY:
            how = "different from its recorded digest"
        bad.append((shard, file, how, written[shard]))
    if bad:
        cache.mark_not_done([shard for shard, *_ in bad])
    cache.mark_done(good)
    return bad


def _unconfirmed_error(cache, bad: list[tuple]) -> StoreError:
    """Written shards this client could not read back: the first one named with the worker's host and path."""
    shard, file, how, where = bad[0]
    return StoreError(
        f"{cache.path / file}: shard {shard} was written by the Dask worker on host {where['host']} at "
        f"{Path(where['store']) / file}, but this client finds it {how}; {len(bad)} shard(s) left not "
        "done. --out must be on a file system shared by this client and every worker (not a job's "
        "private /tmp); fix that and run the same command again to redo them"
    )


def _consecutive_groups(shards: list[int], size: int) -> list[list[int]]:
    """Runs of consecutive shard ids, at most `size` each (consecutive shards share episode reads)."""
    groups: list[list[int]] = []
    for shard in shards:
        if groups and len(groups[-1]) < size and groups[-1][-1] == shard - 1:
            groups[-1].append(shard)
        else:
            groups.append([shard])
    return groups


# ----------------------------------------------------------------------------- dry run


def plan(cfg: ExtractConfig) -> dict:
    """What `extract` would do, without Dask or a model forward: episodes, steps, shards, store size, and the
    device (resolved here as the local run does, so a GPU that is not there fails the dry run too; a --scheduler's
    workers resolve it themselves)."""
    device = cfg.device if cfg.scheduler else str(resolve_device(cfg.device))
    source, recipe, layout = _open(cfg, Path(cfg.source))
    infos = _select(source, cfg)
    config = weights_config(cfg.vggt) if cfg.vggt else PRESETS["vggt-1b"]  # no --vggt: the model SF uses
    layers = resolve_layers(cfg.layers, config.depth, "--layers", distinct=True)
    native, _ = _native_grid(source, infos, cfg.preprocess, config)
    grid = cfg.grid or native
    steps = sum(info.num_steps for info in infos)
    k = parse_reduce(cfg.reduce)  # pca:auto's K is known only after the fit: counted at full width here
    per_step = step_bytes(
        len(layout),
        grid[0] * grid[1],
        k if isinstance(k, int) else config.out_channels,
        cfg.dtype,
        len(layers),
        recipe.token_mask,
    )
    frame = source.read(infos[0].key, 0, 1).frames.shape[2:4]
    return {
        "format": source.format,
        "source": str(cfg.source),
        "recipe": recipe.name,
        "views": list(layout),
        "frame_size": list(frame),
        "episodes": len(infos),
        "steps": steps,
        "skipped_episodes": [str(e) for e in source.skipped],
        "layers": list(layers),
        "grid": list(grid),
        "channels": config.out_channels,
        "dtype": cfg.dtype,
        "codec": cfg.codec,
        "reduce": cfg.reduce,
        "vggt": cfg.vggt,  # None: not given; the sizes are VGGT-1B's
        "device": device,
        "shards": -(-steps // cfg.steps_per_shard),
        "bytes_per_step": per_step,
        "store_bytes_uncompressed": per_step * steps,
    }
