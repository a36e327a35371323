"""Cached SF targets in OpenVLA-OFT / openvla-SF's RLDS pipeline (tf.data + dlimp), in a few changed lines.

OFT's pipeline yields no episode id, no step and no crop box, and shuffles trajectories and frames,
so the join needs what survives the shuffles, carried per frame from the read to the batch:

- the episode: TFDS's `tfds_id` (`<shard file>__<index in shard>`, from `ReadConfig(add_tfds_id=True)`;
  `with_tfds_ids`), which an RLDS store maps to its key (`Cache.key_for`), plus the trajectory's
  length, checked against the store so that other data cannot silently misalign (`episode_fields`);
- the step: its index in the trajectory (`episode_fields`);
- per view, the crop OFT's augmentation drew: `augment_with_boxes` wraps OFT's `augment` and measures
  it, running that same `augment` (and so the installed dlimp, whichever seeding it has) with the same
  seed on coordinate images (`crop_boxes`); `check_boxes` compares such boxes with real frames' crops.

`with_sf_fields` / `collate_with_sf_fields` carry the fields through OFT's batch transform and collator,
and `batch_targets` turns a batch into targets cropped to the boxes with SF's position embedding added.
The TF side runs inside tf.data graphs; TensorFlow is imported only when those functions are called.
Field names avoid "wrist": OFT's batch transform treats every observation key holding it as a camera.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from sfcache.errors import SfcacheError
from sfcache.torch import CachedTargets

__all__ = [
    "BoxCheck",
    "CachedTargets",
    "augment_with_boxes",
    "batch_targets",
    "check_boxes",
    "collate_with_sf_fields",
    "crop_boxes",
    "episode_fields",
    "sample_fields",
    "with_sf_fields",
    "with_tfds_ids",
]

VIEWS = ("primary", "wrist")  # OFT's LIBERO `image_obs_keys` names, which are also sfcache's RLDS views
FIELDS = ("sf_tfds_id", "sf_step", "sf_episode_length")
BOXES = "sf_crop_boxes"  # observation key: [V, 4] boxes in `views` order
FULL_BOX = (0.0, 0.0, 1.0, 1.0)


# ----------------------------------------------------------------------------- tf.data side


def with_tfds_ids(builder):
    """`builder` whose `as_dataset` always adds TFDS's per-episode `tfds_id` (dlimp's `from_rlds` offers no
    read_config argument); dlimp then broadcasts it to every step as `traj_metadata/tfds_id`."""
    import tensorflow_datasets as tfds

    as_dataset = builder.as_dataset

    def as_dataset_with_ids(*args, read_config=None, **kwargs):
        read_config = dataclasses.replace(read_config or tfds.ReadConfig(), add_tfds_id=True)
        return as_dataset(*args, read_config=read_config, **kwargs)

    builder.as_dataset = as_dataset_with_ids
    return builder


def episode_fields(traj: dict) -> dict:
    """Per-step episode id, step and trajectory length of a dlimp RLDS trajectory, for its observation dict.

    Call in OFT's `restructure` on the incoming trajectory (`new_obs.update(episode_fields(traj))`):
    observation entries follow every later gather (chunking, subsampling), and OFT keeps them to the batch.
    """
    import tensorflow as tf

    tfds_id = traj.get("traj_metadata", {}).get("tfds_id")
    if tfds_id is None:
        raise SfcacheError(
            "episode_fields: the trajectory has no traj_metadata/tfds_id; wrap the TFDS builder "
            "with sfcache.integrations.openvla_oft.with_tfds_ids(...) where it is made"
        )
    length = tf.shape(traj["action"])[0]
    return {"sf_tfds_id": tfds_id, "sf_step": tf.range(length), "sf_episode_length": tf.fill([length], length)}


def augment_with_boxes(augment: Callable, views: Sequence[str] = VIEWS) -> Callable:
    """OFT's `obs_transforms.augment`, also writing `observation["sf_crop_boxes"]` [V, 4] for `views`."""

    def augment_and_box(obs: dict, seed, augment_kwargs: dict) -> dict:
        boxes = crop_boxes(augment, obs, seed, augment_kwargs, views)
        obs = augment(obs, seed=seed, augment_kwargs=augment_kwargs)
        obs[BOXES] = boxes
        return obs

    return augment_and_box


