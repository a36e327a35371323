"""Monocular depth metrics over valid pixels, per camera (the views' depth ranges differ ~20x, so a pooled
number would be one camera's).

AbsRel = mean(|d - d*| / d*); RMSE = sqrt(mean((d - d*)^2)) in metres; delta1 = fraction of pixels with
max(d / d*, d* / d) < 1.25. A pixel is valid when its ground truth is finite, > 0 and < `max_depth`.
"""

from __future__ import annotations

import numpy as np

DELTA = 1.25
NAMES = ("abs_rel", "rmse_m", "delta1")


def valid_pixels(depth: np.ndarray, max_depth: float) -> np.ndarray:
    """Where ground truth counts: finite, positive and nearer than `max_depth` metres (no far-plane hits)."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(depth) & (depth > 0) & (depth < max_depth)


class DepthMetrics:
    """Sums per view, so metrics over a whole split are exact however it is batched."""

    def __init__(self, views: tuple[str, ...], max_depth: float):
        self.views, self.max_depth = tuple(views), max_depth
        self.sums = np.zeros((len(self.views), 4))  # abs_rel, squared error, within delta, pixels

    def update(self, predicted: np.ndarray, truth: np.ndarray) -> None:
        """predicted, truth: float [B, V, H, W] metres."""
        predicted, truth = np.asarray(predicted, np.float64), np.asarray(truth, np.float64)
        valid = valid_pixels(truth, self.max_depth)
        for view in range(len(self.views)):
            keep = valid[:, view]
            d, g = predicted[:, view][keep], truth[:, view][keep]
            ratio = np.maximum(d / g, g / np.maximum(d, 1e-12))
            self.sums[view] += (np.sum(np.abs(d - g) / g), np.sum((d - g) ** 2), np.sum(ratio < DELTA), d.size)

    def result(self) -> dict[str, dict[str, float]]:
        """{view: {abs_rel, rmse_m, delta1, pixels}}; None for a view without a valid pixel."""
        out = {}
        for view, (rel, squared, within, pixels) in zip(self.views, self.sums):
            if pixels == 0:
                out[view] = {"abs_rel": None, "rmse_m": None, "delta1": None, "pixels": 0}
                continue
            out[view] = {
                "abs_rel": float(rel / pixels),
                "rmse_m": float(np.sqrt(squared / pixels)),
                "delta1": float(within / pixels),
                "pixels": int(pixels),
            }
        return out


def figure(value: float | None, digits: int = 3) -> str:
    """A metric or ratio as printed in tables: "-" for a view without a valid pixel (the metrics' None)."""
    return "-" if value is None else f"{value:.{digits}f}"
