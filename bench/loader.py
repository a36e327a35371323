"""The target loader rows of the train area: CachedTargets through a DataLoader against a read bound.

Two loaders over the same shuffled batches of 32 rows: the batched path (`CachedTargets.batches`: each batch one
read in a worker, the stored dtype through reused shared memory; what `decode` then does runs on the training
device and is not timed here) and the per-sample path as it was (`DataLoader(CachedTargets, batch_sampler=)`:
decoded to float32 with pool(E) in the workers, collated per sample). The bound: the same rows' stored bytes read
sequentially (rows sorted, split in equal parts, contiguous byte ranges of the shard files, plain unbuffered reads
into one buffer) by as many processes as the loader has workers, all from the page cache. Each figure is the median
of REPEATS rounds that run loader and bound in turn (load on the shared CPU hits both alike); the per-sample path,
tens of times slower, is timed once.
The batched loader is timed after each worker's start and first fill of its ring slots (PREFETCH + 2 batches
each: later batches reuse them). CPU seconds per sample: the workers' user + system time (/proc) plus the training
process's in the timed window, over the samples served in it; peak memory per worker: its peak resident set less
the one it started with (shared with the training process it was forked from), so its ring slots and buffers.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from bench import row, scratch_store_config
from sfcache.provenance import VggtProvenance
from sfcache.reduce import request
from sfcache.sources import EpisodeInfo
from sfcache.store import Reduction, create_store, layer_array, lock_store, open_cache, pack_episodes
from sfcache.torch import CachedTargets
from sfcache.train.loop import StepBatches

LAYER = 23
BATCH = 32
REPEATS = 5
PREFETCH = 2  # DataLoader's default prefetch_factor: a worker's ring has PREFETCH + 2 slots


def loader_store(path: Path, rows: int, channels: int, dtype: str = "float16", reduce: int | None = None) -> Path:
    """A store of `rows` random targets (2 views, 16x16, 32-step shards) written through the store API: enough rows
    that shuffled batches are scattered over many shards. `reduce=K`: a --reduce pca:K store over a random
    orthonormal basis (its coefficients are what is stored and read)."""
    episodes = pack_episodes([EpisodeInfo(f"bench/task/demo_{i}", "bench", 64) for i in range(rows // 64)])
    generator = np.random.default_rng(0)
    reduction = None
    if reduce is not None:
        basis = np.linalg.qr(generator.standard_normal((channels, reduce), dtype=np.float32))[0].T
        fidelity = {str(LAYER): {"k": reduce, "mean": 1.0, "p1": 1.0, "worst": 1.0}}
        reduction = Reduction(
            request(f"pca:{reduce}", None, rows), {LAYER: np.zeros(channels, np.float32)}, {LAYER: basis}, fidelity
        )
    config = scratch_store_config(
        32,
        channels,
        episodes=episodes,
        layers=(LAYER,),
        vggt=VggtProvenance("random", "random", {"depth": 24}, "float32", "sf").to_attrs(),
        source={"format": "bench"},
        dtype=dtype,
        reduce=reduction,
    )
    with lock_store(path):
        cache = create_store(path, config)
        for shard in range(cache.num_shards):
            rows_of = cache.shard_rows(shard)
            shape = (rows_of.stop - rows_of.start, 2, 256, reduce or channels)
            values = generator.standard_normal(shape, dtype=np.float32)
            cache.write_shard(shard, {LAYER: values if reduction is None else values @ reduction.components[LAYER]})
    return path


def loader_figures(store: Path, batches: int, workers: int, per_sample_batches: int, detail: bool = False) -> dict:
    """Medians over REPEATS rounds (see the module): samples/s of the batched loader ("loader") and of the bound,
    of one pass of the per-sample path ("per_sample"); CPU seconds per sample and peak MiB per worker of the
    batched loader; stored bytes per row. With `detail`, also `Cache.read_rows` of the bound's rows by as many
    processes, straight from the shard files ("direct") and through zarr ("zarr")."""
    context = multiprocessing.get_context()
    targets = CachedTargets(store)
    warm_up = workers * (PREFETCH + 2)  # each worker's start and the first fill of its ring slots
    order = list(StepBatches(len(targets), BATCH, 0, 0, warm_up + batches))
    parts = np.array_split(np.sort([step for rows in order[warm_up:] for step in rows]), workers)
    ranges = [byte_ranges(store, targets.layer, part.tolist()) for part in parts]
    stored = sum(length for part in ranges for _, _, length in part)
    count = sum(len(part) for part in parts)
    rounds: dict[str, list[float]] = {}
    for _ in range(REPEATS):
        for name, value in _batched_pass(targets, order, workers, warm_up).items():
            rounds.setdefault(name, []).append(value)
        rounds.setdefault("bound", []).append(count / _parallel_seconds(_read_ranges, ranges, stored, context))
    per_sample = order[: workers + per_sample_batches]  # tens of times slower: one pass
    per_sample = torch.utils.data.DataLoader(targets, batch_sampler=per_sample, num_workers=workers)
    rounds["per_sample"] = [_rate(per_sample, workers)]
    figures = {name: statistics.median(values) for name, values in rounds.items()}
    figures["row_bytes"] = stored / count
    if detail:
        rows = [(store, targets.layer, part) for part in parts]
        figures["direct"] = count / _parallel_seconds(_read_rows, rows, stored, context)
        figures["zarr"] = count / _parallel_seconds(partial(_read_rows, direct=False), rows, stored, context)
    return figures


def _rate(loader, workers: int) -> float:
    """samples/s of a pass over `loader` after each worker's first batch (its start and store opening)."""
    stream = iter(loader)
    for _ in range(workers):
        next(stream)
    start = time.perf_counter()
    count = sum(len(batch) for batch in stream)
    return count / (time.perf_counter() - start)


