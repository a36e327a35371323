"""The Dask worker side of extraction: a plugin holding VGGT once per worker process, running shard tasks.

A task owns whole shards, so no two writers ever touch one shard file; inside a task a reader thread decodes and
preprocesses the next batch while the model runs, and the worker's writer thread writes the previous shard. Two
tasks are in flight per worker, one at a time on the model, so the next task's first batches are read while this
one computes and its compute hides this one's last write. Batches start at shard boundaries, so a step's target
never depends on which task or which run computed it: a resumed store equals an uninterrupted one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import queue
import socket
import threading
import traceback
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch
from distributed import WorkerPlugin, get_worker

from sfcache.device import HostCopy, encode_on_device, pinned, to_device
from sfcache.errors import Message, SfcacheError, SourceError
from sfcache.extract.control import STOP_NAME
from sfcache.extract.report import ShardFailure, TaskReport, cause
from sfcache.pooling import pooled_targets
from sfcache.recipes import Recipe, recipe_inputs
from sfcache.rows import RowIndex
from sfcache.sources import Source
from sfcache.store import current_run, is_locked, open_cache
from sfcache.vggt import load_vggt
from sfcache.vggt.preprocess import device_images, output_size

LEASE_CHECK_S = 2.0  # how often a worker's plugin checks that its client still holds the store
LEASE_MISSES = 2  # ... and how many checks in a row must find it gone before the plugin removes itself
TASKS_IN_FLIGHT = 2  # per worker: one on the model, the next reading its first batches (VGGTWorker.run)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


@dataclass(frozen=True)
class Job:
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

    def __init__(self, job: Job, name: str):
        self.job, self.name = job, name
        self.model = None

    def setup(self, worker=None):
        self.expired = threading.Event()  # set when the plugin is torn down or its client is gone
        self.model_turn = threading.Lock()  # one task's batches on the model at a time
        self.slots = threading.BoundedSemaphore(self.job.tasks_in_flight)  # bounds prefetched memory
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="sfcache-write")  # shards in order, no contention
        sharing = self.job.workers_per_host.get(host_of(worker.address), 1) if worker is not None else 1
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

    def run(self, shards: list[int]) -> TaskReport:
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

    def _run(self, shards: list[int]) -> TaskReport:
        report = TaskReport(host=socket.gethostname(), store=os.path.realpath(self.job.store))
        shard, cache = shards[0], None  # the shard being worked on, for the message of an unexpected error
        pending: deque = deque()  # (shard, its write on the writer thread)
        try:
            cache = open_cache(self.job.store, mode="r+")
            index = cache.index
            todo = [s for s, done in zip(shards, cache.done_shards(shards)) if not done]
            for shard in list(todo):  # written by an earlier attempt (a dead worker or client), never confirmed
                recorded = cache.recorded_digests(shard)
                if recorded is not None and cache.shard_digests(shard) == recorded:
                    report.written[shard] = recorded  # the client confirms it: nothing to recompute
                    report.adopted.append(shard)
                    todo.remove(shard)
            with (
                _prefetch(self._batches(cache, index, todo, self.job.store / STOP_NAME), depth=2) as batches,
                _Turn(self.model_turn) as model,
            ):
                outputs: list[tuple[HostCopy, np.ndarray | None]] = []
                for shard, inputs, last in batches:
                    if isinstance(inputs, SourceError):
                        outputs = []
                        report.failed.append(ShardFailure.of(shard, inputs))
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
                    if report.error:
                        break
                model.give_up()
                while pending:
                    self._collect(pending.popleft(), report, cache)
        except Exception as error:  # noqa: BLE001  any other failure: one line for the client, the traceback beside
            self._fail(report, shard, error, cache)
            while pending:  # shards written before it still count
                self._collect(pending.popleft(), report, cache)
        return report

    def _collect(self, pending: tuple, report: TaskReport, cache) -> bool:
        """Fold a finished shard write into the task report; False after a failed write (the first one is kept)."""
        shard, future = pending
        try:
            shard, digests = future.result()
        except Exception as error:  # noqa: BLE001  a store error, or anything else the write raised
            self._fail(report, shard, error, cache)
            return False
        report.written[shard] = digests
        return True

    def _fail(self, report: TaskReport, shard: int, error: BaseException, cache) -> None:
        """Record the task's first failure: a store error as its own line, anything else as one line naming the
        shard, its rows and the cause (out of memory: the option that lowers it), with the traceback for the log."""
        if report.error is not None:
            return
        report.error_shard = shard
        if isinstance(error, SfcacheError):
            report.error = error.message
            return
        where = _shard_text(cache, shard)
        report.error = Message(f"{where} failed on {report.host}: ", cause(error, self.job.batch_size))
        report.traceback = "".join(traceback.format_exception(error))

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


def run_task(plugin: str, shards: list[int]) -> TaskReport:
    return get_worker().plugins[plugin].run(shards)


def sample_task(plugin: str, episodes: list, rows: list[int]) -> tuple[dict[int, np.ndarray], np.ndarray | None]:
    return get_worker().plugins[plugin].sample(episodes, rows)


def worker_facts(plugin: str, dask_worker=None) -> dict:
    return dask_worker.plugins[plugin].facts()


def host_of(address: str) -> str:
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
