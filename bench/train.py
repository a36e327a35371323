"""Training with cached targets against training without SF and with online VGGT (the public SF path).

Step time: same dataset, model size, batch, batch indices and seed for every variant; the batches are
fetched into memory first, so a timed step is only `train_step` (augment, forward, backward, update).
Steps of the variants are interleaved (load spikes hit all alike), two warm-up steps are dropped,
and the median is reported. What SF adds to a step (crop of the cached grid, projector, loss, their
backward and update) is also timed alone, to check the overhead is that and nothing else. The tiny
policy is as small as the projector, so the ratio is also measured with the `small` policy, whose
projector share is closer to SF's (a 7B VLA and a 2048-wide projector: well under 1%).
Loader: CachedTargets in a 2-worker DataLoader over shuffled batches, against the raw-read bound:
one process reading the same rows in the same order straight from the Zarr array (one read per row,
stored dtype, no decode). How close cropped cached targets come to online targets of the cropped
image (against not cropping them).
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from bench import preset_settings
from sfcache.crop import crop_target_grid
from sfcache.extract import ExtractConfig, extract
from sfcache.sources import EpisodeInfo
from sfcache.sources.synthetic import write_libero_hdf5
from sfcache.store import StoreConfig, create_store, lock_store, pack_episodes
from sfcache.torch import CachedTargets
from sfcache.train.augment import random_boxes
from sfcache.train.loop import StepBatches, TrainConfig, Trainer, prepare

PRESETS = {"tiny": {"weights": "random:tiny", "model": "tiny", "demos": 2, "steps": 8, "batch": 8, "timed": 8,
                    "small_batch": 2, "small_timed": 7, "loader_rows": 512, "loader_batches": 24},
           "vggt-1b": {"weights": "random:vggt-1b", "model": "small", "demos": 4, "steps": 16, "batch": 8, "timed": 20,
                    "small_batch": 2, "small_timed": 7, "loader_rows": 512, "loader_batches": 64}}
WARM_UP = 2


def _row(metric: str, value: float, baseline: float, unit: str, notes: str) -> dict:
    return {"bench": "train", "metric": metric, "value": value, "baseline": baseline, "ratio": value / baseline,
            "unit": unit, "notes": notes}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _in_memory_batches(trainer: Trainer, count: int) -> list[dict]:
    """The trainer's first `count` batches (seed 0), fetched through its own loader before any timing."""
    batches = StepBatches(len(trainer.data.train), trainer.config.batch_size, 0, 0, count)
    return list(trainer._loader(trainer.data.train, batches))


def _step_seconds(trainers: list[Trainer], timed: int) -> list[float]:
    """Median `train_step` seconds per trainer over `timed` steps, steps interleaved across trainers."""
    batches = [_in_memory_batches(trainer, WARM_UP + timed) for trainer in trainers]
    times: list[list[float]] = [[] for _ in trainers]
    for step in range(WARM_UP + timed):
        for trainer, raw, spent in zip(trainers, batches, times):
            start = time.perf_counter()
            trainer.train_step(raw[step])
            _synchronize(trainer.device)
            if step >= WARM_UP:
                spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