def _batched_pass(targets: CachedTargets, order: list[list[int]], workers: int, warm_up: int) -> dict[str, float]:
    """One pass of `CachedTargets.batches` over `order`, timed after `warm_up` batches (each worker's start and
    first fill of its ring slots): samples/s, CPU s per sample (workers + this process) in that window, and the
    most memory a worker added to its resident set at start (its peak resident set less what it started with)."""
    with tempfile.TemporaryDirectory() as folder:
        stream = iter(targets.batches(order, num_workers=workers, worker_init_fn=partial(_note_pid, folder)))
        for _ in range(warm_up):
            next(stream)
        started = {int(pid): int(rss) for pid, rss in (f.read_text().split() for f in Path(folder).iterdir())}
        pids = list(started)
        began, cpu, ticks = time.perf_counter(), time.process_time(), _cpu_ticks(pids)
        count = sum(len(next(stream)) for _ in range(len(order) - warm_up))  # the workers are alive until the end
        seconds, cpu, ticks = time.perf_counter() - began, time.process_time() - cpu, _cpu_ticks(pids) - ticks
        peak = max(_memory_kib(pid, "VmHWM") - started[pid] for pid in pids)
        for _ in stream:
            raise RuntimeError("bench loader: more batches than asked")
    return {
        "loader": count / seconds,
        "cpu_per_sample": (cpu + ticks / os.sysconf("SC_CLK_TCK")) / count,
        "peak_mib": peak / 2**10,
    }


def _note_pid(folder: str, worker: int) -> None:
    """worker_init_fn: leave this worker's pid and resident KiB at its start (what it shares with the process it
    was forked from), so that its CPU time and added memory can be read while it runs."""
    Path(folder, str(worker)).write_text(f"{os.getpid()} {_memory_kib(os.getpid(), 'VmRSS')}")


def _cpu_ticks(pids: list[int]) -> int:
    """User + system clock ticks of the processes so far (/proc/PID/stat fields 14 and 15)."""
    return sum(sum(map(int, Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13])) for pid in pids)


