"""Training with cached targets against training without SF and with online VGGT (the public SF path).

Step time: same dataset, model size, batch, batch indices and seed for every variant; the batches are
fetched into memory first, so a timed step is only `train_step` (augment, forward, backward, update).
Steps of the variants are interleaved (load spikes hit all alike), two warm-up steps are dropped,
and the median is reported. Self-check: what SF adds to a step (crop of the cached grid, projector,
loss, their backward and update) is timed alone in the same interleaved rounds, against the per-round
difference cached SF step - no-SF step; about 1 means the overhead is that work and nothing else. The
tiny policy is as small as the projector, so the ratio is also measured with the `small` policy, whose
projector share is closer to SF's (a 7B VLA and a 2048-wide projector: well under 1%).
Loader: CachedTargets in a DataLoader of LOADER_WORKERS workers over shuffled batches, against a bound:
the same rows' stored bytes read sequentially (sorted rows, contiguous byte ranges of the shard files,
plain file reads) by as many processes, both from the page cache; `Cache.read_rows` of those sorted rows by
as many processes, straight from the shard files and through zarr (in the notes), show how much of the
gap is reading and how much the loader's decoding and batching. Self-check: how close cropped
cached targets come to online targets of the cropped image, against not cropping them.
"""

from __future__ import annotations

import copy
import multiprocessing
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from bench import device_sync, preset_settings, row, scratch_store_config
from sfcache.crop import crop_target_grid
from sfcache.extract import ExtractConfig, extract
from sfcache.provenance import VggtProvenance
from sfcache.sources import EpisodeInfo
from sfcache.sources.synthetic import write_libero_hdf5
from sfcache.store import create_store, lock_store, open_cache, pack_episodes
from sfcache.torch import CachedTargets
from sfcache.train.augment import random_boxes
from sfcache.train.loop import StepBatches, TrainConfig, Trainer, prepare

PRESETS = {
    "tiny": {
        "weights": "random:tiny",
        "model": "tiny",
        "demos": 2,
        "steps": 8,
        "batch": 8,
        "timed": 12,
        "small_batch": 2,
        "small_timed": 7,
        "loader_rows": 512,
        "loader_batches": 24,
    },
    "vggt-1b": {
        "weights": "random:vggt-1b",
        "model": "small",
        "demos": 4,
        "steps": 16,
        "batch": 8,
        "timed": 20,
        "small_batch": 2,
        "small_timed": 7,
        "loader_rows": 512,
        "loader_batches": 64,
    },
}
WARM_UP = 2
LOADER_WORKERS = 2


def _in_memory_batches(trainer: Trainer, count: int) -> list[dict]:
    """The trainer's first `count` batches (seed 0), fetched through its own loader before any timing."""
    batches = StepBatches(len(trainer.data.train), trainer.config.batch_size, 0, 0, count)
    return list(trainer._loader(trainer.data.train, batches))


def _interleaved_seconds(works: list[Callable[[int], object]], timed: int, device: torch.device) -> list[list[float]]:
    """Seconds of each `work(round)` in each of `timed` rounds after WARM_UP, the works run in turn every
    round (a load spike hits all alike)."""
    times: list[list[float]] = [[] for _ in works]
    sync = device_sync(device)
    for step in range(WARM_UP + timed):
        for work, spent in zip(works, times):
            start = time.perf_counter()
            work(step)
            sync()
            if step >= WARM_UP:
                spent.append(time.perf_counter() - start)
    return times


def _train_steps(trainer: Trainer, timed: int) -> Callable[[int], object]:
    """`train_step` on the trainer's batch of each round, all fetched into memory first."""
    batches = _in_memory_batches(trainer, WARM_UP + timed)
    return lambda step: trainer.train_step(batches[step])


