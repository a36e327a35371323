"""Training with cached targets against training without SF and with online VGGT (the public SF path).

Step time: same dataset, model size, batch, batch indices and seed for every variant; the batches are
fetched into memory first, so a timed step is only `train_step` (augment, forward, backward, update).
Steps of the variants are interleaved (load spikes hit all alike), two warm-up steps are dropped,
and the median is reported. Self-check: what SF adds to a step (crop of the cached grid, projector,
loss, their backward and update) is timed alone in the same interleaved rounds, against the per-round
difference cached SF step - no-SF step; about 1 means the overhead is that work and nothing else. The
tiny policy is as small as the projector, so the ratio is also measured with the `small` policy, whose
projector share is closer to SF's (a 7B VLA and a 2048-wide projector: well under 1%).
Loader: `bench.loader` (its rows close the area). Self-check: how close cropped
cached targets come to online targets of the cropped image, against not cropping them.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench import device_sync, preset_settings, row
from bench.loader import loader_rows
from sfcache.extract import ExtractConfig, extract
from sfcache.sources.synthetic import write_libero_hdf5
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
        "preset_rows": 512,
        "preset_batches": 24,
        "real_rows": 512,
        "real_batches": 32,
        "per_sample_batches": 4,
        "oft_samples": 64,
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
        "preset_rows": 512,
        "preset_batches": 64,
        "real_rows": 512,
        "real_batches": 64,
        "per_sample_batches": 8,
        "oft_samples": 256,
    },
}
WARM_UP = 2


def _in_memory_batches(trainer: Trainer, count: int) -> list[dict]:
    """The trainer's first `count` batches (seed 0), fetched through its own loader before any timing."""
    batches = StepBatches(len(trainer.data.train), trainer.config.batch_size, 0, 0, count)
    return list(trainer._loader(trainer.data.train, batches))


def _interleaved_seconds(
    works: list[Callable[[int], object]],
    timed: int,
    device: torch.device,
    clock: Callable[[], float] = time.perf_counter,
) -> list[list[float]]:
    """Seconds of each `work(round)` in each of `timed` rounds after WARM_UP, the works run in turn every
    round (a load spike hits all alike); `clock` time.process_time counts this process's CPU seconds instead."""
    times: list[list[float]] = [[] for _ in works]
    sync = device_sync(device)
    for step in range(WARM_UP + timed):
        for work, spent in zip(works, times):
            start = clock()
            work(step)
            sync()
            if step >= WARM_UP:
                spent.append(clock() - start)
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


def _target_agreement(cached: Trainer, online: Trainer) -> tuple[float, float]:
    """Mean cosine of online targets of cropped images with cropped cached targets, and with uncropped ones."""
    raw = next(iter(cached._loader(cached.data.train, StepBatches(len(cached.data.train), 8, 1, 0, 1))))
    boxes = random_boxes(len(raw["frames"]), torch.Generator().manual_seed(0))
    batch = prepare(raw, cached.policy_config, cached.device, boxes, None, cached.data.targets)
    truth = online.online(batch.images)
    uncropped = cached.data.targets.decode(raw["targets"], device=cached.device)
    cosine = torch.nn.functional.cosine_similarity
    return cosine(truth, batch.targets, dim=-1).mean().item(), cosine(truth, uncropped, dim=-1).mean().item()


def _oft_frame_seconds(samples: int, timed: int) -> dict[str, list[float]] | None:
    """CPU seconds (all threads of this process: a cost, not other processes' load) per `samples` frames of
    OpenVLA-OFT's training frame transform in tf.data (decode and resize two
    256 px JPEG views to 224, then OFT's augment with its kwargs, dlimp's fork) with and without
    `augment_with_boxes`, and, to see the added work alone, of the decode with only the boxes and with
    nothing else; None without TensorFlow. OFT's augment and dlimp are the test doubles
    (`tests/_oft_doubles.py`: the same TF ops). Drained inside the graph (`reduce`): no Python per sample."""
    try:
        import tensorflow as tf
    except ImportError:
        return None
    from sfcache.integrations.openvla_oft import augment_with_boxes, crop_boxes
    from tests._oft_doubles import OFT_AUGMENT, installed, oft_augment

    rows, cols = np.mgrid[0:256, 0:256]
    picture = np.stack([rows, cols, (rows * cols) // 256], axis=-1).astype(np.uint8)
    jpegs = [tf.io.encode_jpeg(np.roll(picture, shift, axis=(0, 1)), quality=95) for shift in (0, 37)]

    def decoded(jpeg):  # OFT's decode_and_resize: TF's decode, dlimp's resize_image
        image = tf.image.resize(
            tf.io.decode_image(jpeg, 3, expand_animations=False), (224, 224), "lanczos3", antialias=True
        )
        return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)

    def frame(_):
        views = {f"image_{view}": decoded(jpeg) for view, jpeg in zip(("primary", "wrist"), jpegs, strict=True)}
        return {**views, "pad_mask_dict": {key: tf.constant(True) for key in views}}

    def pipeline(augment: Callable) -> Callable[[int], object]:
        def aug(obs):
            seed = tf.random.uniform([2], maxval=tf.dtypes.int32.max, dtype=tf.int32)
            return augment(obs, seed=seed, augment_kwargs=OFT_AUGMENT)

        frames = tf.data.Dataset.range(samples).map(frame).map(aug)
        return lambda _: frames.reduce(np.int64(0), lambda count, _: count + 1)

    def only_boxes(obs, seed, augment_kwargs):
        return {**obs, "sf_crop_boxes": crop_boxes(oft_augment, obs, seed, augment_kwargs)}

    variants = {
        "plain": oft_augment,
        "boxed": augment_with_boxes(oft_augment),
        "decode": lambda obs, seed, augment_kwargs: obs,
        "decode_boxes": only_boxes,
    }
    with installed("fork"):
        works = [pipeline(work) for work in variants.values()]
        seconds = _interleaved_seconds(works, timed, torch.device("cpu"), clock=time.process_time)
    return dict(zip(variants, seconds, strict=True))


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
                loader_workers=2,
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
    cropped_cos, uncropped_cos = _target_agreement(cached, online)

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
            "SF work alone = median of the targets' decode (widen, crop, pool(E)), projector and loss "
            "forward/backward and AdamW on a projector copy, timed in the same rounds; the step adds only gradient "
            "clipping over the projector to that, so well above 1 = SF costs something else; the overhead is a "
            "small difference of two step times, so load on a shared CPU spreads it",
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
    oft = _oft_frame_seconds(settings["oft_samples"], timed)
    if oft is not None:
        ms = {name: statistics.median(seconds) / settings["oft_samples"] * 1e3 for name, seconds in oft.items()}
        rows.append(
            row(
                "train",
                "OpenVLA-OFT frame transform in tf.data: with vs without augment_with_boxes",
                ms["boxed"],
                ms["plain"],
                "CPU ms/sample",
                f"median of {timed} interleaved runs of {settings['oft_samples']} samples, CPU time: decode "
                "and resize two 256 px JPEG views to 224, OFT's augment with its kwargs (dlimp fork seeding, test "
                f"doubles of the same TF ops); difference {ms['boxed'] - ms['plain']:.2f} ms; the boxes alone "
                f"(measured on coordinate images; decode + boxes - decode) {ms['decode_boxes'] - ms['decode']:.2f} ms, "
                f"OFT's augment alone {ms['plain'] - ms['decode']:.2f} ms, decode and resize {ms['decode']:.2f} ms",
            )
        )
    return rows + loader_rows(workdir, {**settings, "channels": channels})
