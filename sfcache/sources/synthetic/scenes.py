"""The scene every synthetic dataset shows, rendered per view from the seed, as the episodes a reader must return."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Per view: sky, table, object, marker colours (channel-asymmetric so a BGR swap shows).
_PALETTES = [
    ((70, 120, 210), (150, 100, 60), (220, 40, 30), (240, 210, 40)),
    ((40, 160, 90), (90, 90, 110), (30, 60, 220), (250, 120, 200)),
    ((180, 90, 160), (120, 140, 60), (240, 160, 20), (20, 220, 230)),
    ((200, 200, 80), (60, 70, 140), (130, 30, 170), (250, 250, 250)),
]


@dataclass
class ExpectedEpisode:
    """What a reader must return for one episode (frames in the format's default view order)."""

    instruction: str
    frames: np.ndarray  # uint8 [T, V, H, W, 3] as the policy sees them
    actions: np.ndarray  # float32 [T, A]
    proprio: np.ndarray  # float32 [T, P]
    depth: np.ndarray | None = None  # float32 [T, V, H, W] metres as the policy sees them (LIBERO with depth=True)


@dataclass
class Written:
    """A written dataset: the path to open and the expected episodes by key, in key order."""

    path: Path
    format: str
    episodes: dict[str, ExpectedEpisode] = field(default_factory=dict)
    lossy: bool = False  # frames went through JPEG: compare within a tolerance
    files: list[Path] = field(default_factory=list)


def render_view(view: int, position: np.ndarray, height: int, width: int) -> np.ndarray:
    """One camera frame: gradient sky, table, a fixed top-left marker, the object at `position` (x, y in 0..1)."""
    sky, table, obj, marker = (np.array(c, np.float32) for c in _PALETTES[view % len(_PALETTES)])
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = y / height, x / width
    shade = (0.75 + 0.25 * y)[..., None]
    image = np.where((y < 0.4)[..., None], sky * shade, table * (1.1 - 0.2 * x)[..., None])
    zoom = 1.0 + 0.6 * view  # wrist views see the object larger and off-centre
    cx, cy = 0.5 + (position[0] - 0.5) / zoom, 0.55 + (position[1] - 0.5) / zoom
    half = 0.09 * zoom
    image[(np.abs(x - cx) < half) & (np.abs(y - cy) < half * 0.8)] = obj
    image[(x < 0.14) & (y < 0.1 + 0.04 * view)] = marker
    return np.clip(image, 0, 255).astype(np.uint8)


def render_depth(view: int, position: np.ndarray, height: int, width: int) -> np.ndarray:
    """Metric depth of `render_view`'s scene: a far wall behind the sky, a table plane nearing the camera
    towards the bottom, the object box standing out of it; the wrist view is ~20x closer (LIBERO: agentview
    0.7-3 m, eye-in-hand 0.03-0.13 m). float32 [H, W]."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = (y + 0.5) / height, (x + 0.5) / width
    depth = np.where(y < 0.4, 3.0, 2.4 - 1.6 * (y - 0.4) / 0.6 + 0.1 * x).astype(np.float32)
    zoom = 1.0 + 0.6 * view
    cx, cy = 0.5 + (position[0] - 0.5) / zoom, 0.55 + (position[1] - 0.5) / zoom
    half = 0.09 * zoom
    box = (np.abs(x - cx) < half) & (np.abs(y - cy) < half * 0.8)
    depth[box] -= 0.35 + 0.2 * (1 - np.abs(x - cx)[box] / half)  # a rounded front face
    return depth / (1.0 + 19.0 * (view % 2))


def episode_motion(rng: np.random.Generator, steps: int, action_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth actions in [-1, 1] and the object path they drive (x, y per step)."""
    actions = np.tanh(0.35 * rng.normal(size=(steps, action_dim)).cumsum(axis=0)).astype(np.float32)
    path = 0.5 + 0.35 * np.tanh(0.3 * actions[:, :2].cumsum(axis=0))
    return actions, path


def render_episode(path: np.ndarray, views: int, height: int, width: int) -> np.ndarray:
    """uint8 [T, V, H, W, 3]: `render_view` of each view at every point of the object's path."""
    return np.stack([np.stack([render_view(v, p, height, width) for v in range(views)]) for p in path])
