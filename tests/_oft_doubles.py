"""OpenVLA-OFT's `augment` and the two dlimps its users may have installed, as small doubles built from TF's own ops.

dlimp and prismatic (OFT's repository) are not on the package registry; bench/train.py times with these too.
The two dlimps share the crop op and TF's stateless colour ops and differ only in seeding, as read from the two
public repositories (`dlimp/augmentations.py`):
- `fork` (moojink/dlimp_openvla, pinned by OpenVLA-OFT and openvla-SF): before each op of `augment_order`
  the seed is replaced by two int32s drawn statelessly from it, and that op gets the new seed;
- `upstream` (kvablack/dlimp): every op gets the caller's seed as it is.
Images go to float32 in [0, 1] first (`convert_image_dtype`), are clipped to [0, 1] after every op and go
back to the input dtype at the end (saturating). The crop draws area, log aspect ratio and the two offsets,
in that order, each as one `stateless_uniform` of shape (1,) from the op's seed, and resamples with
`crop_and_resize` to the input's size. Written here independently of sfcache's code, which measures the box.
"""

from __future__ import annotations

import contextlib
import sys
import types
from functools import partial

OFT_AUGMENT = dict(  # openvla-SF's image_aug kwargs (prismatic/vla/datasets/datasets.py)
    random_resized_crop=dict(scale=[0.9, 0.9], ratio=[1.0, 1.0]),
    random_brightness=[0.2],
    random_contrast=[0.8, 1.2],
    random_saturation=[0.8, 1.2],
    random_hue=[0.05],
    augment_order=["random_resized_crop", "random_brightness", "random_contrast", "random_saturation", "random_hue"],
)


def draw_crop_box(tf, seed, scale, ratio):
    """The crop box (y0, x0, y1, x1) in `crop_and_resize`'s convention that the crop op draws from `seed`: [1, 4]."""
    area = tf.random.stateless_uniform((1,), seed, scale[0], scale[1])
    aspect = tf.exp(tf.random.stateless_uniform((1,), seed, tf.math.log(ratio[0]), tf.math.log(ratio[1])))
    height = tf.clip_by_value(tf.sqrt(area / aspect), 0, 1)
    width = tf.clip_by_value(tf.sqrt(area * aspect), 0, 1)
    top = tf.random.stateless_uniform((1,), seed, 0, 1 - height)
    left = tf.random.stateless_uniform((1,), seed, 0, 1 - width)
    return tf.stack([top, left, top + height, left + width], axis=1)


def random_resized_crop(image, scale, ratio, seed):
    import tensorflow as tf

    size = tf.shape(image)[:2]
    return tf.image.crop_and_resize(image[None], draw_crop_box(tf, seed, scale, ratio), [0], size)[0]


def next_seed(tf, seed):
    """The fork's per-op re-draw."""
    return tf.random.stateless_uniform([2], seed, maxval=tf.int32.max, dtype=tf.int32)


def augment_image(image, seed=None, *, redraw: bool, **augment_kwargs):
    import tensorflow as tf

    ops = {
        "random_resized_crop": random_resized_crop,
        "random_brightness": tf.image.stateless_random_brightness,
        "random_contrast": tf.image.stateless_random_contrast,
        "random_saturation": tf.image.stateless_random_saturation,
        "random_hue": tf.image.stateless_random_hue,
        "random_flip_left_right": tf.image.stateless_random_flip_left_right,
    }
    dtype = image.dtype
    image = tf.image.convert_image_dtype(image, tf.float32)
    for name in augment_kwargs["augment_order"]:
        if redraw:
            seed = next_seed(tf, seed)
        args = augment_kwargs.get(name, ())
        image = ops[name](image, seed=seed, **args) if hasattr(args, "items") else ops[name](image, *args, seed=seed)
        image = tf.clip_by_value(image, 0, 1)
    return tf.image.convert_image_dtype(image, dtype, saturate=True)


VARIANTS = {"fork": partial(augment_image, redraw=True), "upstream": partial(augment_image, redraw=False)}


def crop_seed(tf, variant: str, seed, position: int):
    """The seed the variant's op at `position` of augment_order gets from the caller's `seed`."""
    for _ in range(position + 1 if variant == "fork" else 0):
        seed = next_seed(tf, seed)
    return seed


@contextlib.contextmanager
def installed(variant: str):
    """`import dlimp` gives a module whose `transforms.augment_image` is `variant`'s, as OFT's code calls it."""
    dlimp = types.ModuleType("dlimp")
    dlimp.transforms = types.SimpleNamespace(augment_image=VARIANTS[variant])
    saved = sys.modules.get("dlimp")
    sys.modules["dlimp"] = dlimp
    try:
        yield dlimp
    finally:
        if saved is None:
            sys.modules.pop("dlimp")
        else:
            sys.modules["dlimp"] = saved


def oft_augment(obs, seed, augment_kwargs):
    """OFT's `obs_transforms.augment`: camera i of its set of image names gets seed + i, per-camera kwargs, padding
    images skipped; it calls whichever dlimp `import dlimp` gives."""
    import dlimp as dl
    import tensorflow as tf

    names = {key[6:] for key in obs if key.startswith("image_")}
    if "augment_order" in augment_kwargs:
        augment_kwargs = {name: augment_kwargs for name in names}
    for i, name in enumerate(names):
        if name not in augment_kwargs:
            continue
        obs[f"image_{name}"] = tf.cond(
            obs["pad_mask_dict"][f"image_{name}"],
            lambda: dl.transforms.augment_image(obs[f"image_{name}"], **augment_kwargs[name], seed=seed + i),  # noqa: B023
            lambda: obs[f"image_{name}"],  # noqa: B023
        )
    return obs
