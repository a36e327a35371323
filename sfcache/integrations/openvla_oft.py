"""Cached SF targets in OpenVLA-OFT / openvla-SF's RLDS pipeline (tf.data + dlimp), in a few changed lines.

OFT's pipeline yields no episode id, no step and no crop box, and shuffles trajectories and frames,
so the join needs what survives the shuffles, carried per frame from the read to the batch:

- the episode: TFDS's `tfds_id` (`<shard file>__<index in shard>`, from `ReadConfig(add_tfds_id=True)`;
  `with_tfds_ids`), which an RLDS store maps to its key (`Cache.key_for`), plus the trajectory's
  length, checked against the store so that other data cannot silently misalign (`episode_fields`);
- the step: its index in the trajectory (`episode_fields`);
- per view, the crop OFT's augmentation drew. dlimp's `random_resized_crop` draws everything from
  the view's seed (`seed + i`, i counting OFT's set of image names); `augment_with_boxes` wraps OFT's
  `augment` and re-derives the same box from the same seed with the same stateless draws.

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
    "CachedTargets",
    "augment_with_boxes",
    "batch_targets",
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
        boxes = crop_boxes(obs, seed, augment_kwargs, views)  # before augment, on the same image names
        obs = augment(obs, seed=seed, augment_kwargs=augment_kwargs)
        obs[BOXES] = boxes
        return obs

    return augment_and_box


def crop_boxes(obs: dict, seed, augment_kwargs: dict, views: Sequence[str] = VIEWS):
    """The crop OFT's `augment` applies to each view: float32 [V, 4] (y0, x0, y1, x1) in sfcache's convention.

    OFT augments `image_<name>` with seed `seed + i`, i enumerating the set {name for "image_<name>" keys}
    (a set: its order is fixed within one process, so it is rebuilt here the same way). A view without
    augmentation, without a crop in its `augment_order`, or marked padding gets the full image.
    """
    import tensorflow as tf

    names = {key[6:] for key in obs if key.startswith("image_")}
    per_view = {name: augment_kwargs for name in names} if "augment_order" in augment_kwargs else augment_kwargs
    index = {name: i for i, name in enumerate(names)}
    full = tf.constant(FULL_BOX, tf.float32)
    boxes = []
    for view in views:
        kwargs = per_view.get(view)
        if view not in index or kwargs is None or "random_resized_crop" not in kwargs["augment_order"]:
            boxes.append(full)
            continue
        crop = kwargs.get("random_resized_crop")
        scale, ratio = (crop["scale"], crop["ratio"]) if hasattr(crop, "items") else crop
        image = obs[f"image_{view}"]
        box = dlimp_crop_box(seed + index[view], scale, ratio, tf.shape(image)[-3], tf.shape(image)[-2])
        pad_mask = obs.get("pad_mask_dict", {}).get(f"image_{view}", True)
        boxes.append(tf.where(pad_mask, box, full))
    return tf.stack(boxes)


def dlimp_crop_box(seed, scale, ratio, height, width):
    """The box dlimp's `random_resized_crop` draws for one [H, W, 3] image, in sfcache's convention.

    dlimp makes four `stateless_uniform` draws of shape (1,) with the same seed (scale, log-ratio,
    y offset, x offset) and crops with `tf.image.crop_and_resize`, whose box corners sit on the
    first and last pixel centres (pixel i of an H-pixel output reads row (H-1)*y0 + i*(y1-y0)).
    sfcache boxes map output pixel centres linearly into the box instead (as `crop_target_grid`
    assumes): the same sampling is the box shifted by ((H-1)*y0 + (1 - (y1-y0))/2)/H - y0.
    """
    import tensorflow as tf

    def draw(low, high):
        return tf.random.stateless_uniform((1,), seed, low, high)

    scales = draw(scale[0], scale[1])
    ratios = tf.exp(draw(tf.math.log(ratio[0]), tf.math.log(ratio[1])))
    box_h = tf.clip_by_value(tf.sqrt(scales / ratios), 0, 1)
    box_w = tf.clip_by_value(tf.sqrt(scales * ratios), 0, 1)
    y0, x0 = draw(0, 1 - box_h), draw(0, 1 - box_w)

    def centred(start, span, size):
        size = tf.cast(size, tf.float32)
        return ((size - 1) * start + (1 - span) / 2) / size

    y0, x0 = centred(y0, box_h, height), centred(x0, box_w, width)
    return tf.concat([y0, x0, y0 + box_h, x0 + box_w], axis=0)


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
