"""Recipes: what a public Spatial Forcing trainer feeds VGGT, fixed as one named, recorded preset.

A recipe decides the JPEG decode, the VGGT input (`sfcache.vggt.preprocess` mode), the camera slots
of the VGGT sequence and whether a per-token validity mask is stored. `none` keeps the source's own
decode and `--preprocess`, the behaviour of stores made before recipes existed.

- `openvla-oft` (openvla-SF): TF's default JPEG decode (IFAST DCT), TF lanczos3 to 224, views primary, wrist.
- `openpi` (openpi-SF, pi0): openpi's letterbox to 224 with white padding in the VGGT copy, pi0's three
  camera slots (missing ones a blank white image), and a mask of the tokens that hold image content.

Blank slots: openpi-SF whitens a camera that is all zeros over the whole training batch, so its value
depends on what else is in the batch. A cache needs one value per step, so a blank slot here is always
white; that equals openpi-SF whenever the camera is missing for the whole dataset (LIBERO's right wrist,
Aloha datasets without a camera), which is the case the slot exists for. Its tokens are masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sfcache.errors import Message, SfcacheError, extraction_field
from sfcache.vggt.preprocess import POLICY_SIZE, host_frames, letterbox_mask, preprocess

__all__ = [
    "BLANK",
    "RECIPES",
    "Recipe",
    "camera_views",
    "get_recipe",
    "insert_blanks",
    "recipe_inputs",
    "resolve_preprocess",
    "slot_layout",
]

# the settings messages name
RECIPE, PREPROCESS, VIEWS = (extraction_field(name) for name in ("recipe", "preprocess", "views"))
BLANK = "blank"  # a camera slot with no camera: a white frame, its tokens masked


@dataclass(frozen=True)
class Recipe:
    name: str
    preprocess: str | None  # the VGGT input mode it fixes; None: --preprocess decides
    jpeg_fast_dct: bool  # decode JPEGs as TF's default decode_image does (IFAST)
    views: tuple[str, ...] | None  # the views it requires, in order; None: any
    slots: tuple[str, ...]  # the policy's camera slots, filled in order; (): the chosen views only
    token_mask: bool  # store targets/mask [steps, slots, tokens]
    trainer: str  # the public trainer it matches


RECIPES = {
    "none": Recipe(
        "none", None, False, None, (), False, "none (frames as the source decodes them, VGGT input per --preprocess)"
    ),
    "openvla-oft": Recipe(
        "openvla-oft",
        "sf",
        True,
        ("primary", "wrist"),
        (),
        False,
        "OpenHelix-Team/Spatial-Forcing openvla-SF (OpenVLA-OFT on LIBERO RLDS)",
    ),
    "openpi": Recipe(
        "openpi",
        "letterbox",
        False,
        None,
        ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb"),
        True,
        "OpenHelix-Team/Spatial-Forcing openpi-SF (pi0 on LeRobot data)",
    ),
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise SfcacheError(Message(RECIPE, f" must be one of {', '.join(RECIPES)}, not {name!r}")) from None


def resolve_preprocess(recipe: Recipe, asked: str | None, user_modes: Sequence[str]) -> str:
    """The VGGT input mode: the recipe's, else the one asked (default sf). A conflicting one is an error."""
    if recipe.preprocess is not None:
        if asked not in (None, recipe.preprocess):
            raise SfcacheError(
                Message(
                    RECIPE, f" {recipe.name} fixes the VGGT input ({recipe.preprocess}); drop ", PREPROCESS, f" {asked}"
                )
            )
        return recipe.preprocess
    if asked is not None and asked not in user_modes:
        letterbox = Message(" (letterbox comes with ", RECIPE, " openpi)") if asked == "letterbox" else ""
        raise SfcacheError(Message(PREPROCESS, f" must be one of {', '.join(user_modes)}, not {asked!r}", letterbox))
    return asked or "sf"


def camera_views(asked: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """The views to open the source with: the asked ones without blank slots (None: the format's default)."""
    if asked is None:
        return None
    cameras = tuple(view for view in asked if view != BLANK)
    if not cameras:
        raise SfcacheError(Message(VIEWS, f" {','.join(asked)}: at least one camera view is needed besides {BLANK}"))
    return cameras


def slot_layout(recipe: Recipe, asked: tuple[str, ...] | None, source_views: tuple[str, ...]) -> tuple[str, ...]:
    """The VGGT sequence in order: views and `blank` slots, padded with blanks to the recipe's slot count.

    `source_views` are the names of the source opened with `camera_views(asked)`, so a `name=column` entry
    of `asked` takes its name from there."""
    cameras = iter(source_views)
    layout = tuple(source_views) if asked is None else tuple(BLANK if v == BLANK else next(cameras) for v in asked)
    if recipe.views is not None and layout != recipe.views:
        raise SfcacheError(
            Message(
                RECIPE, f" {recipe.name} takes views {','.join(recipe.views)} in that order, got {','.join(layout)}"
            )
        )
    if not recipe.slots:
        if BLANK in layout:
            raise SfcacheError(
                Message(VIEWS, f" {','.join(layout)}: {BLANK} slots exist only with ", RECIPE, " openpi")
            )
        return layout
    if len(layout) > len(recipe.slots):
        raise SfcacheError(
            Message(
                RECIPE,
                f" {recipe.name} has {len(recipe.slots)} camera slots ({', '.join(recipe.slots)}); "
                f"got {len(layout)} views {','.join(layout)}",
            )
        )
    return layout + (BLANK,) * (len(recipe.slots) - len(layout))


def insert_blanks(frames: np.ndarray, layout: Sequence[str]) -> np.ndarray:
    """uint8 [T, cameras, H, W, 3] -> [T, slots, H, W, 3] with a white frame in each blank slot."""
    if BLANK not in layout:
        return frames
    out = np.full((frames.shape[0], len(layout), *frames.shape[2:]), 255, np.uint8)
    cameras = [slot for slot, view in enumerate(layout) if view != BLANK]
    out[:, cameras] = frames
    return out


def recipe_inputs(
    frames: np.ndarray,
    recipe: Recipe,
    layout: Sequence[str],
    mode: str,
    img_size: int,
    grid: tuple[int, int] | None,
    patch: int,
    on_host: bool = False,
) -> tuple[torch.Tensor | np.ndarray, np.ndarray | None]:
    """Source frames [T, cameras, H, W, 3] -> (VGGT images [T, slots, 3, h, w], token mask or None).

    The mask (recipe with token_mask) is bool [T, slots, grid_h*grid_w]: the letterbox padding mask
    resized nearest to the target grid, as openpi-SF does (F.interpolate nearest 224 -> 16), and False
    everywhere in a blank slot. `grid` is the stored target grid (None: VGGT's native grid, `patch` px).
    `on_host`: return `host_frames` (uint8 [T, slots, h, w, 3]) instead of images, for `device_images`
    to finish on the model's device (extraction's path; `preprocess` is the two run on the CPU).
    """
    slots = insert_blanks(frames, layout)
    images = host_frames(slots, mode, img_size) if on_host else preprocess(slots, mode, img_size)
    if not recipe.token_mask:
        return images, None
    grid = grid or (img_size // patch, img_size // patch)  # a token-mask recipe's letterbox is square
    content = torch.from_numpy(letterbox_mask(*frames.shape[2:4], POLICY_SIZE)).float()[None, None]
    tokens = F.interpolate(content, size=grid, mode="nearest").bool().flatten().numpy()
    present = np.array([view != BLANK for view in layout])
    mask = present[:, None] & tokens[None, :]
    return images, np.broadcast_to(mask, (frames.shape[0], *mask.shape)).copy()