# Colour ops of dlimp's AUGMENT_OPS with arguments under which TF's op leaves every pixel as it is (to float32
# rounding) but still draws from its seed: contrast and saturation refuse lower == upper, so the factor is drawn
# from [1, the next float32 above 1).
_ONE_UP = float(np.nextafter(np.float32(1), np.float32(2)))
NEUTRAL_COLOUR_OPS = {
    "random_brightness": {"max_delta": 0.0},
    "random_contrast": {"lower": 1.0, "upper": _ONE_UP},
    "random_saturation": {"lower": 1.0, "upper": _ONE_UP},
    "random_hue": {"max_delta": 0.0},
}
CROP_OP = "random_resized_crop"


def crop_boxes(augment: Callable, obs: dict, seed, augment_kwargs: dict, views: Sequence[str] = VIEWS):
    """The crop `augment(obs, seed, augment_kwargs)` applies to each view, measured: float32 [V, 4] (y0, x0, y1, x1).

    Measured rather than re-derived, because which dlimp is installed decides the crop: the fork OFT and
    openvla-SF pin (moojink/dlimp_openvla) re-draws the seed before every op of `augment_order`, upstream
    kvablack/dlimp hands every op the view's seed unchanged, so the same seed gives other boxes. So this
    calls the pipeline's own `augment` (which calls whatever dlimp is installed, with OFT's seed + i over
    its set of image names and its padding skip) on a copy of `obs` whose views are float32 coordinate
    images (pixel centres' (y, x) fractions in two channels), with the same seed and the same op order:
    colour ops before the last crop keep their place (so the fork re-draws the seed as often as for the
    real image) but get `NEUTRAL_COLOUR_OPS` arguments, colour ops after it are left out (a later op cannot
    change an earlier op's seed in either variant), and views without a crop are left out of the kwargs (OFT
    skips them). dlimp passes float32 images through unscaled, crops with `crop_and_resize` (bilinear, exact
    on a linear ramp) and clips to [0, 1], so the output holds, per output pixel, the input fraction it
    sampled; `box_of` reads the box off it. A padding view, an unaugmented view and validation get the
    full image. An op that moves pixels other than the crop (flips, rot90) cannot be a box: SfcacheError.
    """
    import tensorflow as tf

    probe_kwargs = measured_views(obs, augment_kwargs, views)
    probe = dict(obs)  # same keys in the same order: OFT's set of image names, hence seed + i, is the same
    for view in probe_kwargs:
        shape = tf.shape(obs[f"image_{view}"])
        probe[f"image_{view}"] = coordinate_image(shape[-3], shape[-2])
    probe = augment(probe, seed=seed, augment_kwargs=probe_kwargs) if probe_kwargs else probe
    full = tf.constant(FULL_BOX, tf.float32)
    return tf.stack([box_of(probe[f"image_{view}"]) if view in probe_kwargs else full for view in views])


def measured_views(obs: dict, augment_kwargs: dict, views: Sequence[str]) -> dict:
    """OFT augment kwargs in its per-camera form for the `views` of `obs` that get a crop, as `measuring_kwargs`."""
    per_view = {key[6:]: augment_kwargs for key in obs if key.startswith("image_")}
    if "augment_order" not in augment_kwargs:  # OFT's per-camera form: {name: kwargs}
        per_view = {name: augment_kwargs.get(name) for name in per_view}
    measured = {view: measuring_kwargs(per_view[view]) for view in views if per_view.get(view) is not None}
    return {view: kwargs for view, kwargs in measured.items() if kwargs is not None}


def measuring_kwargs(kwargs: dict) -> dict | None:
    """`kwargs` of one view with its colour ops neutral and those after the last crop left out (see `crop_boxes`);
    None without a crop (the full image)."""
    order = list(kwargs["augment_order"])
    for op in order:
        if op != CROP_OP and op not in NEUTRAL_COLOUR_OPS:
            raise SfcacheError(
                f"augment_with_boxes: augment_order {order} has {op!r}, which a crop box cannot describe; "
                f"sfcache follows {CROP_OP!r} and the colour ops {sorted(NEUTRAL_COLOUR_OPS)}"
            )
    if CROP_OP not in order:
        return None
    kept = order[: max(i for i, op in enumerate(order) if op == CROP_OP) + 1]
    return {
        "augment_order": kept,
        CROP_OP: kwargs.get(CROP_OP, {}),
        **{op: NEUTRAL_COLOUR_OPS[op] for op in kept if op != CROP_OP},
    }


def coordinate_image(height, width):
    """float32 [H, W, 3]: each pixel's centre as fractions of the image, (y, x, 0)."""
    import tensorflow as tf

    def centres(size):
        return (tf.range(size, dtype=tf.float32) + 0.5) / tf.cast(size, tf.float32)

    y, x = tf.meshgrid(centres(height), centres(width), indexing="ij")
    return tf.stack([y, x, tf.zeros_like(y)], axis=-1)