def _memory_kib(pid: int, field: str) -> int:
    """A memory figure of a process from /proc/PID/status (VmRSS: resident now, VmHWM: peak resident), KiB."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1])


def byte_ranges(store: Path, layer: int, rows: list[int]) -> list[tuple[Path, int, int]]:
    """(shard file, offset, length) of the stored bytes of sorted `rows` (repeats read again) in each array a row
    has (values, and int8 scales), consecutive rows of a shard merged into one range (their chunks lie back to
    back, as in every uncompressed shard file), located through each shard file's own index: per chunk (offset,
    length) uint64, then a CRC32C."""
    cache = open_cache(store, mode="r")
    per_shard = cache.steps_per_shard
    runs: list[list[int]] = []
    for step in rows:
        if runs and step == runs[-1][1] and step % per_shard:
            runs[-1][1] = step + 1
        else:
            runs.append([step, step + 1])
    ranges = []
    for name in [layer_array(layer)] + ([layer_array(layer, "_scale")] if cache.dtype == "int8" else []):
        index: dict[int, tuple[Path, np.ndarray]] = {}
        for first, stop in runs:
            shard = first // per_shard
            if shard not in index:
                file = cache.shard_file(name, shard)
                entries = np.fromfile(file, dtype="<u8", offset=file.stat().st_size - 16 * per_shard - 4)
                index[shard] = (file, entries.reshape(per_shard, 2))
            file, entries = index[shard]
            begin, (last, last_length) = entries[first % per_shard][0], entries[(stop - 1) % per_shard]
            ranges.append((file, int(begin), int(last + last_length - begin)))
    return ranges


def _parallel_seconds(reader: Callable, parts: list, expected_bytes: int, context) -> float:
    """Seconds for one process per part to run `reader(part, ready, done)`, timed from when all are started
    and waiting to when the last has reported its bytes; they must add up to `expected_bytes`."""
    ready, done = context.Barrier(len(parts) + 1), context.Queue()
    processes = [context.Process(target=reader, args=(part, ready, done)) for part in parts]
    for process in processes:
        process.start()
    ready.wait()
    start = time.perf_counter()
    moved = sum(done.get() for _ in processes)
    seconds = time.perf_counter() - start
    for process in processes:
        process.join()
    if moved != expected_bytes:
        raise RuntimeError(f"bench train: the readers moved {moved} bytes, expected {expected_bytes}")
    return seconds


def _read_ranges(ranges: list[tuple[Path, int, int]], ready, done) -> None:
    """Bound reader: plain unbuffered reads of each byte range into one buffer."""
    buffer = memoryview(bytearray(max((length for _, _, length in ranges), default=0)))
    ready.wait()
    moved = 0
    for file, offset, length in ranges:
        with open(file, "rb", buffering=0) as f:
            f.seek(offset)
            moved += f.readinto(buffer[:length])
    done.put(moved)


def _read_rows(part: tuple[Path, int, np.ndarray], ready, done, direct: bool = True) -> None:
    """Store reader: `Cache.read_rows` of sorted rows, float16 as stored; straight from the shard files, or
    with `direct=False` through zarr (contiguous runs, one slice read each)."""
    store, layer, rows = part
    cache = open_cache(store, mode="r")
    cache.direct_reads = direct
    cache.read_rows(rows, layer=layer, decoded=False)  # untimed: opening the arrays, and this process's first
    # touch of that much fresh memory (huge pages; a loader's workers pay it in their first batches)
    ready.wait()
    done.put(int(cache.read_rows(rows, layer=layer, decoded=False).nbytes))


def loader_rows(workdir: Path, settings: dict) -> list[dict]:
    """The preset's row (kept from earlier reports: its channels, 2 workers, read_rows and zarr in the notes)
    and the real-shape rows (2 views x 256 tokens x 2048 channels float16, and --reduce pca:256 --dtype int8)
    with 2 and 4 workers."""
    with warnings.catch_warnings():  # 4 workers on a 2-core machine is what the row asks for
        warnings.filterwarnings("ignore", "This DataLoader will create", UserWarning)
        return _loader_rows(workdir, settings)


def _loader_rows(workdir: Path, settings: dict) -> list[dict]:
    shapes = [("preset", settings["channels"], "float16", None, (2,))]
    shapes += [("real", 2048, "float16", None, (2, 4)), ("real", 2048, "int8", 256, (2, 4))]
    rows = []
    for name, channels, dtype, reduce, worker_counts in shapes:
        store = loader_store(workdir / f"loader_{name}_{dtype}", settings[f"{name}_rows"], channels, dtype, reduce)
        for workers in worker_counts:
            figures = loader_figures(
                store, settings[f"{name}_batches"], workers, settings["per_sample_batches"], detail=name == "preset"
            )
            rows += _rows(figures, name, channels, dtype, reduce, workers, settings[f"{name}_rows"])
        shutil.rmtree(store)  # up to a GiB
    return rows


def _rows(figures: dict, name: str, channels: int, dtype: str, reduce: int | None, workers: int, rows: int) -> list:
    def mib(key: str) -> str:
        return f"{figures[key] * figures['row_bytes'] / 2**20:.0f} MiB/s"

    stored = f"{dtype}" + (f" PCA coefficients (--reduce pca:{reduce})" if reduce else "")
    shape = (
        f"shuffled batches of {BATCH} over {rows} rows of 2 views x 256 tokens x {channels} ch {stored}, 32-row "
        f"shards, {figures['row_bytes'] / 2**10:.0f} KiB stored a row, {workers} workers, median of {REPEATS} "
        f"rounds; bound: the same rows' stored bytes read sequentially (rows sorted, contiguous ranges of the "
        f"shard files, plain unbuffered reads into one buffer) by {workers} processes, all from the page cache"
    )
    label = f"target loader ({channels} ch {dtype}{' pca' if reduce else ''}, {workers} workers)"
    batched = (
        f"CachedTargets.batches (stored dtype, reused shared memory, decode on the training device not timed): "
        f"{mib('loader')} against the bound's {mib('bound')} of stored bytes; CPU "
        f"{figures['cpu_per_sample'] * 1e3:.2f} ms a sample (workers + training process), peak "
        f"{figures['peak_mib']:.0f} MiB per worker (its peak resident set over the one it started with); {shape}"
    )
    if "direct" in figures:
        batched += (
            f"; Cache.read_rows of the sorted rows ({workers} processes) straight from the shard files: "
            f"{figures['direct']:.0f} samples/s, through zarr: {figures['zarr']:.0f}"
        )
    return [
        row(
            "train",
            f"{label}: batched vs sequential-read bound",
            figures["loader"],
            figures["bound"],
            "samples/s",
            batched,
        ),
        row(
            "train",
            f"{label}: per-sample path vs sequential-read bound",
            figures["per_sample"],
            figures["bound"],
            "samples/s",
            f"DataLoader(CachedTargets, batch_sampler=): float32 + pool(E) decoded in the workers, collated per "
            f"sample (the loader before the batched path; {mib('per_sample')} of stored bytes; one pass); {shape}",
        ),
    ]