def _sf_work(trainer: Trainer) -> Callable[[int], object]:
    """Only what cached SF adds to a step: decode the stored targets (widen, crop the grid, add pool(E)), the
    projector and loss forward and backward (into the VLA tokens), AdamW on a copy of the projector."""
    raw = _in_memory_batches(trainer, 1)[0]
    boxes = random_boxes(len(raw["frames"]), torch.Generator().manual_seed(0))
    batch = prepare(raw, trainer.policy_config, trainer.device, boxes, None, None)
    with torch.no_grad():
        _, visual = trainer.model(batch.images, batch.text, batch.proprio)
    tokens = visual.detach().requires_grad_()
    sf_loss = copy.deepcopy(trainer.sf_loss)
    optimizer = torch.optim.AdamW(sf_loss.parameters())

    def work(_: int) -> None:
        targets = trainer.data.targets.decode(raw["targets"], device=trainer.device, boxes=boxes)
        loss = sf_loss(tokens, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return work


def _loader_store(path: Path, rows: int, channels: int) -> Path:
    """A store of `rows` random targets (2 views, 16x16, float16, 32-step shards) written through the store API:
    enough rows that shuffled batches are scattered over many shards."""
    episodes = pack_episodes([EpisodeInfo(f"bench/task/demo_{i}", "bench", 64) for i in range(rows // 64)])
    config = scratch_store_config(
        32,
        channels,
        episodes=episodes,
        layers=(23,),
        vggt=VggtProvenance("random", "random", {"depth": 24}, "float32", "sf").to_attrs(),
        source={"format": "bench"},
    )
    generator = np.random.default_rng(0)
    with lock_store(path):
        cache = create_store(path, config)
        for shard in range(cache.num_shards):
            rows_of = cache.shard_rows(shard)
            shape = (rows_of.stop - rows_of.start, 2, 256, channels)
            cache.write_shard(shard, {23: generator.standard_normal(shape, dtype=np.float32)})
    return path


def _loader_rates(store: Path, batch: int, batches: int) -> dict[str, float]:
    """samples/s of CachedTargets in a DataLoader of LOADER_WORKERS workers over `batches` shuffled batches
    (after one batch per worker); of the bound: the same rows' stored bytes read sequentially by as many
    processes (rows sorted, split in equal parts, contiguous byte ranges of the shard files, plain reads);
    of `Cache.read_rows` of those sorted rows (undecoded) by as many processes, straight from the shard
    files ("direct") and through zarr; and the stored bytes of a row. All processes are started the same
    way and read the store from the page cache."""
    context = multiprocessing.get_context()
    targets = CachedTargets(store)
    order = list(StepBatches(len(targets), batch, 0, 0, LOADER_WORKERS + batches))
    loader = torch.utils.data.DataLoader(
        targets, batch_sampler=order, num_workers=LOADER_WORKERS, multiprocessing_context=context
    )
    stream = iter(loader)
    for _ in range(LOADER_WORKERS):  # each worker's first batch: its start and store opening
        next(stream)
    start = time.perf_counter()
    count = sum(len(values) for values in stream)
    loader_rate = count / (time.perf_counter() - start)
    halves = np.array_split(np.sort([step for rows in order[LOADER_WORKERS:] for step in rows]), LOADER_WORKERS)
    ranges = [_byte_ranges(store, targets.layer, half.tolist()) for half in halves]
    stored = sum(length for part in ranges for _, _, length in part)
    plain_s = _parallel_seconds(_read_ranges, ranges, stored, context)
    parts = [(store, targets.layer, half) for half in halves]
    direct_s = _parallel_seconds(_read_rows, parts, stored, context)
    zarr_s = _parallel_seconds(partial(_read_rows, direct=False), parts, stored, context)
    return {
        "loader": loader_rate,
        "bound": count / plain_s,
        "direct": count / direct_s,
        "zarr": count / zarr_s,
        "row_bytes": stored / count,
    }


def _byte_ranges(store: Path, layer: int, rows: list[int]) -> list[tuple[Path, int, int]]:
    """(shard file, offset, length) of the stored bytes of sorted `rows` (repeats read again), consecutive
    rows of a shard merged into one range (their chunks lie back to back, as in every uncompressed shard
    file), located through each shard file's own index: per chunk (offset, length) uint64, then a CRC32C."""
    cache = open_cache(store, mode="r")
    name = f"targets/layer_{layer}"
    per_shard = cache.steps_per_shard
    runs: list[list[int]] = []
    for step in rows:
        if runs and step == runs[-1][1] and step % per_shard:
            runs[-1][1] = step + 1
        else:
            runs.append([step, step + 1])
    index: dict[int, tuple[Path, np.ndarray]] = {}
    ranges = []
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


def _target_agreement(cached: Trainer, online: Trainer) -> tuple[float, float]:
    """Mean cosine of online targets of cropped images with cropped cached targets, and with uncropped ones."""
    raw = next(iter(cached._loader(cached.data.train, StepBatches(len(cached.data.train), 8, 1, 0, 1))))
    boxes = random_boxes(len(raw["frames"]), torch.Generator().manual_seed(0))
    batch = prepare(raw, cached.policy_config, cached.device, boxes, None, cached.data.targets)
    truth = online.online(batch.images)
    uncropped = cached.data.targets.decode(raw["targets"], device=cached.device)
    cosine = torch.nn.functional.cosine_similarity
    return cosine(truth, batch.targets, dim=-1).mean().item(), cosine(truth, uncropped, dim=-1).mean().item()


def run(workdir: Path, preset: str) -> list[dict]:
    settings = preset_settings(PRESETS, preset, "train")
    source = write_libero_hdf5(
        workdir / "data", tasks=2, demos=settings["demos"], steps=settings["steps"], size=128
    ).path
    store = workdir / "store"
    extract(
        ExtractConfig(source=source, out=store, vggt=settings["weights"], layers=(-1,), grid=(16, 16)), progress=False
    )

    def trainer(name: str, model: str, batch: int, **options) -> Trainer:
        return Trainer(
            TrainConfig(
                source=source,
                out=workdir / name,
                steps=1000,
                batch_size=batch,
                model_size=model,
                workers=2,
                val_episodes=0,
                resume=False,
                **options,
            )
        )

    model, batch, timed = settings["model"], settings["batch"], settings["timed"]
    baseline = trainer("no_sf", model, batch, align_weight=0.0)
    cached = trainer("cached", model, batch, cache=store)
    online = trainer("online", model, batch, online_vggt=settings["weights"])
    on_cpu = cached.device.type == "cpu"
    threads = torch.get_num_threads()
    if on_cpu:  # one intra-op thread: tiny CPU kernels otherwise time mostly thread contention
        torch.set_num_threads(1)
    try:
        no_sf, cached_t, online_t, sf_work = _interleaved_seconds(
            [_train_steps(baseline, timed), _train_steps(cached, timed), _train_steps(online, timed), _sf_work(cached)],
            timed,
            cached.device,
        )
        small = None
        if model != "small":
            small_batch, small_timed = settings["small_batch"], settings["small_timed"]
            small = _interleaved_seconds(
                [
                    _train_steps(trainer(name, "small", small_batch, **options), small_timed)
                    for name, options in (("no_sf_small", {"align_weight": 0.0}), ("cached_small", {"cache": store}))
                ],
                small_timed,
                cached.device,
            )
    finally:
        torch.set_num_threads(threads)
    no_sf_s, cached_s, online_s, sf_work_s = map(statistics.median, (no_sf, cached_t, online_t, sf_work))
    overhead_s = statistics.median(with_sf - without for with_sf, without in zip(cached_t, no_sf))
    channels = cached.data.targets.channels
    loader = _loader_rates(
        _loader_store(workdir / "loader_store", settings["loader_rows"], channels), 32, settings["loader_batches"]
    )
    cropped_cos, uncropped_cos = _target_agreement(cached, online)

    def mib_per_s(name: str) -> str:
        return f"{loader[name] * loader['row_bytes'] / 2**20:.0f}"

    def shape(policy: str, size: int, steps: int) -> str:
        return (
            f"{policy} policy, batch {size}, 2 views at 224 px, 16x16 targets of {channels} ch, "
            f"{settings['weights']}, median of {steps} interleaved steps after {WARM_UP} warm-up, batches in "
            f"memory" + (", 1 CPU thread" if on_cpu else "")
        )

    rows = [
        row(
            "train",
            "train step: cached SF vs no SF",
            cached_s,
            no_sf_s,
            "s/step",
            f"goal ratio <= 1.1; {shape(model, batch, timed)}",
        ),
        row(
            "train",
            "train step: SF overhead vs SF work alone",
            overhead_s,
            sf_work_s,
            "s/step",
            f"self-check, expected about 1: overhead = median over {timed} rounds of (cached SF step - no-SF step), "
            "SF work alone = median of target-grid crop + pool(E), projector and loss forward/backward and AdamW "
            "on a projector copy, timed in the same rounds; the step adds only gradient clipping over the "
            "projector to that, so well above 1 = SF costs something else; the overhead is a small difference of "
            "two step times, so load on a shared CPU spreads it",
        ),
    ]
    if small is not None:
        rows.append(
            row(
                "train",
                "train step (small policy): cached SF vs no SF",
                statistics.median(small[1]),
                statistics.median(small[0]),
                "s/step",
                f"goal ratio <= 1.1; {shape('small', settings['small_batch'], settings['small_timed'])}; "
                f"the tiny policy (dim 64) costs about as much as the projector (64->{channels}->{channels}), "
                "so its ratio overstates SF; with dim 256 the projector is a few percent, as in SF",
            )
        )
    rows += [
        row("train", "train step: online VGGT vs cached SF", online_s, cached_s, "s/step", shape(model, batch, timed)),
        row(
            "train",
            "target loader: CachedTargets DataLoader vs sequential-read bound",
            loader["loader"],
            loader["bound"],
            "samples/s",
            f"{settings['loader_batches']} shuffled batches of 32 over {settings['loader_rows']} rows ({channels} ch "
            f"float16, 32-row shards, {loader['row_bytes'] / 2**10:.0f} KiB a row), {LOADER_WORKERS} workers, "
            f"float32 + pool(E) out; bound: the same rows' stored bytes read sequentially (rows sorted, contiguous "
            f"ranges of the shard files, plain unbuffered reads) by {LOADER_WORKERS} processes, both from the page "
            f"cache; loader {mib_per_s('loader')} MiB/s, bound {mib_per_s('bound')} MiB/s of stored bytes; "
            f"Cache.read_rows of the sorted rows (undecoded, {LOADER_WORKERS} processes) straight from the "
            f"shard files: {loader['direct']:.0f} samples/s, through zarr: {loader['zarr']:.0f}",
        ),
        row(
            "train",
            "online-target cosine: cropped cache vs uncropped cache",
            cropped_cos,
            uncropped_cos,
            "cosine",
            "self-check, expected above 1: online VGGT on the cropped images (same weights as the cache) is the "
            "reference; the cached grid cropped with the same boxes should match it better than the uncropped grid; "
            "both stay below 1 (the crop resamples the pooled 16x16 grid), and with random weights the features "
            "change little across the image, so the gain is small",
        ),
    ]
    return rows