def box_of(sampled):
    """The box, in sfcache's convention, of a coordinate image after a crop and resize: float32 [4].

    sfcache boxes map output pixel centres linearly into the box (`crop_target_grid`): output pixel i of
    n samples fraction lo + (i + 0.5) / n * (hi - lo), which is what the coordinate channel holds; so the
    first and last rows (columns) give lo and hi. Averaged along the other axis (float32 rounding).
    """
    import tensorflow as tf

    def span(first, last, size):
        size = tf.cast(size, tf.float32)
        extent = (last - first) * size / tf.maximum(size - 1, 1)
        return tf.stack([first - extent * 0.5 / size, first - extent * 0.5 / size + extent])

    height, width = tf.shape(sampled)[0], tf.shape(sampled)[1]
    y = span(tf.reduce_mean(sampled[0, :, 0]), tf.reduce_mean(sampled[-1, :, 0]), height)
    x = span(tf.reduce_mean(sampled[:, 0, 1]), tf.reduce_mean(sampled[:, -1, 1]), width)
    return tf.stack([y[0], x[0], y[1], x[1]])


@dataclasses.dataclass(frozen=True)
class BoxCheck:
    """How far `augment_with_boxes`'s boxes are from the crops the installed augment applied (`check_boxes`)."""

    samples: int
    views: tuple[str, ...]
    max_error_px: float  # largest |box side - side fitted to the applied crop's pixels|, in pixels of the image
    max_levels: float  # largest uint8 difference: the applied crop vs the frame cropped with the box

    def __str__(self) -> str:
        return (
            f"crop boxes of {self.samples} samples x {len(self.views)} views {list(self.views)}: at most "
            f"{self.max_error_px:.3f} px from the crop applied ({self.max_levels:.0f} uint8 levels apart)"
        )


def check_boxes(samples, augment: Callable, augment_kwargs: dict, views: Sequence[str] = VIEWS, limit: int = 4):
    """Check `augment_with_boxes(augment)` against the installed dlimp on real frames: a `BoxCheck`.

    `samples`: OFT frames with un-augmented observations (e.g. `RLDSDataset(..., image_aug=False)` iterated with
    an identity batch transform); the last frame of each window is used, `limit` samples. Each is augmented
    for real with colour ops neutral (`measured_views`, same seeds), and each view's box is compared with
    the box fitted to the applied crop's pixels (least squares, from the measured box).
    """
    import tensorflow as tf

    errors, levels, count = [0.0], [0.0], 0
    for n, sample in zip(range(limit), samples, strict=False):
        observation = sample["observation"]
        obs = {key: tf.convert_to_tensor(value[-1]) for key, value in observation.items() if key.startswith("image_")}
        obs["pad_mask_dict"] = {
            key: tf.convert_to_tensor(value[-1]) for key, value in observation["pad_mask_dict"].items()
        }
        seed = tf.constant([n, 7 * n + 1], tf.int32)
        boxes = crop_boxes(augment, obs, seed, augment_kwargs, views).numpy().astype(np.float64)
        applied = augment(dict(obs), seed=seed, augment_kwargs=measured_views(obs, augment_kwargs, views))
        for box, view in zip(boxes, views, strict=True):
            if f"image_{view}" not in obs:
                continue
            frame = tf.image.convert_image_dtype(obs[f"image_{view}"], tf.float32)
            target = np.asarray(applied[f"image_{view}"], np.float64)
            ours = tf.image.convert_image_dtype(crop_frame(frame, box), tf.uint8, saturate=True).numpy()
            levels.append(float(np.abs(ours.astype(np.float64) - target).max()))
            size = np.array(tuple(frame.shape[:2]) * 2, np.float64)
            errors.append(float((np.abs(fit_box(frame, target, box) - box) * size).max()))
        count += 1
    return BoxCheck(count, tuple(views), max(errors), max(levels))


def crop_frame(frame, box):
    """`frame` [H, W, C] float32 cropped to `box` (sfcache's convention) and resized to H x W, bilinear (TF's op)."""
    import tensorflow as tf

    height, width = frame.shape[:2]
    corners = []  # crop_and_resize puts the box corners on the first and last output pixel centres
    for lo, hi, n in ((box[0], box[2], height), (box[1], box[3], width)):
        start = (lo * n - (1 - (hi - lo)) / 2) / max(n - 1, 1)
        corners.append((start, start + hi - lo))
    (y0, y1), (x0, x1) = corners
    boxes = tf.constant([[y0, x0, y1, x1]], tf.float32)
    return tf.image.crop_and_resize(frame[None], boxes, [0], (height, width))[0]