def _sf_work_seconds(trainer: Trainer, timed: int) -> float:
    """Median seconds of only what cached SF adds to a step: crop the target grid and add pool(E), the
    projector and loss forward and backward (into the VLA tokens), AdamW on a copy of the projector."""
    raw = _in_memory_batches(trainer, 1)[0]
    boxes = random_boxes(len(raw["frames"]), torch.Generator().manual_seed(0))
    batch = prepare(raw, trainer.policy_config, trainer.device, boxes, None, None)
    with torch.no_grad():
        _, visual = trainer.model(batch.images, batch.text, batch.proprio)
    tokens = visual.detach().requires_grad_()
    sf_loss = copy.deepcopy(trainer.sf_loss)
    optimizer = torch.optim.AdamW(sf_loss.parameters())
    native, position_embedding = trainer.targets_geometry
    times = []
    for step in range(WARM_UP + timed):
        start = time.perf_counter()
        targets = crop_target_grid(raw["targets"].to(trainer.device), trainer.policy_config.grid, native, boxes)
        loss = sf_loss(tokens, targets + position_embedding)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _synchronize(trainer.device)
        if step >= WARM_UP:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _loader_store(path: Path, rows: int, channels: int) -> Path:
    """A store of `rows` random targets (2 views, 16x16, float16, 32-step shards) written through the store API:
    enough rows that shuffled batches are scattered over many shards."""
    episodes = pack_episodes([EpisodeInfo(f"bench/task/demo_{i}", "bench", 64) for i in range(rows // 64)])
    config = StoreConfig(episodes=episodes, layers=(23,), grid=(16, 16), native_grid=(37, 37), aspect_ratio=1.0,
                         views=("primary", "wrist"), channels=channels,
                         vggt={"weights": "random", "weights_id": "random", "config": {"depth": 24},
                               "preprocess": "sf", "compute_dtype": "float32"},
                         source={"format": "bench"}, steps_per_shard=32)
    generator = np.random.default_rng(0)
    with lock_store(path):
        cache = create_store(path, config)
        for shard in range(cache.num_shards):
            rows_of = cache.shard_rows(shard)
            shape = (rows_of.stop - rows_of.start, 2, 256, channels)
            cache.write_shard(shard, {23: generator.standard_normal(shape, dtype=np.float32)})
    return path


def _loader_rates(store: Path, batch: int, batches: int) -> tuple[float, float, float]:
    """samples/s of CachedTargets in a 2-worker DataLoader over shuffled batches (workers started, first
    batch excluded), of the raw-read bound (the same rows in the same order, one zarr read per row, one
    process), and of one sequential read of the whole array (for reference)."""
    targets = CachedTargets(store)
    order = list(StepBatches(len(targets), batch, 0, 0, batches + 1))
    loader = torch.utils.data.DataLoader(targets, batch_sampler=order, num_workers=2)
    stream = iter(loader)
    next(stream)
    start = time.perf_counter()
    count = sum(len(values) for values in stream)
    loader_rate = count / (time.perf_counter() - start)
    array = zarr.open_array(zarr.storage.LocalStore(store, read_only=True), path=f"targets/layer_{targets.layer}",
                            mode="r")
    start = time.perf_counter()
    raw = [array[row] for rows in order[1:] for row in rows]
    raw_rate = len(raw) / (time.perf_counter() - start)
    start = time.perf_counter()
    whole = array[:]
    return loader_rate, raw_rate, len(whole) / (time.perf_counter() - start)


def _target_agreement(cached: Trainer, online: Trainer) -> tuple[float, float]:
    """Mean cosine of online targets of cropped images with cropped cached targets, and with uncropped ones."""
    raw = next(iter(cached._loader(cached.data.train, StepBatches(len(cached.data.train), 8, 1, 0, 1))))
    boxes = random_boxes(len(raw["frames"]), torch.Generator().manual_seed(0))
    batch = prepare(raw, cached.policy_config, cached.device, boxes, None, cached.targets_geometry)
    truth = online.online(batch.images)
    uncropped = raw["targets"].to(cached.device) + cached.targets_geometry[1]
    cosine = torch.nn.functional.cosine_similarity
    return cosine(truth, batch.targets, dim=-1).mean().item(), cosine(truth, uncropped, dim=-1).mean().item()


def run(workdir: Path, preset: str) -> list[dict]:
    settings = preset_settings(PRESETS, preset, "train")
    source = write_libero_hdf5(workdir / "data", tasks=2, demos=settings["demos"], steps=settings["steps"],
                               size=128).path
    store = workdir / "store"
    extract(ExtractConfig(source=source, out=store, vggt=settings["weights"], layers=(-1,), grid=(16, 16)),
            progress=False)

    def trainer(name: str, model: str, batch: int, **options) -> Trainer:
        return Trainer(TrainConfig(source=source, out=workdir / name, steps=1000, batch_size=batch, model_size=model,
                                   workers=2, val_episodes=0, resume=False, **options))

    model, batch, timed = settings["model"], settings["batch"], settings["timed"]
    baseline = trainer("no_sf", model, batch, align_weight=0.0)
    cached = trainer("cached", model, batch, cache=store)
    online = trainer("online", model, batch, online_vggt=settings["weights"])
    on_cpu = cached.device.type == "cpu"
    threads = torch.get_num_threads()
    if on_cpu:   # one intra-op thread: tiny CPU kernels otherwise time mostly thread contention
        torch.set_num_threads(1)
    try:
        no_sf_s, cached_s, online_s = _step_seconds([baseline, cached, online], timed)
        sf_work_s = _sf_work_seconds(cached, timed)
        small = None
        if model != "small":
            small_batch = settings["small_batch"]
            small = _step_seconds([trainer("no_sf_small", "small", small_batch, align_weight=0.0),
                                   trainer("cached_small", "small", small_batch, cache=store)],
                                  settings["small_timed"])
    finally:
        torch.set_num_threads(threads)
    channels = cached.data.targets.channels
    loader_rate, raw_rate, sequential_rate = _loader_rates(
        _loader_store(workdir / "loader_store", settings["loader_rows"], channels), 32, settings["loader_batches"])
    cropped_cos, uncropped_cos = _target_agreement(cached, online)

    def shape(policy: str, size: int, steps: int) -> str:
        return (f"{policy} policy, batch {size}, 2 views at 224 px, 16x16 targets of {channels} ch, "
                f"{settings['weights']}, median of {steps} interleaved steps after {WARM_UP} warm-up, batches in "
                f"memory" + (", 1 CPU thread" if on_cpu else ""))

    rows = [
        _row("train step: cached SF vs no SF", cached_s, no_sf_s, "s/step",
             f"goal ratio <= 1.1; {shape(model, batch, timed)}"),
        _row("train step: SF overhead vs SF work alone", cached_s - no_sf_s, sf_work_s, "s/step",
             "overhead = cached SF step - no-SF step; SF work alone = target-grid crop + pool(E), projector and "
             "loss forward/backward, AdamW on the projector; ratio near 1: the overhead is only that work"),
    ]
    if small is not None:
        rows.append(_row("train step (small policy): cached SF vs no SF", small[1], small[0], "s/step",
                         f"goal ratio <= 1.1; {shape('small', settings['small_batch'], settings['small_timed'])}; "
                         f"the tiny policy (dim 64) costs about as much as the projector (64->{channels}->{channels}), "
                         "so its ratio overstates SF; with dim 256 the projector is a few percent, as in SF"))
    rows += [
        _row("train step: online VGGT vs cached SF", online_s, cached_s, "s/step", shape(model, batch, timed)),
        _row("target loader: CachedTargets DataLoader vs raw-read bound", loader_rate, raw_rate, "samples/s",
             f"{settings['loader_batches']} shuffled batches of 32 over {settings['loader_rows']} rows "
             f"({channels} ch float16, 32-row shards), 2 workers, float32 out; baseline: the same rows in the same "
             f"order read one by one from the zarr array in one process, float16, no decode; a sequential read "
             f"of the whole array runs at {sequential_rate:.0f} samples/s"),
        _row("online-target cosine: cropped cache vs uncropped cache", cropped_cos, uncropped_cos, "cosine",
             "online VGGT on the cropped image is the reference; same weights as the cache"),
    ]
    return rows