def fit_box(frame, target: np.ndarray, box: np.ndarray, iterations: int = 10) -> np.ndarray:
    """The box whose crop of `frame` best explains the uint8 crop `target` (Gauss-Newton from `box`)."""
    size = np.array(tuple(frame.shape[:2]) * 2, np.float64)

    def render(candidate):  # what dlimp's uint8 conversion (x * 255.5, truncated) gives on average
        return crop_frame(frame, candidate).numpy().astype(np.float64).ravel() * 255.5 - 0.5

    flat = target.ravel()
    for _ in range(iterations):
        base = render(box)
        steps = 0.05 / size  # a twentieth of a pixel per side
        jacobian = np.stack([(render(box + np.eye(4)[k] * steps[k]) - base) / steps[k] for k in range(4)], axis=1)
        update = np.linalg.lstsq(jacobian, flat - base, rcond=None)[0]
        box = box + update
        if (np.abs(update) * size).max() < 1e-3:
            break
    return box


# ----------------------------------------------------------------------------- PyTorch side


class with_sf_fields:  # noqa: N801 - used like a function: with_sf_fields(RLDSBatchTransform(...))
    """Wraps OFT's `RLDSBatchTransform`: each sample also carries `sample_fields(rlds_batch)`."""

    def __init__(self, batch_transform: Callable[[dict], dict], views: Sequence[str] = VIEWS):
        self.batch_transform, self.views = batch_transform, tuple(views)

    def __call__(self, rlds_batch: dict) -> dict:
        return {**self.batch_transform(rlds_batch), **sample_fields(rlds_batch, self.views)}


def sample_fields(rlds_batch: dict, views: Sequence[str] = VIEWS) -> dict:
    """The sf_* fields of one (numpy) sample of OFT's pipeline: the current frame of its observation window.

    Without augmentation (validation) there is no box: the full image for each view.
    """
    obs = rlds_batch["observation"]
    missing = [name for name in FIELDS if name not in obs]
    if missing:
        raise SfcacheError(
            f"OFT sample lacks observation fields {missing}; add "
            "`new_obs.update(sf_oft.episode_fields(traj))` to make_dataset_from_rlds's restructure"
        )
    boxes = obs[BOXES][-1] if BOXES in obs else np.tile(np.float32(FULL_BOX), (len(views), 1))
    tfds_id = obs["sf_tfds_id"][-1]
    return {
        "sf_tfds_id": tfds_id.decode() if isinstance(tfds_id, bytes) else str(tfds_id),
        "sf_step": int(obs["sf_step"][-1]),
        "sf_episode_length": int(obs["sf_episode_length"][-1]),
        BOXES: np.asarray(boxes, np.float32),
    }


class collate_with_sf_fields:  # noqa: N801 - used like a function around OFT's collator
    """Wraps OFT's `PaddedCollatorForActionPrediction` (which keeps only its own keys) to batch the sf_* fields."""

    def __init__(self, collator: Callable[[Sequence[dict]], dict]):
        self.collator = collator

    def __call__(self, instances: Sequence[dict]) -> dict:
        batch = self.collator(instances)
        batch["sf_tfds_id"] = [instance["sf_tfds_id"] for instance in instances]
        for name in ("sf_step", "sf_episode_length"):
            batch[name] = torch.tensor([instance[name] for instance in instances], dtype=torch.long)
        batch[BOXES] = torch.from_numpy(np.stack([instance[BOXES] for instance in instances]))
        return batch


def batch_targets(targets: CachedTargets, batch: dict[str, Any]) -> torch.Tensor:
    """SF targets of an OFT batch: float32 [B, V*h*w, C], what openvla-SF's VGGT block computes.

    Joined by TFDS id and step with the trajectory length checked, each view's grid cropped to the
    box its image was augmented with, then SF's position embedding added (if `targets` adds it).
    """
    if tuple(targets.views) != tuple(VIEWS):  # the boxes come in VIEWS order: each must crop its own camera
        raise SfcacheError(
            f"{targets.store}: holds views {list(targets.views)}, but OFT's crop boxes are for "
            f"{list(VIEWS)} in that order; extract with --recipe openvla-oft (views primary,wrist)"
        )
    values = targets.targets_for(
        batch["sf_tfds_id"], batch["sf_step"], lengths=batch["sf_episode_length"], boxes=batch[BOXES]
    )
    return values.flatten(1, 2)
